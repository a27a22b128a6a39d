//! A local server process's CPU time and resident memory, read from
//! `/proc/PID/stat` and `/proc/PID/status` (Linux). Elsewhere, or for a
//! remote server, the readings are absent and the report says so.

use std::time::Duration;

/// Kernel clock ticks per second for `/proc/PID/stat` times (`USER_HZ`,
/// which Linux fixes at 100 on every architecture).
const TICKS_PER_SECOND: u64 = 100;

/// User plus system CPU time the process has used.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at
    // field 3 ("state"); utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis(
        (utime + stime) * 1000 / TICKS_PER_SECOND,
    ))
}

/// Resident memory (`VmRSS`) in bytes.
pub fn resident_bytes(pid: u32) -> Option<u64> {
    status_bytes(pid, "VmRSS:")
}

/// The most resident memory the process ever had (`VmHWM`), in bytes.
pub fn peak_resident_bytes(pid: u32) -> Option<u64> {
    status_bytes(pid, "VmHWM:")
}

fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let before = cpu_time(me).unwrap();
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(100) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(cpu_time(me).unwrap() > before);
        assert!(resident_bytes(me).unwrap() > 1024 * 1024);
        assert!(peak_resident_bytes(me).unwrap() >= resident_bytes(me).unwrap());
        assert!(cpu_time(u32::MAX).is_none());
    }
}

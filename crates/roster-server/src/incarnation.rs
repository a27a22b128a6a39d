//! The node's incarnation: which life of the node this is. It is the time
//! of the start in microseconds, kept in the data directory so that it
//! still grows if the clock goes back: versions written by this life
//! outrank the previous life's, and clients and peers can tell that the
//! node restarted (even after its data directory was lost). Owns the file
//! and its atomic update; nothing else.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Why the incarnation could not be kept.
#[derive(Debug, thiserror::Error)]
#[error("cannot keep the node's incarnation in {path}: {reason}")]
pub struct IncarnationError {
    path: String,
    reason: String,
}

const FILE: &str = "incarnation";

/// The next incarnation: the time in microseconds, or one above the one
/// stored in `dir` if that is higher (the clock went back), stored before
/// it is returned (`dir` is created if missing). Without a directory the
/// time alone is taken, which grows from one life to the next unless the
/// clock goes back.
pub fn next(dir: &str) -> Result<u64, IncarnationError> {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64);
    // Two nodes of one process (tests) still get different lives.
    let next = |last: u64| last.saturating_add(1).max(clock);
    let order = std::sync::atomic::Ordering::AcqRel;
    let last = LAST
        .fetch_update(order, std::sync::atomic::Ordering::Acquire, |l| {
            Some(next(l))
        })
        .unwrap_or_else(|l| l);
    let now = next(last);
    if dir.is_empty() {
        return Ok(now);
    }
    let dir = PathBuf::from(dir);
    let fail = |path: &Path, e: &dyn std::fmt::Display| IncarnationError {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(&dir).map_err(|e| fail(&dir, &e))?;
    let path = dir.join(FILE);
    let previous = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u64>().map_err(|_| {
            fail(
                &path,
                &format!(
                    "{:?} is not a number; remove the file to start over",
                    text.trim()
                ),
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(fail(&path, &e)),
    };
    let next = previous
        .checked_add(1)
        .ok_or_else(|| fail(&path, &"the counter is exhausted"))?
        .max(now);
    let tmp = dir.join(format!("{FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{next}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&dir)?.sync_all()
    };
    write().map_err(|e| fail(&path, &e))?;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_start_gets_a_higher_incarnation_and_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("data");
        let d = d.to_str().unwrap();
        let (a, b) = (next(d).unwrap(), next(d).unwrap());
        assert!(b > a, "{a} then {b}");
        // The clock went back (or the file is from another machine): still
        // one above what was stored.
        let ahead = b + 1_000_000_000_000;
        std::fs::write(dir.path().join("data").join(FILE), format!("{ahead}\n")).unwrap();
        assert_eq!(next(d).unwrap(), ahead + 1);
        std::fs::write(dir.path().join("data").join(FILE), "soon").unwrap();
        let e = next(d).unwrap_err().to_string();
        assert!(e.contains("not a number"), "{e}");
        let (a, b) = (next("").unwrap(), next("").unwrap());
        assert!(b > a, "{a} then {b}");
    }
}

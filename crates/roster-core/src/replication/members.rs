//! What one member knows of another from the traffic between them (its
//! state and life), and which member is responsible for data that has no
//! session to follow (rendezvous hashing). Holds no registry data.

use std::time::{Duration, Instant};

/// A member's state, as this node sees it from the replication traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MemberState {
    /// Heard from within `suspect_after`.
    Up,
    /// Silent longer than `suspect_after`, or a send to it failed.
    Suspect,
    /// Silent longer than `down_after`, or never heard from.
    Down,
}

impl MemberState {
    /// The state's name, as `roster members` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Up => "up",
            MemberState::Suspect => "suspect",
            MemberState::Down => "down",
        }
    }

    /// The state a member is in when last heard from at `last_heard`.
    pub fn from_silence(
        last_heard: Option<Instant>,
        now: Instant,
        suspect_after: Duration,
        down_after: Duration,
    ) -> Self {
        match last_heard {
            None => MemberState::Down,
            Some(t) => {
                let silent = now.saturating_duration_since(t);
                if silent >= down_after {
                    MemberState::Down
                } else if silent >= suspect_after {
                    MemberState::Suspect
                } else {
                    MemberState::Up
                }
            }
        }
    }
}

/// The member responsible for `key` among `members`: the one whose hash
/// with the key is highest (rendezvous hashing). When a member leaves,
/// only the keys it was responsible for move; when one joins, only the
/// keys it now wins move to it. Every member that knows the same members
/// picks the same one.
pub fn rendezvous<'a>(key: &str, members: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    members.into_iter().max_by_key(|m| {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(m.as_bytes());
        h.update(&[0]);
        h.update(key.as_bytes());
        (h.digest(), *m)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_leaving_moves_only_the_keys_it_was_responsible_for() {
        let all = ["a", "b", "c", "d"];
        let without_b = ["a", "c", "d"];
        let mut moved = 0;
        let mut held_by_b = 0;
        for i in 0..2_000 {
            let key = format!("10.0.{}.{}#8080#DEFAULT", i / 250, i % 250);
            let before = rendezvous(&key, all).unwrap();
            let after = rendezvous(&key, without_b).unwrap();
            if before == "b" {
                held_by_b += 1;
            } else {
                assert_eq!(before, after, "{key} moved though its member stayed");
            }
            if before != after {
                moved += 1;
            }
        }
        assert_eq!(moved, held_by_b);
        // Roughly a quarter each.
        assert!((300..700).contains(&held_by_b), "{held_by_b}");
    }

    #[test]
    fn the_choice_does_not_depend_on_the_order_members_are_listed_in() {
        for i in 0..100 {
            let key = format!("k{i}");
            assert_eq!(
                rendezvous(&key, ["x", "y", "z"]),
                rendezvous(&key, ["z", "x", "y"])
            );
        }
        assert_eq!(rendezvous("k", []), None);
    }

    #[test]
    fn state_follows_silence() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let state = |heard, at| MemberState::from_silence(heard, at, s(5), s(15));
        assert_eq!(state(None, t0), MemberState::Down);
        assert_eq!(state(Some(t0), t0 + s(4)), MemberState::Up);
        assert_eq!(state(Some(t0), t0 + s(5)), MemberState::Suspect);
        assert_eq!(state(Some(t0), t0 + s(15)), MemberState::Down);
    }
}

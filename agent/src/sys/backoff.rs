//! Retry policy for failed updates (SPEC §6): exponential backoff per target,
//! so a broken image or hook is retried, never in a hot loop.
//!
//! Pure: every function takes "now" as an argument. Times are Unix epoch
//! milliseconds so that a record written by `apply --from-metadata` and read
//! by the agent (or the next boot's status) means the same thing.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Exponential backoff: `min`, `2·min`, `4·min`, … capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub min: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl Backoff {
    /// A policy; `max` is raised to `min` if below it.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
        }
    }

    /// Delay before the next attempt after `failures` consecutive failures
    /// (0 failures: no delay).
    pub fn delay(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let shift = (failures - 1).min(32);
        self.min
            .checked_mul(1u32 << shift.min(31))
            .map_or(self.max, |d| d.min(self.max))
    }
}

/// Unix epoch milliseconds of `t`.
pub fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The failures of one target (image id and source).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// Consecutive failed attempts.
    pub attempts: u32,
    /// The last attempt's error.
    pub last_error: String,
    /// When the last attempt failed, epoch ms.
    pub last_attempt_ms: u64,
    /// Not before this, epoch ms.
    pub next_retry_ms: u64,
}

/// Failures by target key; a success clears the target's entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureBook {
    /// Target key (see [`target_key`]) to its failures.
    #[serde(flatten)]
    pub by_target: BTreeMap<String, Failure>,
}

/// The key of a target: the id, plus the source when known, so that fixing
/// the source in the metadata retries at once.
pub fn target_key(id: &str, source: Option<&str>) -> String {
    match source {
        Some(s) => format!("{id}@{s}"),
        None => id.to_owned(),
    }
}

impl FailureBook {
    /// Record a failure at `now`; returns the delay until the next attempt.
    pub fn failed(
        &mut self,
        key: &str,
        error: &str,
        now: SystemTime,
        policy: &Backoff,
    ) -> Duration {
        let f = self.by_target.entry(key.to_owned()).or_insert(Failure {
            attempts: 0,
            last_error: String::new(),
            last_attempt_ms: 0,
            next_retry_ms: 0,
        });
        f.attempts = f.attempts.saturating_add(1);
        f.last_error = error.to_owned();
        let now_ms = epoch_ms(now);
        let delay = policy.delay(f.attempts);
        f.last_attempt_ms = now_ms;
        f.next_retry_ms =
            now_ms.saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
        delay
    }

    /// Forget the failures of `key` (it succeeded, or the operator reset).
    pub fn succeeded(&mut self, key: &str) {
        self.by_target.remove(key);
    }

    /// How long `key` must still wait at `now`; zero when it may run.
    pub fn wait(&self, key: &str, now: SystemTime) -> Duration {
        match self.by_target.get(key) {
            Some(f) => Duration::from_millis(f.next_retry_ms.saturating_sub(epoch_ms(now))),
            None => Duration::ZERO,
        }
    }

    /// Drop entries of targets other than `keep`: the metadata moved on.
    pub fn retain_only(&mut self, keep: &str) {
        self.by_target.retain(|k, _| k == keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn doubles_and_caps() {
        let b = Backoff::new(30 * S, 3600 * S);
        let got: Vec<u64> = (0..10).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(got, vec![0, 30, 60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(b.delay(u32::MAX), 3600 * S, "no overflow");
        assert_eq!(Backoff::new(10 * S, S).max, 10 * S);
        assert_eq!(
            Backoff::new(Duration::from_millis(1), Duration::MAX).delay(40),
            Duration::from_millis(1 << 31)
        );
    }

    #[test]
    fn book_tracks_per_target() {
        let b = Backoff::new(10 * S, 100 * S);
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut book = FailureBook::default();
        let k = target_key("v2", Some("/store"));
        assert_eq!(book.wait(&k, t0), Duration::ZERO);
        assert_eq!(book.failed(&k, "hook failed", t0, &b), 10 * S);
        assert_eq!(book.wait(&k, t0 + 4 * S), 6 * S);
        assert_eq!(book.wait(&k, t0 + 11 * S), Duration::ZERO);
        assert_eq!(book.failed(&k, "again", t0 + 11 * S, &b), 20 * S);
        assert_eq!(book.by_target[&k].attempts, 2);
        // Another target is not held back.
        assert_eq!(
            book.wait(&target_key("v3", Some("/store")), t0),
            Duration::ZERO
        );
        assert_eq!(
            book.wait(&target_key("v2", Some("/other")), t0),
            Duration::ZERO
        );
        let json = serde_json::to_string(&book).unwrap();
        assert_eq!(serde_json::from_str::<FailureBook>(&json).unwrap(), book);
        book.retain_only("v3");
        assert!(book.by_target.is_empty());
        book.failed(&k, "x", t0, &b);
        book.succeeded(&k);
        assert_eq!(book.wait(&k, t0), Duration::ZERO);
    }
}

//! Rate limits for log lines that anyone who can reach a socket can cause
//! (failed QUIC handshakes, refused NBD clients, accept errors): at most
//! one line per interval, and that line says how many were held back, so
//! a flood cannot fill the journal or spend the thread that carries
//! replication on logging.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One rate-limited kind of log line.
pub struct LogLimit {
    interval: Duration,
    /// When a line last went out, and how many were held back since.
    /// None until the first line.
    state: Mutex<Option<(Instant, u64)>>,
}

impl LogLimit {
    /// At most one line per `interval`.
    pub const fn new(interval: Duration) -> Self {
        LogLimit {
            interval,
            state: Mutex::new(None),
        }
    }

    /// Whether a line may go out now; `Some(n)` with the number of lines
    /// held back since the last one that went out.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    /// Logs `line()` at warn when a line may go out now, with the count of
    /// those held back since the last one; otherwise logs nothing (and
    /// builds no text).
    pub fn warn(&self, line: impl FnOnce() -> String) {
        if let Some(held) = self.admit() {
            tracing::warn!("{}{}", line(), held_back(held, self));
        }
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().ok()?;
        match &mut *state {
            Some((last, held)) if now.saturating_duration_since(*last) < self.interval => {
                *held = held.saturating_add(1);
                None
            }
            Some((last, held)) => {
                let n = *held;
                *last = now;
                *held = 0;
                Some(n)
            }
            None => {
                *state = Some((now, 0));
                Some(0)
            }
        }
    }
}

/// " (N more like it ...)" after a rate-limited line, or "".
fn held_back(n: u64, limit: &LogLimit) -> String {
    if n == 0 {
        return String::new();
    }
    format!(
        " ({n} more like it since the last such line; at most one per {} s is logged)",
        limit.interval.as_secs()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_of_the_held_back() {
        let l = LogLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.admit_at(t0), Some(0));
        for k in 1..=1000u64 {
            assert_eq!(l.admit_at(t0 + Duration::from_millis(k)), None);
        }
        assert_eq!(l.admit_at(t0 + Duration::from_secs(10)), Some(1000));
        assert_eq!(l.admit_at(t0 + Duration::from_secs(11)), None);
        assert_eq!(l.admit_at(t0 + Duration::from_secs(21)), Some(1));
    }
}

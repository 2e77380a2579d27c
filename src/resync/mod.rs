//! Resync pacing: application I/O keeps priority.
//!
//! A [`RateController`] watches the latency of application writes while a
//! resync runs (time is passed in, so it is deterministic and testable). When
//! writes wait longer than the target, the resync rate is cut
//! multiplicatively toward the configured minimum; when the application is
//! idle or fast, it grows back toward the maximum (the link and disk then
//! give what they can). A [`Pacer`] turns the current rate into start times
//! for resync chunks.

use std::time::{Duration, Instant};

/// How often the controller adjusts the rate.
pub const ADJUST_INTERVAL: Duration = Duration::from_millis(100);
/// Rate used as "unlimited" when no maximum is configured.
pub const UNLIMITED_BYTES_PER_S: u64 = 4 << 30;

/// Resync rate settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateSettings {
    /// Never slower than this (so a resync always finishes).
    pub min_bytes_per_s: u64,
    /// Never faster than this (0: unlimited).
    pub max_bytes_per_s: u64,
    /// Application write latency above which the resync backs off.
    pub app_latency_target: Duration,
}

/// Adapts the resync rate to application latency.
#[derive(Debug)]
pub struct RateController {
    settings: RateSettings,
    rate_bytes_per_s: u64,
    window_latency_sum: Duration,
    window_count: u64,
    last_adjust: Option<Instant>,
}

impl RateController {
    /// Starts at the maximum rate.
    pub fn new(settings: RateSettings) -> Self {
        RateController {
            settings,
            rate_bytes_per_s: Self::max(&settings),
            window_latency_sum: Duration::ZERO,
            window_count: 0,
            last_adjust: None,
        }
    }

    fn max(s: &RateSettings) -> u64 {
        if s.max_bytes_per_s == 0 {
            UNLIMITED_BYTES_PER_S
        } else {
            s.max_bytes_per_s
        }
    }

    /// Current rate.
    pub fn rate_bytes_per_s(&self) -> u64 {
        self.rate_bytes_per_s
    }

    /// An application write completed after `latency`.
    pub fn app_write_done(&mut self, latency: Duration) {
        self.window_latency_sum += latency;
        self.window_count += 1;
    }

    /// Adjusts the rate if an interval passed; returns the new rate when it
    /// changed.
    pub fn tick(&mut self, now: Instant) -> Option<u64> {
        let last = *self.last_adjust.get_or_insert(now);
        if now.duration_since(last) < ADJUST_INTERVAL {
            return None;
        }
        self.last_adjust = Some(now);
        let max = Self::max(&self.settings);
        let min = self.settings.min_bytes_per_s.min(max).max(1);
        let old = self.rate_bytes_per_s;
        let new = if self.window_count == 0 {
            // Idle application: take what the link and disk give.
            max
        } else {
            let mean = self.window_latency_sum / self.window_count as u32;
            if mean > self.settings.app_latency_target {
                (old / 10 * 7).max(min)
            } else {
                (old + old / 4).max(min + 1).min(max)
            }
        };
        self.window_latency_sum = Duration::ZERO;
        self.window_count = 0;
        self.rate_bytes_per_s = new;
        (new != old).then_some(new)
    }
}

/// Turns a byte rate into start times for transfers.
#[derive(Debug)]
pub struct Pacer {
    rate_bytes_per_s: u64,
    next_at: Instant,
}

impl Pacer {
    /// A pacer at `rate_bytes_per_s` (0: unpaced).
    pub fn new(rate_bytes_per_s: u64) -> Self {
        Pacer {
            rate_bytes_per_s,
            next_at: Instant::now(),
        }
    }

    /// Changes the rate for future reservations.
    pub fn set_rate(&mut self, rate_bytes_per_s: u64) {
        self.rate_bytes_per_s = rate_bytes_per_s;
    }

    /// When a transfer of `bytes` may start (None: now).
    pub fn reserve(&mut self, bytes: u64) -> Option<Instant> {
        if self.rate_bytes_per_s == 0 || self.rate_bytes_per_s >= UNLIMITED_BYTES_PER_S {
            return None;
        }
        let now = Instant::now();
        let start = self.next_at.max(now);
        self.next_at = start + Duration::from_secs_f64(bytes as f64 / self.rate_bytes_per_s as f64);
        Some(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> RateSettings {
        RateSettings {
            min_bytes_per_s: 10 << 20,
            max_bytes_per_s: 400 << 20,
            app_latency_target: Duration::from_millis(5),
        }
    }

    #[test]
    fn backs_off_while_the_application_waits_and_recovers_when_idle() {
        let mut c = RateController::new(settings());
        let t0 = Instant::now();
        assert_eq!(c.tick(t0), None);
        let mut t = t0;
        // Slow application writes: the rate falls to the minimum, no lower.
        for _ in 0..30 {
            for _ in 0..10 {
                c.app_write_done(Duration::from_millis(20));
            }
            t += ADJUST_INTERVAL;
            c.tick(t);
        }
        assert_eq!(c.rate_bytes_per_s(), 10 << 20);
        // Fast application writes: it grows back, bounded by the maximum.
        for _ in 0..40 {
            c.app_write_done(Duration::from_millis(1));
            t += ADJUST_INTERVAL;
            c.tick(t);
        }
        assert_eq!(c.rate_bytes_per_s(), 400 << 20);
        // Slow again, then idle: idle jumps straight back to the maximum.
        c.app_write_done(Duration::from_millis(50));
        t += ADJUST_INTERVAL;
        c.tick(t);
        assert!(c.rate_bytes_per_s() < 400 << 20);
        t += ADJUST_INTERVAL;
        c.tick(t);
        assert_eq!(c.rate_bytes_per_s(), 400 << 20);
    }

    #[test]
    fn pacer_spaces_transfers() {
        let mut p = Pacer::new(1 << 20);
        let a = p.reserve(512 << 10);
        let b = p.reserve(512 << 10);
        let (Some(a), Some(b)) = (a, b) else {
            panic!("paced")
        };
        let gap = b.duration_since(a);
        assert!(
            gap >= Duration::from_millis(499) && gap <= Duration::from_millis(501),
            "{gap:?}"
        );
        p.set_rate(0);
        assert_eq!(p.reserve(1 << 20), None);
    }
}

//! Resync pacing: application I/O keeps priority.
//!
//! A [`RateController`] watches the latency of application writes while a
//! resync runs (time is passed in, so it is deterministic and testable). When
//! small writes take longer than the target (configured, or twice what they
//! took without a resync), the resync rate is cut multiplicatively, from the
//! rate actually reached, toward the configured minimum; when the
//! application is idle or fast, it grows back toward the maximum (the link
//! and disk then give what they can). It also tells whether the application
//! is active, so that the engine keeps fewer resync chunks in flight. A
//! [`Pacer`] turns the current rate into start times for resync chunks.

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
    /// Application write latency above which the resync backs off (zero:
    /// automatic, see [`RateController::target`]).
    pub app_latency_target: Duration,
}

/// With an automatic target, the resync backs off while application writes
/// take longer than this multiple of their latency without a resync.
pub const AUTO_TARGET_FACTOR: u32 = 2;
/// The automatic target never goes below this.
pub const AUTO_TARGET_MIN: Duration = Duration::from_micros(500);
/// Writes larger than this are not latency samples.
pub const LATENCY_SAMPLE_MAX_BYTES: u64 = 64 << 10;
/// The automatic target before any write was seen without a resync.
pub const AUTO_TARGET_UNKNOWN: Duration = Duration::from_millis(2);

/// Adapts the resync rate to application latency.
#[derive(Debug)]
pub struct RateController {
    settings: RateSettings,
    rate_bytes_per_s: u64,
    window_latency_sum: Duration,
    window_count: u64,
    /// Application writes of any size in this interval.
    window_writes: u64,
    /// Resync bytes started in this interval.
    window_resync_bytes: u64,
    last_adjust: Option<Instant>,
    app_active: bool,
    /// Moving average of application write latency while no resync runs.
    baseline: Option<Duration>,
}

impl RateController {
    /// Starts at the maximum rate.
    pub fn new(settings: RateSettings) -> Self {
        RateController {
            settings,
            rate_bytes_per_s: Self::max(&settings),
            window_latency_sum: Duration::ZERO,
            window_count: 0,
            window_writes: 0,
            window_resync_bytes: 0,
            last_adjust: None,
            app_active: false,
            baseline: None,
        }
    }

    fn max(s: &RateSettings) -> u64 {
        if s.max_bytes_per_s == 0 {
            UNLIMITED_BYTES_PER_S
        } else {
            s.max_bytes_per_s
        }
    }

    /// Whether application writes completed in the last interval (the
    /// resync then keeps only a few chunks in flight).
    pub fn app_active(&self) -> bool {
        self.app_active
    }

    /// Current rate.
    pub fn rate_bytes_per_s(&self) -> u64 {
        self.rate_bytes_per_s
    }

    /// An application write of `bytes` completed after `latency`, while a
    /// resync ran or not (the latter teaches the automatic target). Any
    /// write makes the application active; only writes up to
    /// `LATENCY_SAMPLE_MAX_BYTES` are latency samples (a 1 MiB write is
    /// slow for reasons of its own).
    pub fn app_write_done(&mut self, latency: Duration, bytes: u64, resyncing: bool) {
        if resyncing {
            self.window_writes += 1;
        }
        if bytes > LATENCY_SAMPLE_MAX_BYTES {
            return;
        }
        if !resyncing {
            // Exponential moving average, weight 1/16 per write.
            self.baseline = Some(match self.baseline {
                None => latency,
                Some(b) => (b * 15 + latency) / 16,
            });
            return;
        }
        self.window_latency_sum += latency;
        self.window_count += 1;
    }

    /// A resync transfer of `bytes` starts (the rate actually reached is
    /// where a back-off starts from, not an unreached maximum).
    pub fn resync_started(&mut self, bytes: u64) {
        self.window_resync_bytes = self.window_resync_bytes.saturating_add(bytes);
    }

    /// The application write latency above which the resync backs off:
    /// the configured one, or (automatic) twice the mean latency the
    /// application saw without a resync, at least `AUTO_TARGET_MIN`.
    pub fn target(&self) -> Duration {
        if !self.settings.app_latency_target.is_zero() {
            return self.settings.app_latency_target;
        }
        match self.baseline {
            Some(b) => (b * AUTO_TARGET_FACTOR).max(AUTO_TARGET_MIN),
            None => AUTO_TARGET_UNKNOWN,
        }
    }

    /// Adjusts the rate if an interval passed; returns the new rate when it
    /// changed.
    pub fn tick(&mut self, now: Instant) -> Option<u64> {
        let last = *self.last_adjust.get_or_insert(now);
        if now.duration_since(last) < ADJUST_INTERVAL {
            return None;
        }
        let elapsed = now.duration_since(last);
        self.last_adjust = Some(now);
        let reached = (self.window_resync_bytes as f64 / elapsed.as_secs_f64()) as u64;
        let max = Self::max(&self.settings);
        let min = self.settings.min_bytes_per_s.min(max).max(1);
        let old = self.rate_bytes_per_s;
        self.app_active = self.window_writes > 0;
        let new = if self.window_writes == 0 {
            // Idle application: take what the link and disk give.
            max
        } else if self.window_count == 0 {
            // Only large writes: no latency sample, hold the rate.
            old
        } else {
            let mean = self.window_latency_sum / self.window_count as u32;
            let target = self.target();
            let from = old.min(reached.max(min));
            if mean > target * 2 {
                // Far above the target: halve.
                (from / 2).max(min)
            } else if mean > target {
                (from / 10 * 7).max(min)
            } else {
                (old + old / 4).max(min + 1).min(max)
            }
        };
        self.window_latency_sum = Duration::ZERO;
        self.window_count = 0;
        self.window_writes = 0;
        self.window_resync_bytes = 0;
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
                c.app_write_done(Duration::from_millis(20), 4096, true);
            }
            t += ADJUST_INTERVAL;
            c.tick(t);
        }
        assert_eq!(c.rate_bytes_per_s(), 10 << 20);
        // Fast application writes: it grows back, bounded by the maximum.
        for _ in 0..40 {
            c.app_write_done(Duration::from_millis(1), 4096, true);
            t += ADJUST_INTERVAL;
            c.tick(t);
        }
        assert_eq!(c.rate_bytes_per_s(), 400 << 20);
        // Slow again, then idle: idle jumps straight back to the maximum.
        c.app_write_done(Duration::from_millis(50), 4096, true);
        t += ADJUST_INTERVAL;
        c.tick(t);
        assert!(c.rate_bytes_per_s() < 400 << 20);
        t += ADJUST_INTERVAL;
        c.tick(t);
        assert_eq!(c.rate_bytes_per_s(), 400 << 20);
    }

    #[test]
    fn back_off_starts_from_the_rate_reached_not_the_maximum() {
        let mut c = RateController::new(RateSettings {
            max_bytes_per_s: 0,
            ..settings()
        });
        let t0 = Instant::now();
        c.tick(t0);
        assert_eq!(c.rate_bytes_per_s(), UNLIMITED_BYTES_PER_S);
        // 20 MiB in 100 ms: 200 MiB/s reached; slow writes cut from there.
        c.resync_started(20 << 20);
        c.app_write_done(Duration::from_millis(20), 4096, true);
        c.tick(t0 + ADJUST_INTERVAL);
        let r = c.rate_bytes_per_s();
        assert!(r <= (200 << 20) / 2 + (1 << 20), "{r}");
        assert!(r >= (200 << 20) / 10 * 4, "{r}");
    }

    #[test]
    fn automatic_target_is_twice_the_latency_without_a_resync() {
        let mut c = RateController::new(RateSettings {
            app_latency_target: Duration::ZERO,
            ..settings()
        });
        assert_eq!(c.target(), AUTO_TARGET_UNKNOWN);
        for _ in 0..200 {
            c.app_write_done(Duration::from_millis(3), 4096, false);
        }
        assert_eq!(c.target(), Duration::from_millis(6));
        // Large writes are no latency samples.
        for _ in 0..50 {
            c.app_write_done(Duration::from_millis(40), 1 << 20, false);
        }
        assert_eq!(c.target(), Duration::from_millis(6));
        // Writes during a resync do not move the baseline; 5 ms is below
        // the 6 ms target, 7 ms above it.
        let t0 = Instant::now();
        c.tick(t0);
        let before = c.rate_bytes_per_s();
        c.app_write_done(Duration::from_millis(7), 4096, true);
        c.tick(t0 + ADJUST_INTERVAL);
        assert!(c.rate_bytes_per_s() < before);
        assert_eq!(c.target(), Duration::from_millis(6));
        // A fast disk: never below the floor.
        for _ in 0..400 {
            c.app_write_done(Duration::from_micros(50), 4096, false);
        }
        assert_eq!(c.target(), AUTO_TARGET_MIN);
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

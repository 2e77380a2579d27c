//! The monotonic clock every lease is measured on: milliseconds since this
//! process first asked. Never wall-clock time, so clock jumps cannot stretch
//! or shorten a lease.

use std::sync::OnceLock;
use std::time::Instant;

static BASE: OnceLock<Instant> = OnceLock::new();

/// Milliseconds on this process's monotonic clock (starts near 0).
pub fn now_ms() -> u64 {
    let base = BASE.get_or_init(Instant::now);
    // +1 so that 0 can mean "never" in lease fields.
    base.elapsed().as_millis() as u64 + 1
}

/// Starts the clock now (call early: "process start" bounds leases granted
/// by an earlier incarnation of this process).
pub fn start() {
    let _ = now_ms();
}

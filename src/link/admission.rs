//! Who gets a QUIC handshake on a listening endpoint (the replication
//! port, the witness port), which anyone who can send UDP to it reaches
//! before any certificate is checked:
//! - address validation (QUIC Retry): an Initial from an address not yet
//!   validated gets a stateless Retry, so a spoofed flood costs the server
//!   one small packet each and no connection state;
//! - bounded state for connection attempts not yet handled;
//! - refused handshakes are logged at most once per 10 s, with the count
//!   held back, so a flood cannot fill the journal.

use std::time::Duration;

use crate::log_limit::LogLimit;

/// Connection attempts that may wait to be handled at once; more are
/// refused by quinn until some are done.
pub const INCOMING_MAX: usize = 256;
/// Bytes buffered per connection attempt before it is handled.
const INCOMING_BUFFER_BYTES: u64 = 64 << 10;
/// Bytes buffered for all connection attempts together.
const INCOMING_BUFFER_TOTAL_BYTES: u64 = 4 << 20;

/// Refused handshakes, per process.
static REFUSED_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));

/// Applies the bounds on connection attempts to a server config.
pub fn bound_incoming(server: &mut quinn::ServerConfig) {
    server
        .max_incoming(INCOMING_MAX)
        .incoming_buffer_size(INCOMING_BUFFER_BYTES)
        .incoming_buffer_size_total(INCOMING_BUFFER_TOTAL_BYTES);
}

/// The attempt, once its address is validated; None when it was answered
/// with a Retry (the client comes back with a token) or dropped.
pub fn validated(incoming: quinn::Incoming) -> Option<quinn::Incoming> {
    if incoming.remote_address_validated() {
        return Some(incoming);
    }
    if incoming.may_retry() {
        // (A Retry cannot fail for an attempt that may be retried.)
        let _ = incoming.retry();
    } else {
        // A second Retry for one attempt is a protocol violation: the
        // token did not validate, so the attempt goes unanswered.
        incoming.ignore();
    }
    None
}

/// Logs a refused handshake at warn, rate-limited (`what` says which).
pub fn log_refused(what: &str) {
    REFUSED_LOG.warn(|| what.to_string());
}

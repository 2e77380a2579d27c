//! blkrep: userspace synchronous block replication for Linux.
//!
//! Two nodes mirror a volume with protocol C semantics (a write completes
//! only when both disks have it) over a QUIC link with mutual TLS. The
//! architecture, one module per concern:
//!
//! - [`engine`]: the per-volume replication state machine (no I/O).
//! - [`meta`]: superblock, generation identifiers, dirty bitmap.
//! - [`store`]: the local disk through io_uring with O_DIRECT.
//! - [`link`]: the QUIC connection to the peer and its wire format.
//! - [`volume`]: the shell that runs one engine against store and link.
//! - [`frontend`]: how applications reach a volume (NBD; ublk).
//! - [`control`]: the daemon's Unix control socket and its typed requests.
//! - [`quorum`]: the witness record as nodes see it, leases (no I/O).
//! - [`witness`]: the witness service and a node's session with it.
//! - [`log_limit`]: rate limits for log lines outsiders can cause.
//! - [`access`]: who may use the daemon's Unix sockets (control, NBD).
//! - [`config`], [`cert`], [`daemon`]: configuration, certificates, the agent.

pub mod access;
pub mod bench;
pub mod cert;
pub mod config;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod engine;
pub mod frontend;
mod layering;
pub mod link;
pub mod log_limit;
pub mod meta;
pub mod quorum;
pub mod resync;
pub mod store;
pub mod testkit;
pub mod units;
pub mod volume;
pub mod witness;

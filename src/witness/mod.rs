//! The witness: a small service on a third machine that keeps, durably,
//! one record per volume (`{epoch, primary, up_to_date}`), changes it only by
//! compare-and-set on the epoch, and grants primary leases renewed by
//! heartbeats. Data nodes talk to it over QUIC with mutual TLS (same cluster
//! CA as the replication link).
//!
//! - [`arbiter`]: the decisions (pure state machine, time passed in);
//! - [`store`]: the durable record files;
//! - [`protocol`]: messages and framing;
//! - [`server`]: the QUIC service (`blkrep witness`);
//! - [`client`]: the data node's session (heartbeats, changes).
//!
//! A witness that lost its disk starts empty and refuses every decision
//! until both nodes of a volume are connected to it and claim the same
//! record; then it adopts that record (with a higher epoch).

pub mod arbiter;
pub mod client;
pub mod protocol;
pub mod server;
pub mod store;

use std::time::Duration;

pub use arbiter::{Arbiter, record_key};
pub use client::WitnessClient;
pub use protocol::{ChangeOutcome, Claim, Refusal, WitnessOp};
pub use server::WitnessServer;

/// Witness errors (both sides).
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    /// TLS material.
    #[error(transparent)]
    Tls(#[from] crate::link::tls::TlsError),
    /// The record store.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// Endpoint setup.
    #[error("cannot set up the witness endpoint on {addr}: {message}")]
    Setup {
        /// Address.
        addr: std::net::SocketAddr,
        /// Problem.
        message: String,
    },
    /// The witness cannot be reached or did not answer in time.
    #[error("witness unreachable: {0}")]
    Unreachable(String),
    /// A frame was malformed.
    #[error(transparent)]
    Frame(#[from] protocol::FrameError),
    /// The other side answered something unexpected.
    #[error("witness protocol error: {0}")]
    Protocol(String),
}

/// QUIC transport settings for witness sessions.
fn transport_config(lease_ms: u64) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_millis(lease_ms.max(500) * 2)) {
        t.max_idle_timeout(Some(idle));
    }
    t.keep_alive_interval(Some(Duration::from_millis((lease_ms / 4).max(50))));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(64));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t.initial_rtt(Duration::from_millis(5));
    t
}

/// Reads one frame (bounded) from a stream.
async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Vec<u8>, WitnessError> {
    let mut head = [0u8; 4];
    recv.read_exact(&mut head)
        .await
        .map_err(|e| WitnessError::Protocol(format!("reading frame: {e}")))?;
    let len = protocol::body_len(head)?;
    let mut frame = vec![0u8; 4 + len + 4];
    frame[..4].copy_from_slice(&head);
    recv.read_exact(&mut frame[4..])
        .await
        .map_err(|_| protocol::FrameError::Truncated)?;
    Ok(frame)
}

//! Quorum: the witness record as nodes see it, leases, and the policy for
//! losing quorum. Pure data and arithmetic (no I/O): the engine, the witness
//! arbiter and the simulator share it.
//!
//! The rules (DESIGN.md):
//! - rule 2: a primary completes writes without its peer only after the
//!   witness moved the peer out of `up_to_date`; reaching neither is a loss
//!   of quorum (suspend or fail I/O, never complete it);
//! - rule 3: promotion needs the witness's consent;
//! - rule 7: a primary serves I/O only while it holds a fresh lease from the
//!   witness or from its connected peer.

pub mod change;
pub mod clock;
pub mod lease;
pub mod record;

pub use change::WitnessOp;
pub use lease::LeaseSettings;
pub use record::{Holder, Record, RecordView};

/// What a primary does with I/O while it has lost quorum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoQuorumPolicy {
    /// I/O waits and resumes when quorum returns (the default: nothing fails,
    /// nothing is lost; the application sees a stall).
    #[default]
    Suspend,
    /// I/O fails with EIO (the application or its filesystem decides).
    IoError,
}

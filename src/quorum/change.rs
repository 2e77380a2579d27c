//! The changes of a witness record a node can ask for: what the engine
//! decides to ask (`Action::WitnessChange`), carried by the witness
//! protocol and applied by the arbiter.

/// A change a node asks for (each a compare-and-set on the epoch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WitnessOp {
    /// Make the requester primary (`force`: even if not up to date; starts a
    /// new data history and lists only the requester as up to date).
    Promote {
        /// Operator override of the up-to-date check (never of the lease).
        force: bool,
        /// The requester's copy is not known to be complete (Outdated or
        /// Inconsistent): with `force`, the record is marked forced even
        /// when it lists the requester (see `Record::forced`).
        #[serde(default)]
        incomplete: bool,
    },
    /// Move the peer out of `up_to_date` (rule 2); the requester must be
    /// the primary (or up to date while nobody is).
    Outdate,
    /// Put the peer back into `up_to_date` after it resynced.
    Restore,
    /// The requester is no longer primary.
    Demote,
}

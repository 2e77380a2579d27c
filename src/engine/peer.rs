//! What one node announces to its peer (`NodeView`), and the relations two
//! nodes can be in; which one they are in is decided in `negotiate`.

use crate::meta::{DiskState, Generations};

/// A node's role for one volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub enum Role {
    /// The writer: exports the volume to applications.
    Primary,
    /// Receives the primary's writes; exports nothing.
    Secondary,
}

/// The state a node announces to its peer for one volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeView {
    /// Role.
    pub role: Role,
    /// Local disk state.
    pub disk: DiskState,
    /// Generation identifiers.
    pub generations: Generations,
    /// Usable data size.
    pub data_bytes: u64,
    /// Bytes per bitmap chunk (the unit of `dirty_chunks` and of the dirty
    /// runs exchanged for a resync); 0 from a peer that does not say.
    #[serde(default)]
    pub chunk_bytes: u64,
    /// Set bits in the dirty bitmap.
    pub dirty_chunks: u64,
    /// Ready to receive a resync (disk persisted as Inconsistent).
    pub sync_target: bool,
    /// As the source of a full sync: the bitmap base generation under
    /// which every chunk not yet copied is durably marked (0: none). The
    /// target adopts it as its own, so that an interrupted full sync
    /// resumes as a bitmap resync instead of starting over.
    #[serde(default)]
    pub full_sync_base: u64,
    /// The witness record as this node last saw it.
    #[serde(default)]
    pub record: crate::quorum::RecordView,
    /// This copy lost power with writes no flush covered (found at
    /// attach): it may lack writes its peer acknowledged, so it syncs from
    /// a peer that did not lose them and promotes only once it did.
    #[serde(default)]
    pub cache_lost: bool,
    /// This node's disk may lose completed writes in a power cut until a
    /// flush covers them (false: declared power-loss protected, its
    /// acknowledgements are durable).
    #[serde(default = "volatile_by_default")]
    pub volatile_cache: bool,
}

fn volatile_by_default() -> bool {
    true
}

/// How this node relates to its connected peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relation {
    /// Same data history: writes are mirrored.
    InSync,
    /// This node copies its dirty chunks to the peer; once the peer is ready,
    /// application writes are mirrored too.
    SyncSource {
        /// The peer persisted itself as a sync target.
        target_ready: bool,
        /// Copy every chunk, not just the bitmap.
        full: bool,
    },
    /// This node receives a resync.
    SyncTarget,
    /// This node has no disk: every read and write goes to the peer.
    DisklessClient,
    /// The peer has no disk: this node holds the only copy.
    ServingDiskless,
    /// Neither node has data yet; an operator must choose the first primary.
    NoData,
    /// The histories diverged (split brain): nothing is synced automatically.
    Diverged,
    /// Connected but incompatible (reason given); nothing is mirrored.
    Refused(&'static str),
}

impl Relation {
    /// Name for status output.
    pub fn name(&self) -> &'static str {
        match self {
            Relation::InSync => "InSync",
            Relation::SyncSource {
                target_ready: false,
                ..
            } => "StartingSyncSource",
            Relation::SyncSource { .. } => "SyncSource",
            Relation::SyncTarget => "SyncTarget",
            Relation::DisklessClient => "DisklessClient",
            Relation::ServingDiskless => "ServingDiskless",
            Relation::NoData => "NoData",
            Relation::Diverged => "SplitBrain",
            Relation::Refused(_) => "Refused",
        }
    }
}

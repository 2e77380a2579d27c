//! What one node knows about its peer, and how two nodes relate once they
//! have exchanged their states.

use crate::meta::{DiskState, Generations, SyncDecision};

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

/// Decides the relation of `me` to `peer`. `tie_winner` breaks ties where
/// both sides hold dirty bits for the same history (it is true on exactly one
/// of the two nodes). `peer_dirty_known`: the peer sent the list of its dirty
/// chunks, so a source can resync the union of both bitmaps instead of
/// everything.
pub fn negotiate(
    me: &NodeView,
    peer: &NodeView,
    tie_winner: bool,
    peer_dirty_known: bool,
) -> Relation {
    use DiskState::*;
    if me.data_bytes != peer.data_bytes {
        return Relation::Refused("the peer's volume has a different size");
    }
    if me.chunk_bytes != peer.chunk_bytes {
        // Dirty bitmaps are exchanged in chunks: with another chunk size
        // a resync would copy the wrong ranges.
        return Relation::Refused(
            "the peer's volume has another chunk_bytes (bitmap granularity): configure the same on both nodes",
        );
    }
    if me.role == Role::Primary && peer.role == Role::Primary {
        return Relation::Refused("both nodes are primary");
    }
    match (me.disk, peer.disk) {
        (Diskless, Diskless) => return Relation::Refused("neither node has a disk"),
        (Diskless, UpToDate) => return Relation::DisklessClient,
        (Diskless, _) => {
            return Relation::Refused("this node is diskless and the peer is not up to date");
        }
        (UpToDate, Diskless) => return Relation::ServingDiskless,
        (_, Diskless) => {
            return Relation::Refused("the peer is diskless and this node is not up to date");
        }
        _ => {}
    }
    let source = |full| {
        // An Outdated copy (the witness's word) may still finish a resync
        // it started into an Inconsistent peer.
        if me.disk != UpToDate && !(me.disk == Outdated && peer.disk == Inconsistent) {
            Relation::Refused("this node has newer data but is not up to date")
        } else if peer.role == Role::Primary && peer.disk != Inconsistent {
            // (A primary on an Inconsistent copy forwards its I/O to this
            // node while the resync fills its copy.)
            Relation::Refused("the peer is primary but has older data")
        } else {
            Relation::SyncSource {
                target_ready: false,
                full,
            }
        }
    };
    let target = || {
        if peer.disk != UpToDate && !(peer.disk == Outdated && me.disk == Inconsistent) {
            Relation::Refused("the peer has newer data but is not up to date")
        } else if me.role == Role::Primary && me.disk != Inconsistent {
            Relation::Refused("this node is primary but the peer has newer data; demote it")
        } else {
            Relation::SyncTarget
        }
    };
    match me.generations.compare(&peer.generations) {
        SyncDecision::NoData => Relation::NoData,
        SyncDecision::Diverged => Relation::Diverged,
        SyncDecision::LocalAheadBitmap => source(peer.dirty_chunks > 0 && !peer_dirty_known),
        SyncDecision::LocalAheadFull => source(true),
        SyncDecision::PeerAheadBitmap | SyncDecision::PeerAheadFull => target(),
        SyncDecision::InSync => match (me.disk, peer.disk) {
            // Same history: the peer can only have become inconsistent as the
            // target of a resync from this history, whose remaining chunks
            // this node's bitmap still covers.
            (UpToDate, Inconsistent) => source(false),
            (Inconsistent, UpToDate) => target(),
            (Inconsistent, Inconsistent) => Relation::Refused("neither copy is consistent"),
            // The witness outdated a copy that holds the same generation as
            // one that lost power since: no write completed without it
            // (that starts a new generation, durably, first), so it holds
            // every acknowledged write, and the copy that lost power may
            // lack some. The outdated copy is the source (and up to date
            // again once the pair is in sync).
            // (Only without marks of its own: those may be chunks a resync
            // into it had still to copy.)
            (Outdated, UpToDate) if peer.cache_lost && !me.cache_lost && me.dirty_chunks == 0 => {
                if peer.dirty_chunks == 0 {
                    Relation::InSync
                } else {
                    Relation::SyncSource {
                        target_ready: false,
                        full: !peer_dirty_known,
                    }
                }
            }
            (UpToDate, Outdated) if me.cache_lost && !peer.cache_lost && peer.dirty_chunks == 0 => {
                if me.dirty_chunks == 0 {
                    Relation::InSync
                } else {
                    Relation::SyncTarget
                }
            }
            // The witness outdated one copy: the other is the source, for
            // the union of both bitmaps (the outdated one may carry
            // activity-log extents of a crash).
            (Outdated, UpToDate) => target(),
            (UpToDate, Outdated) => source(peer.dirty_chunks > 0 && !peer_dirty_known),
            // One copy lost power: it may lack writes the other still
            // holds (acknowledged, not yet flushed), and every region where
            // it may is in a bitmap (the other's marks of what it did not
            // see flushed, its own activity log). The copy that kept power
            // is the source, whatever the roles; no marks, nothing to copy.
            (UpToDate, UpToDate) if me.cache_lost != peer.cache_lost => {
                match (me.dirty_chunks > 0 || peer.dirty_chunks > 0, me.cache_lost) {
                    (false, _) => Relation::InSync,
                    (true, true) => target(),
                    (true, false) => source(peer.dirty_chunks > 0 && !peer_dirty_known),
                }
            }
            _ => match (me.dirty_chunks > 0, peer.dirty_chunks > 0) {
                (false, false) => Relation::InSync,
                // A primary's copy is the authoritative one: it holds every
                // write it completed, and with the same history nothing of
                // the secondary's is newer. So a secondary's dirty chunks
                // (e.g. a resync union it announced before the last one
                // finished) are copied from the primary, never to it.
                (true, false) if peer.role == Role::Primary => target(),
                (false, true) if me.role == Role::Primary => source(!peer_dirty_known),
                (true, false) => source(false),
                (false, true) => target(),
                (true, true) => {
                    let me_wins = match (me.role, peer.role) {
                        (Role::Primary, _) => true,
                        (_, Role::Primary) => false,
                        _ => tie_winner,
                    };
                    if me_wins {
                        source(!peer_dirty_known)
                    } else {
                        target()
                    }
                }
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(role: Role, disk: DiskState, current: u64) -> NodeView {
        NodeView {
            role,
            disk,
            generations: Generations {
                current,
                ..Default::default()
            },
            data_bytes: 1 << 20,
            chunk_bytes: 4096,
            dirty_chunks: 0,
            sync_target: false,
            full_sync_base: 0,
            record: Default::default(),
            cache_lost: false,
            volatile_cache: true,
        }
    }

    /// Dirty runs are exchanged in chunks: another chunk size is refused.
    #[test]
    fn another_chunk_size_is_refused() {
        let a = view(Role::Primary, DiskState::UpToDate, 5);
        let b = NodeView {
            chunk_bytes: 65536,
            ..view(Role::Secondary, DiskState::UpToDate, 5)
        };
        assert!(matches!(
            negotiate(&a, &b, true, true),
            Relation::Refused(_)
        ));
        assert!(matches!(
            negotiate(&b, &a, false, true),
            Relation::Refused(_)
        ));
    }

    #[test]
    fn equal_histories_mirror() {
        let a = view(Role::Primary, DiskState::UpToDate, 5);
        let b = view(Role::Secondary, DiskState::UpToDate, 5);
        assert_eq!(negotiate(&a, &b, true, false), Relation::InSync);
        assert_eq!(negotiate(&b, &a, false, false), Relation::InSync);
    }

    #[test]
    fn size_mismatch_and_two_primaries_are_refused() {
        let a = view(Role::Primary, DiskState::UpToDate, 5);
        let mut b = view(Role::Secondary, DiskState::UpToDate, 5);
        b.data_bytes += 4096;
        assert!(matches!(
            negotiate(&a, &b, true, false),
            Relation::Refused(_)
        ));
        let c = view(Role::Primary, DiskState::UpToDate, 5);
        assert!(matches!(
            negotiate(&a, &c, true, false),
            Relation::Refused(_)
        ));
    }

    #[test]
    fn primary_with_older_data_never_becomes_target() {
        let mut a = view(Role::Primary, DiskState::UpToDate, 5);
        let mut b = view(Role::Secondary, DiskState::UpToDate, 5);
        b.generations.start_tracking(9);
        assert!(matches!(
            negotiate(&a, &b, true, false),
            Relation::Refused(_)
        ));
        a.role = Role::Secondary;
        assert_eq!(negotiate(&a, &b, true, false), Relation::SyncTarget);
        assert_eq!(
            negotiate(&b, &a, false, false),
            Relation::SyncSource {
                target_ready: false,
                full: false
            }
        );
    }

    #[test]
    fn dirty_bits_on_both_sides_pick_one_source() {
        let mut a = view(Role::Secondary, DiskState::UpToDate, 5);
        let mut b = view(Role::Secondary, DiskState::UpToDate, 5);
        a.dirty_chunks = 3;
        b.dirty_chunks = 4;
        let ra = negotiate(&a, &b, true, false);
        let rb = negotiate(&b, &a, false, false);
        assert_eq!(
            ra,
            Relation::SyncSource {
                target_ready: false,
                full: true
            }
        );
        assert_eq!(rb, Relation::SyncTarget);
    }

    #[test]
    fn the_copy_that_kept_power_is_the_source_even_for_a_primary() {
        // A primary lost power and restarted as a secondary with its
        // activity log marked; the old secondary was promoted meanwhile
        // without writing (same generations).
        let mut lost = view(Role::Secondary, DiskState::UpToDate, 5);
        lost.cache_lost = true;
        lost.dirty_chunks = 2;
        let kept = view(Role::Primary, DiskState::UpToDate, 5);
        assert_eq!(negotiate(&lost, &kept, true, true), Relation::SyncTarget);
        assert_eq!(
            negotiate(&kept, &lost, false, true),
            Relation::SyncSource {
                target_ready: false,
                full: false
            }
        );
        // A secondary with marks of its own still takes the other's copy.
        let mut kept = view(Role::Secondary, DiskState::UpToDate, 5);
        kept.dirty_chunks = 1;
        lost.dirty_chunks = 0;
        assert_eq!(negotiate(&lost, &kept, true, true), Relation::SyncTarget);
        // Nothing marked anywhere: nothing was unflushed, nothing to copy.
        kept.dirty_chunks = 0;
        assert_eq!(negotiate(&lost, &kept, true, true), Relation::InSync);
    }
}

//! Negotiation: how two nodes relate once they have exchanged their states,
//! as pure functions over both views (and the witness record each holds)
//! that return a decision. `negotiate` decides from the generations (who
//! holds the newer history, bitmap or full resync, split brain);
//! `witness_direction` overrides it where the record says which copy holds
//! every acknowledged write. `Engine::renegotiate` (`relation`) applies the
//! decision; generations themselves compare in `crate::meta::generation`.

use super::peer::{NodeView, Relation, Role};
use crate::meta::{DiskState, SyncDecision};

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

/// When the witness record says exactly one side holds every
/// acknowledged write, that side is the resync source, whatever the
/// generations say: the other side never completed a write of its own
/// (rule 2), so overwriting its extra data loses nothing acknowledged.
/// Bitmap-based when the generations allow it, else a full sync.
///
/// Never across a forced promotion: when the two lineages were split by
/// one (`Generations::forced_apart`), the record names the forced copy
/// because the operator insisted, not because it holds every
/// acknowledged write, so diverged histories stay a split brain until
/// `resolve` picks the victim (rule 4).
pub fn witness_direction(
    me: &NodeView,
    peer: &NodeView,
    negotiated: Relation,
    witness: bool,
    tie_winner: bool,
    peer_dirty_known: bool,
) -> Option<Relation> {
    let rec = me.record;
    if !witness || rec.epoch == 0 {
        return None;
    }
    // (A record written by a forced promotion is no such proof either,
    // whatever the peer announced so far: its forced state may not be
    // durable, and so not announced, yet.)
    if rec.forced
        || (negotiated == Relation::Diverged && me.generations.forced_apart(&peer.generations))
    {
        return None;
    }
    // One copy lost power and the generations are the same: the record
    // may name it alone (an outdate that landed late, or before it
    // lost writes the other holds), but the copy that kept power holds
    // every acknowledged write (see `negotiate`).
    let kept_power_unmarked = if me.cache_lost {
        peer.dirty_chunks == 0
    } else {
        me.dirty_chunks == 0
    };
    if me.cache_lost != peer.cache_lost
        && kept_power_unmarked
        && me.generations.compare(&peer.generations) == crate::meta::SyncDecision::InSync
        && me.disk != DiskState::Inconsistent
        && peer.disk != DiskState::Inconsistent
    {
        return None;
    }
    // A copy left Inconsistent by an interrupted resync is finished
    // from the only consistent copy (it had no writes of its own since,
    // or the resync into it would not have started).
    if matches!(negotiated, Relation::Diverged | Relation::Refused(_)) {
        let consistent = |d: DiskState| matches!(d, DiskState::UpToDate | DiskState::Outdated);
        // (An Inconsistent primary forwards its I/O to its sync source.)
        if consistent(me.disk) && peer.disk == DiskState::Inconsistent {
            return Some(Relation::SyncSource {
                target_ready: false,
                full: true,
            });
        }
        if consistent(peer.disk) && me.disk == DiskState::Inconsistent {
            return Some(Relation::SyncTarget);
        }
    }
    if negotiated == Relation::Diverged
        && rec.me_up_to_date
        && rec.peer_up_to_date
        && me.disk == DiskState::UpToDate
        && peer.disk == DiskState::UpToDate
    {
        // Both hold every acknowledged write (neither outdated the
        // other, so neither completed a write alone): the histories
        // differ only in unacknowledged writes. Either copy will do,
        // but a copy that lost power may lack writes the other holds:
        // the one that kept power is the source. (That mark is durable
        // and the same in both views, so both sides decide alike; roles
        // may change between the two decisions, a fenced primary's
        // does.)
        let me_wins = match (me.cache_lost, peer.cache_lost, me.role, peer.role) {
            (false, true, ..) => true,
            (true, false, ..) => false,
            (_, _, Role::Primary, _) => true,
            (_, _, _, Role::Primary) => false,
            _ => tie_winner,
        };
        if !me_wins {
            return (me.role == Role::Secondary).then_some(Relation::SyncTarget);
        }
        let same_base =
            me.generations.bitmap != 0 && me.generations.bitmap == peer.generations.bitmap;
        return Some(Relation::SyncSource {
            target_ready: false,
            full: !(same_base && (peer_dirty_known || peer.dirty_chunks == 0)),
        });
    }
    if rec.me_up_to_date == rec.peer_up_to_date {
        return None;
    }
    // Never the target of a copy the witness outdated, never the source
    // when outdated (its disk state may just not say so yet).
    // Exception: a copy left Inconsistent by an interrupted resync from
    // the other one is finished from it (it never completed a write of
    // its own since, or its generations would have refused the resync).
    if rec.me_up_to_date && negotiated == Relation::SyncTarget && me.disk != DiskState::Inconsistent
    {
        return Some(Relation::Refused(
            "the peer is outdated at the witness; waiting for it to learn that",
        ));
    }
    if !rec.me_up_to_date
        && matches!(negotiated, Relation::SyncSource { .. })
        && peer.disk != DiskState::Inconsistent
    {
        return Some(Relation::Refused("this node is outdated at the witness"));
    }
    if !rec.me_up_to_date
        && peer.disk == DiskState::UpToDate
        && me.disk != DiskState::UpToDate
        && me.disk != DiskState::Diskless
        && me.role == Role::Secondary
    {
        // Already its target: stay one (a refusal now would fail the
        // chunks in flight).
        if negotiated == Relation::SyncTarget {
            return None;
        }
        // The peer's state predates this record: it may be changing
        // already (into our sync target, on the record it knew), and a
        // copy outdated by this record that became the target of a copy
        // now Inconsistent would wait for good. The peer adopts the
        // record from our next state and announces; we decide on that.
        if peer.record.epoch < rec.epoch {
            return Some(Relation::Refused(
                "waiting for the peer to learn the witness record",
            ));
        }
        return Some(Relation::SyncTarget);
    }
    if rec.me_up_to_date
        && me.disk == DiskState::UpToDate
        && peer.disk != DiskState::UpToDate
        && peer.disk != DiskState::Diskless
        && peer.role == Role::Secondary
    {
        if matches!(negotiated, Relation::SyncSource { .. }) {
            return None;
        }
        let bitmap_ok = matches!(
            me.generations.compare(&peer.generations),
            crate::meta::SyncDecision::LocalAheadBitmap
                | crate::meta::SyncDecision::PeerAheadBitmap
                | crate::meta::SyncDecision::InSync
        ) && (peer_dirty_known || peer.dirty_chunks == 0);
        return Some(Relation::SyncSource {
            target_ready: false,
            full: !bitmap_ok,
        });
    }
    None
}

#[cfg(test)]
mod tests;

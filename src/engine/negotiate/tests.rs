//! The negotiation's tests: the generations' cases, and a table with one
//! row per branch of the witness record's override.

use super::*;
use crate::meta::Generations;
use crate::quorum::RecordView;

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

/// The witness record as `me` sees it: epoch 7, who is listed up to date.
fn record(me_up_to_date: bool, peer_up_to_date: bool) -> RecordView {
    RecordView {
        epoch: 7,
        me_up_to_date,
        peer_up_to_date,
        ..Default::default()
    }
}

/// One row: both views, what `negotiate` said, and the override.
struct Row {
    what: &'static str,
    me: NodeView,
    peer: NodeView,
    negotiated: Relation,
    witness: bool,
    tie_winner: bool,
    peer_dirty_known: bool,
    want: Option<Relation>,
}

/// `me` and `peer` with the same record (each from its own side) and
/// generation 5 unless a row changes them.
fn row(what: &'static str, me_listed: bool, peer_listed: bool) -> Row {
    let mut me = view(Role::Secondary, DiskState::UpToDate, 5);
    let mut peer = view(Role::Secondary, DiskState::UpToDate, 5);
    me.record = record(me_listed, peer_listed);
    peer.record = me.record.swapped();
    Row {
        what,
        me,
        peer,
        negotiated: Relation::InSync,
        witness: true,
        tie_winner: false,
        peer_dirty_known: true,
        want: None,
    }
}

const SOURCE_FULL: Relation = Relation::SyncSource {
    target_ready: false,
    full: true,
};
const SOURCE_BITMAP: Relation = Relation::SyncSource {
    target_ready: false,
    full: false,
};

fn rows() -> Vec<Row> {
    let mut rows = Vec::new();

    // No say: no witness, no record, a forced record, a forced split
    // (each would make this listed copy the source of its outdated
    // peer otherwise).
    let unlisted_peer = |what| {
        let mut r = row(what, true, false);
        r.peer.disk = DiskState::Outdated;
        r.negotiated = Relation::Diverged;
        r
    };
    rows.push(Row {
        witness: false,
        ..unlisted_peer("no witness configured")
    });
    let mut r = unlisted_peer("no record seen yet");
    r.me.record.epoch = 0;
    rows.push(r);
    let mut r = unlisted_peer("a record written by a forced promotion");
    r.me.record.forced = true;
    rows.push(r);
    let mut r = unlisted_peer("histories split by a forced promotion");
    r.me.generations.current = 6;
    r.peer.generations.current = 8;
    r.peer.generations.forced = 8;
    rows.push(r);

    // Same generations, one copy lost power: the negotiation's
    // "copy that kept power" rule stands, whatever the record says.
    let mut r = row("the peer lost power, same generations", false, true);
    r.peer.cache_lost = true;
    r.negotiated = SOURCE_FULL;
    rows.push(r);

    // An interrupted resync is finished from the consistent copy.
    let mut r = row("the peer was left Inconsistent", true, false);
    r.peer.disk = DiskState::Inconsistent;
    r.negotiated = Relation::Diverged;
    r.want = Some(SOURCE_FULL);
    rows.push(r);
    let mut r = row("this copy was left Inconsistent", false, true);
    r.me.disk = DiskState::Inconsistent;
    r.negotiated = Relation::Refused("unrelated");
    r.want = Some(Relation::SyncTarget);
    rows.push(r);

    // Both listed up to date and diverged: either copy will do.
    let both = |what, me_lost, peer_lost, me_role, peer_role, tie, want| {
        let mut r = row(what, true, true);
        r.me.generations.current = 6;
        r.peer.generations.current = 8;
        r.negotiated = Relation::Diverged;
        r.me.cache_lost = me_lost;
        r.peer.cache_lost = peer_lost;
        r.me.role = me_role;
        r.peer.role = peer_role;
        r.tie_winner = tie;
        r.want = want;
        r
    };
    use Role::{Primary, Secondary};
    rows.push(both(
        "both listed, the peer lost power",
        false,
        true,
        Secondary,
        Primary,
        false,
        Some(SOURCE_FULL),
    ));
    rows.push(both(
        "both listed, this copy lost power",
        true,
        false,
        Secondary,
        Secondary,
        true,
        Some(Relation::SyncTarget),
    ));
    rows.push(both(
        "both listed, this primary lost power",
        true,
        false,
        Primary,
        Secondary,
        true,
        None,
    ));
    rows.push(both(
        "both listed, this node is primary",
        false,
        false,
        Primary,
        Secondary,
        false,
        Some(SOURCE_FULL),
    ));
    rows.push(both(
        "both listed, the peer is primary",
        false,
        false,
        Secondary,
        Primary,
        true,
        Some(Relation::SyncTarget),
    ));
    rows.push(both(
        "both listed, the tie winner",
        false,
        false,
        Secondary,
        Secondary,
        true,
        Some(SOURCE_FULL),
    ));
    rows.push(both(
        "both listed, the tie loser",
        false,
        false,
        Secondary,
        Secondary,
        false,
        Some(Relation::SyncTarget),
    ));
    let mut r = both(
        "both listed, a common bitmap base",
        false,
        false,
        Primary,
        Secondary,
        false,
        Some(SOURCE_BITMAP),
    );
    r.me.generations.bitmap = 5;
    r.peer.generations.bitmap = 5;
    rows.push(r);

    // Neither listed: the generations decide (were this copy outdated
    // by the record, it would be the target).
    let mut r = row("neither listed", false, false);
    r.me.disk = DiskState::Outdated;
    r.negotiated = Relation::Diverged;
    rows.push(r);

    // Never the target of a copy the witness outdated ...
    let mut r = row("this copy listed, told to be the target", true, false);
    r.negotiated = Relation::SyncTarget;
    r.want = Some(Relation::Refused(
        "the peer is outdated at the witness; waiting for it to learn that",
    ));
    rows.push(r);
    // ... never the source when outdated.
    let mut r = row("the peer listed, told to be the source", false, true);
    r.me.disk = DiskState::Outdated;
    r.negotiated = SOURCE_BITMAP;
    r.want = Some(Relation::Refused("this node is outdated at the witness"));
    rows.push(r);

    // Outdated by the record: the target of the listed copy.
    let outdated = |what, negotiated, peer_epoch, want| {
        let mut r = row(what, false, true);
        r.me.disk = DiskState::Outdated;
        r.me.generations.current = 8;
        r.negotiated = negotiated;
        r.peer.record.epoch = peer_epoch;
        r.want = want;
        r
    };
    rows.push(outdated(
        "outdated, already the target",
        Relation::SyncTarget,
        7,
        None,
    ));
    rows.push(outdated(
        "outdated, the peer knows the record",
        Relation::Diverged,
        7,
        Some(Relation::SyncTarget),
    ));
    rows.push(outdated(
        "outdated, the peer's state predates the record",
        Relation::Diverged,
        6,
        Some(Relation::Refused(
            "waiting for the peer to learn the witness record",
        )),
    ));

    // Listed: the source of an outdated peer, by bitmap when the
    // generations and the peer's runs allow it.
    let listed = |what, negotiated, peer_current, dirty_known, want| {
        let mut r = row(what, true, false);
        r.peer.disk = DiskState::Outdated;
        r.peer.generations.current = peer_current;
        r.peer.dirty_chunks = 3;
        r.negotiated = negotiated;
        r.peer_dirty_known = dirty_known;
        r.want = want;
        r
    };
    rows.push(listed(
        "listed, already the source",
        SOURCE_FULL,
        9,
        true,
        None,
    ));
    rows.push(listed(
        "listed, same generation, runs known",
        Relation::InSync,
        5,
        true,
        Some(SOURCE_BITMAP),
    ));
    rows.push(listed(
        "listed, same generation, runs unknown",
        Relation::InSync,
        5,
        false,
        Some(SOURCE_FULL),
    ));
    rows.push(listed(
        "listed, unrelated generations",
        Relation::Diverged,
        9,
        true,
        Some(SOURCE_FULL),
    ));
    rows
}

/// Every branch of the record's override, one row each.
#[test]
fn the_witness_record_overrides_the_generations_where_it_knows_better() {
    for r in rows() {
        let got = witness_direction(
            &r.me,
            &r.peer,
            r.negotiated,
            r.witness,
            r.tie_winner,
            r.peer_dirty_known,
        );
        assert_eq!(got, r.want, "{}", r.what);
    }
}

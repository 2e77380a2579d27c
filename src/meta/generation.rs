//! Data generation identifiers (rule 4): who is newer, what to resync, or
//! that the histories diverged.
//!
//! `current` names the data history this node's copy belongs to (0: no data
//! yet). When a node starts writing without its peer it moves `current` to
//! `bitmap` and takes a fresh `current`: from then on its dirty bitmap holds
//! exactly what the peer (still at `bitmap`) is missing. Older identifiers
//! move into `history`, so a node that is further behind is still recognised
//! (and fully synced) rather than mistaken for a split brain.
//!
//! `forced` marks a lineage that an operator started by force from a copy
//! that was not known to hold every acknowledged write. Two copies whose
//! `forced` differ diverged across that point: the forced copy may lack
//! acknowledged writes the other holds, so neither the witness's record nor
//! the forced copy's ancestry decides which one is overwritten; only an
//! explicit `resolve` does.

/// How many past identifiers are kept beyond `bitmap`.
pub const HISTORY_LEN: usize = 4;

/// The identifiers one node holds for one volume.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Generations {
    /// The data history this copy belongs to; 0 when the copy has no data yet.
    pub current: u64,
    /// The peer's generation when this node started tracking changes in its
    /// bitmap; 0 when the bitmap tracks nothing.
    pub bitmap: u64,
    /// Older identifiers, newest first.
    pub history: [u64; HISTORY_LEN],
    /// The first identifier of the newest history in this copy's lineage
    /// that was forced from a copy not known to be complete (0: none). It
    /// stays while that lineage continues (tracking, resyncs from it) and
    /// is replaced only by the next forced history or by a resync from a
    /// copy of another lineage.
    #[serde(default)]
    pub forced: u64,
}

/// What to do when two nodes meet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncDecision {
    /// Same history; nothing to copy beyond what the bitmaps say.
    InSync,
    /// This node is newer; its bitmap covers what the peer lacks.
    LocalAheadBitmap,
    /// This node is newer; the peer is too far behind: copy everything.
    LocalAheadFull,
    /// The peer is newer; its bitmap covers what this node lacks.
    PeerAheadBitmap,
    /// The peer is newer and this node needs everything.
    PeerAheadFull,
    /// Neither node has data yet; an operator must pick the first primary.
    NoData,
    /// Both wrote independently (split brain): never synced automatically.
    Diverged,
}

impl Generations {
    /// A fresh identifier that is never 0.
    pub fn fresh_id(entropy: u64) -> u64 {
        // splitmix64 finaliser: spreads clock/pid entropy over all bits.
        let mut z = entropy.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        z.max(1)
    }

    /// Starts a new data history because this node writes without its peer:
    /// the old `current` becomes the bitmap base. Keeps an existing bitmap
    /// base (the peer is still at that one).
    pub fn start_tracking(&mut self, new_id: u64) {
        if self.bitmap == 0 {
            self.bitmap = self.current;
        } else {
            self.push_history(self.current);
        }
        self.current = new_id;
    }

    /// A forced new history (forced promotion of a copy that is not known to be
    /// up to date), marked `forced`. It keeps no older identifiers: the copy
    /// may lack writes of any of them (an Inconsistent copy is a mix of its
    /// old generation and part of a resync; an Outdated one may have missed
    /// writes its peer acknowledged under a generation the copy still
    /// lists), so it is the descendant of nothing and meets every copy with
    /// data as a diverged one, which only `resolve` settles (rule 4). A
    /// blank copy (generation 0) is still fully synced from it.
    pub fn start_new_history(&mut self, new_id: u64) {
        self.history = [0; HISTORY_LEN];
        self.bitmap = 0;
        self.current = new_id;
        self.forced = new_id;
    }

    /// Whether this copy and `peer` belong to lineages split by a forced
    /// promotion (one of them, or each, forced a history the other does not
    /// share). Their divergence then may hide acknowledged writes on both
    /// sides, whatever the witness recorded after the force.
    pub fn forced_apart(&self, peer: &Generations) -> bool {
        self.forced != peer.forced
    }

    /// After this node fully synced its peer: the bitmap tracks nothing.
    pub fn sync_source_done(&mut self) {
        if self.bitmap != 0 {
            self.push_history(self.bitmap);
            self.bitmap = 0;
        }
    }

    /// After this node received a complete resync from `source`.
    pub fn sync_target_done(&mut self, source: &Generations) {
        *self = Generations {
            current: source.current,
            bitmap: 0,
            history: source.history,
            forced: source.forced,
        };
        if source.bitmap != 0 {
            self.push_history(source.bitmap);
        }
    }

    /// The peer is known to be at `id`, a generation of this history newer
    /// than the bitmap base, and the bitmap holds every change since `id`
    /// (the caller's proof): make `id` the bitmap base, so that the peer
    /// gets a bitmap resync instead of a full one. Returns whether it did.
    pub fn rebase(&mut self, id: u64) -> bool {
        if self.bitmap == 0 || self.bitmap == id || id == self.current {
            return false;
        }
        let Some(pos) = self.history.iter().position(|h| *h == id) else {
            return false;
        };
        // Drop `id` from the history, keep the order of the rest.
        self.history[pos..].rotate_left(1);
        self.history[HISTORY_LEN - 1] = 0;
        let old = self.bitmap;
        self.bitmap = id;
        self.push_history(old);
        true
    }

    fn push_history(&mut self, id: u64) {
        if id == 0 || self.history.contains(&id) {
            return;
        }
        self.history.rotate_right(1);
        self.history[0] = id;
    }

    fn knows(&self, id: u64) -> bool {
        id != 0 && (self.bitmap == id || self.history.contains(&id))
    }

    /// Compares this node's identifiers with the peer's.
    pub fn compare(&self, peer: &Generations) -> SyncDecision {
        match (self.current, peer.current) {
            (0, 0) => SyncDecision::NoData,
            (_, 0) => SyncDecision::LocalAheadFull,
            (0, _) => SyncDecision::PeerAheadFull,
            (a, b) if a == b => SyncDecision::InSync,
            (_, b) if self.bitmap == b => SyncDecision::LocalAheadBitmap,
            (a, _) if peer.bitmap == a => SyncDecision::PeerAheadBitmap,
            (_, b) if self.knows(b) => SyncDecision::LocalAheadFull,
            (a, _) if peer.knows(a) => SyncDecision::PeerAheadFull,
            _ => SyncDecision::Diverged,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(current: u64) -> Generations {
        Generations {
            current,
            ..Default::default()
        }
    }

    #[test]
    fn rebase_turns_a_full_resync_into_a_bitmap_one() {
        let mut a = g(10);
        a.start_tracking(11); // base 10
        a.start_tracking(12); // 11 into history
        let peer = g(11);
        assert_eq!(a.compare(&peer), SyncDecision::LocalAheadFull);
        assert!(a.rebase(11));
        assert_eq!(a.bitmap, 11);
        assert!(a.history.contains(&10) && !a.history.contains(&11));
        assert_eq!(a.compare(&peer), SyncDecision::LocalAheadBitmap);
        // Unknown ids, the current one and a missing base change nothing.
        assert!(!a.rebase(99) && !a.rebase(12) && !g(5).rebase(5));
    }

    #[test]
    fn fresh_nodes_have_no_data() {
        assert_eq!(g(0).compare(&g(0)), SyncDecision::NoData);
    }

    #[test]
    fn disconnect_and_write_gives_bitmap_resync_both_ways() {
        let mut a = g(10);
        let b = g(10);
        assert_eq!(a.compare(&b), SyncDecision::InSync);
        a.start_tracking(20);
        assert_eq!(a.compare(&b), SyncDecision::LocalAheadBitmap);
        assert_eq!(b.compare(&a), SyncDecision::PeerAheadBitmap);
        // A second disconnect before resync keeps the bitmap base.
        a.start_tracking(30);
        assert_eq!(a.compare(&b), SyncDecision::LocalAheadBitmap);
    }

    #[test]
    fn sync_done_makes_both_equal() {
        let mut a = g(10);
        let mut b = g(10);
        a.start_tracking(20);
        b.sync_target_done(&a);
        a.sync_source_done();
        assert_eq!(a.compare(&b), SyncDecision::InSync);
        assert_eq!(a, b);
    }

    #[test]
    fn both_writing_alone_is_split_brain() {
        let mut a = g(10);
        let mut b = g(10);
        a.start_tracking(20);
        b.start_tracking(30);
        assert_eq!(a.compare(&b), SyncDecision::Diverged);
        assert_eq!(b.compare(&a), SyncDecision::Diverged);
    }

    #[test]
    fn far_behind_peer_gets_full_sync() {
        let mut a = g(10);
        let b = g(10);
        a.start_tracking(20);
        let mut c = a;
        let mut a2 = a;
        a2.sync_source_done(); // synced some other node; bitmap base 10 now history
        c.current = 20;
        assert_eq!(a2.compare(&b), SyncDecision::LocalAheadFull);
        assert_eq!(b.compare(&a2), SyncDecision::PeerAheadFull);
        c.start_new_history(99);
        assert_eq!(c.compare(&a2), SyncDecision::Diverged);
    }

    #[test]
    fn a_forced_copy_is_the_ancestor_of_nothing() {
        // An Inconsistent copy at the complete copy's own generation (a
        // same-history resync into it was interrupted) is forced: it must
        // not pass for a descendant of the complete copy (that would make
        // it overwrite the complete copy with a full sync).
        let complete = g(10);
        let mut partial = g(10);
        partial.start_new_history(42);
        assert_eq!(partial.history, [0; HISTORY_LEN]);
        assert_eq!(partial.compare(&complete), SyncDecision::Diverged);
        assert_eq!(complete.compare(&partial), SyncDecision::Diverged);
        assert!(partial.forced_apart(&complete) && complete.forced_apart(&partial));
        // A fresh disk still gets a full sync from it, and the copy it
        // receives carries the forced lineage along.
        assert_eq!(partial.compare(&g(0)), SyncDecision::LocalAheadFull);
        let mut fresh = g(0);
        fresh.sync_target_done(&partial);
        assert!(!fresh.forced_apart(&partial));
        // Tracking continues the forced lineage.
        partial.start_tracking(43);
        assert_eq!(partial.forced, 42);
        // So does a forced Outdated copy: its older generations may lack
        // writes the other copy acknowledged.
        let mut outdated = g(10);
        outdated.start_tracking(11);
        outdated.start_new_history(50);
        assert_eq!(outdated.compare(&g(10)), SyncDecision::Diverged);
        assert_eq!(g(11).compare(&outdated), SyncDecision::Diverged);
    }

    #[test]
    fn fresh_ids_are_never_zero_and_differ() {
        assert_ne!(Generations::fresh_id(0), 0);
        assert_ne!(Generations::fresh_id(1), Generations::fresh_id(2));
    }
}

//! The checkers: rule 1 (no acknowledged write lost, P1 and P2 under power
//! cuts), rule 5 (no overlapping writes issued), rule 7 (one writer),
//! promotions only of a complete copy, reads return what was acknowledged,
//! and convergence after a heal.

use super::*;

impl Sim {
    /// A write of the peer lands on node `n`'s copy only while it is not
    /// writing on its own: as a secondary, or as a forwarding primary (its
    /// own writes wait for its sync source, see `Engine::forward`). One
    /// landing after a promotion could undo the new primary's writes.
    /// (A flush of the peer's may complete at any time: it writes nothing.)
    pub(super) fn check_replica_lands(&self, n: usize, data: &[(u64, u64)]) {
        let e = &self.nodes[n].eng;
        assert!(
            data.is_empty() || e.role == Role::Secondary || e.disk == DiskState::Inconsistent,
            "seed {}: a write of the peer landed on primary {n} (disk {:?}, relation {:?}, data {data:?}); log {:?}",
            self.seed,
            e.disk,
            e.status().relation,
            self.log.iter().rev().take(12).collect::<Vec<_>>()
        );
    }

    /// Rule 1: a completed write is on the writer's disk and on the peer's,
    /// unless the writer's persisted bitmap covers it.
    /// (`cut_since`: a node lost power since the write was submitted; the
    /// peer may have acknowledged it and lost it since: then the bitmap
    /// must cover it, and that peer may not promote until it synced.)
    pub(super) fn check_rule1(
        &self,
        n: usize,
        data: &[(u64, u64)],
        cut_since: bool,
        forced_since_ack: bool,
    ) {
        let w = &self.nodes[n];
        let p = &self.nodes[1 - n];
        for &(b, v) in data {
            assert_eq!(
                w.disk.get(&b).copied().unwrap_or(0),
                v,
                "rule 1: writer lacks block {b}; log {:?}",
                self.log
            );
            let covered = w.eng.bitmap.get(b * BLOCK / CHUNK);
            let on_peer = p.disk.get(&b).copied().unwrap_or(0) == v;
            // With a witness, completing without the peer needs the record
            // to have dropped the peer from up_to_date first (rule 2).
            // (A forced record lists the forced copy because the operator
            // said so, whatever the writer saw.)
            let peer_listed = self.witness.as_ref().is_some_and(|ws| {
                ws.latest
                    .as_ref()
                    .is_none_or(|r| r.up_to_date.contains(NAMES[1 - n]) && !r.forced)
            });
            assert!(
                on_peer || forced_since_ack || (covered && (!peer_listed || cut_since)),
                "rule 1: node {n} completed block {b} v{v}, neither on the peer nor in its bitmap; log {:?}",
                self.log
            );
        }
    }

    /// After a power cut: an acknowledged write that no up-to-date copy
    /// holds any more was lost by every node that held it, which only a
    /// write never flushed may be (P2); a flushed one never (P1). What is
    /// left is what must not be lost from here on.
    ///
    /// When the other node (`1 - n`) lost power too and has not synced
    /// since, both nodes that held an unflushed write lost power: it may be
    /// lost, whichever copy the resync then takes (only P1 holds for it).
    pub(super) fn account_power_loss(&mut self, n: usize) {
        // (Consistent copies: an Outdated one may still be the source of
        // a resync into an Inconsistent one.)
        let holders: Vec<usize> = (0..2)
            .filter(|&m| {
                matches!(
                    self.nodes[m].eng.disk,
                    DiskState::UpToDate | DiskState::Outdated
                )
            })
            .collect();
        let both_cut = self.nodes[1 - n].eng.status().cache_lost;
        for (b, acked) in self.acked.iter_mut() {
            let held: Vec<u64> = holders
                .iter()
                .map(|&m| self.nodes[m].disk.get(b).copied().unwrap_or(0) & !ZERO_FLAG)
                .collect();
            let have_max = held.iter().copied().max().unwrap_or(0);
            // (Both nodes held it and both lost power: whatever state each
            // copy is in now. One Inconsistent in memory only, as a sync
            // target whose state never became durable, is its old copy
            // again after a crash, and may become the source.)
            let have_min = (0..2)
                .map(|m| self.nodes[m].disk.get(b).copied().unwrap_or(0) & !ZERO_FLAG)
                .min()
                .unwrap_or(0);
            let promised = self.promised.get(b).copied().unwrap_or(0);
            if have_max < *acked {
                assert!(
                    have_max >= promised,
                    "P1: block {b} lost v{promised}, which a flush or FUA made durable (up-to-date copies have v{have_max}); seed {}, log {:?}",
                    self.seed,
                    self.log
                );
            }
            let keep = if both_cut {
                have_min.max(promised)
            } else {
                have_max
            };
            if keep < *acked {
                if self.forced.is_none() {
                    self.log.push(format!(
                        "unflushed v{acked} of block {b} may be lost: every holder lost power"
                    ));
                }
                *acked = keep;
            }
        }
    }

    /// P2 at a promotion: a node that becomes primary on its own copy
    /// holds every acknowledged write that is still held anywhere.
    pub(super) fn check_promoted(&mut self, n: usize) {
        self.last_primary = n;
        let e = &self.nodes[n].eng;
        // (Only where the cluster manager model is the careful one, with
        // power cuts: the older schedules put a restarted, possibly stale
        // node back without a witness, which the engine can only detect as
        // a split brain at the next connection.)
        if !self.power_cuts
            || self.forced.is_some()
            || e.role != Role::Primary
            || e.read_path() != ReadPath::Local
        {
            return;
        }
        for (b, v) in &self.acked {
            let have = self.nodes[n].disk.get(b).copied().unwrap_or(0) & !ZERO_FLAG;
            assert!(
                have >= *v,
                "P2: node {n} was promoted without acknowledged v{v} of block {b} (has v{have}); seed {}, log {:?}",
                self.seed,
                self.log
            );
        }
    }

    /// Until an explicit resolve, the copy that held every acknowledged
    /// write at the forced promotion is never overwritten: none of the
    /// forced lineage's writes reach it and nothing it held regresses.
    pub(super) fn check_complete_copy(&self) {
        let Some(f) = &self.forced else { return };
        let forced = &self.nodes[1 - f.complete];
        // Nor is the forced lineage dropped silently (rule 4 both ways).
        assert_eq!(
            forced.eng.gens.forced, f.forced_id,
            "seed {}: the forced copy left its lineage without a resolve; log {:?}",
            self.seed, self.log
        );
        let node = &self.nodes[f.complete];
        for (b, v) in &f.held {
            let have = node.disk.get(b).copied().unwrap_or(0) & !ZERO_FLAG;
            assert!(
                have >= *v,
                "seed {}: the complete copy lost acknowledged v{v} at block {b} (has v{have}); log {:?}",
                self.seed,
                self.log
            );
        }
    }

    /// Rule 7: a read served by a node returns nothing older than the last
    /// acknowledged write.
    pub(super) fn read_check(&mut self) {
        let n = self.rng.below(2) as usize;
        if self.serving(n) && self.nodes[n].eng.read_path() == ReadPath::Peer {
            return self.submit_read(n);
        }
        if !self.serving(n)
            || self.nodes[n].eng.disk != DiskState::UpToDate
            || self.forced.is_some()
        {
            return;
        }
        let block = self.rng.below(DATA_BYTES / BLOCK);
        let have = self.nodes[n].disk.get(&block).copied().unwrap_or(0) & !ZERO_FLAG;
        let acked = self.acked.get(&block).copied().unwrap_or(0);
        assert!(
            have >= acked,
            "rule 7: node {n} served block {block} at v{have}, older than acknowledged v{acked}; log {:?}",
            self.log
        );
    }
}

/// Rule 5: a node never has two overlapping data-changing ops issued at once.
pub(super) fn assert_no_overlap(pending: &[Pending], range: Range, op: Op, log: &[String]) {
    if !op.locks_range() {
        return;
    }
    for p in pending {
        if let Pending::Local {
            range: r,
            flush: None,
            ..
        } = p
        {
            assert!(
                !r.overlaps(&range),
                "rule 5: overlapping local writes issued; log {log:?}"
            );
        }
    }
}

/// Both copies in sync, equal (P3), with no marks left, and holding every
/// acknowledged write that must survive (P1, P2).
pub(super) fn check_converged(sim: &Sim, when: &str) {
    let seed = sim.seed;
    let (a, b) = (&sim.nodes[0], &sim.nodes[1]);
    assert_eq!(
        a.eng.status().relation,
        Some(Relation::InSync),
        "seed {seed}: not in sync {when};\n a {:?}\n b {:?}\n log {:?}",
        a.eng.status(),
        b.eng.status(),
        &sim.log
    );
    assert_eq!(
        b.eng.status().relation,
        Some(Relation::InSync),
        "seed {seed}: peer not in sync {when};\n a {:?}\n b {:?}\n log {:?}",
        a.eng.status(),
        b.eng.status(),
        &sim.log
    );
    assert_eq!(b.eng.disk, DiskState::UpToDate, "seed {seed} {when}");
    assert_eq!(
        norm(&a.disk),
        norm(&b.disk),
        "seed {seed}: replicas differ {when}; log {:?}",
        sim.log
    );
    assert_eq!(a.eng.bitmap.set_count(), 0, "seed {seed} {when}");
    assert_eq!(b.eng.bitmap.set_count(), 0, "seed {seed} {when}");
    for (block, version) in sim.acked.iter().chain(sim.promised.iter()) {
        let have = a.disk.get(block).copied().unwrap_or(0) & !ZERO_FLAG;
        assert!(
            have >= *version,
            "seed {seed}: acknowledged write v{version} to block {block} lost {when} (have v{have}); log {:?}",
            sim.log
        );
    }
}

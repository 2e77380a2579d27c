//! The workload: client writes, flushes and reads on the node that serves,
//! and the operator's (or cluster manager's) promotions, demotions and
//! forced promotions.

use super::*;

impl Sim {
    /// Rule 7: node `n` may serve I/O (primary with a fresh lease). Without
    /// a witness every primary serves.
    pub(super) fn serving(&self, n: usize) -> bool {
        // The peer's lease counts only while connected to it as a secondary
        // (a peer that became primary grants nothing).
        let peer_secondary = self.nodes[n]
            .eng
            .peer_view()
            .is_some_and(|v| v.role == Role::Secondary);
        self.nodes[n].eng.role == Role::Primary
            && self.witness.as_ref().is_none_or(|w| {
                w.witness_until[n] > w.now_ms || (peer_secondary && w.peer_until[n] > w.now_ms)
            })
    }

    /// A cluster manager tries to fail over to node `n`: it waits out the
    /// lease it granted its peer (rule 7), then asks the witness (rule 3).
    pub(super) fn failover(&mut self, n: usize) {
        let Some(w) = &self.witness else { return };
        if self.nodes[n].eng.role == Role::Primary
            || w.now_ms < LEASE.grantor_bound_ms(w.granted[n])
        {
            return;
        }
        self.witness_promote(n);
    }

    /// A read through the engine (a primary whose copy is still being
    /// resynced reads from its sync source); checked at completion.
    /// Client requests node `n`'s engine holds (the simulated client has
    /// `CLIENT_REQUESTS_MAX` permits, as the shell's clients do).
    fn client_requests(&self, n: usize) -> usize {
        let table = &self.nodes[n].eng.table.requests;
        table
            .iter()
            .filter(|(id, r)| **id < INTERNAL_ID_BASE && !r.from_peer)
            .count()
    }

    pub(super) fn submit_read(&mut self, n: usize) {
        if !self.nodes[n].eng.exported() || self.client_requests(n) >= CLIENT_REQUESTS_MAX {
            return;
        }
        let block = self.rng2.below(DATA_BYTES / BLOCK);
        let id = self.next_id;
        self.next_id += 1;
        let acked = self.acked.get(&block).copied().unwrap_or(0);
        self.nodes[n].reads.insert(id, (block, acked));
        self.log.push(format!("r{id}@{block} on {n}"));
        self.nodes[n]
            .eng
            .submit(id, Op::Read, Range::new(block * BLOCK, BLOCK));
        self.drain(n);
    }

    /// A cluster manager moves the primary role to the node that is being
    /// resynced, while its source is connected: the old primary demotes,
    /// the sync target promotes and serves through its source until its own
    /// copy is complete.
    pub(super) fn promote_sync_target(&mut self) -> bool {
        // (A target whose Inconsistent state is not durable yet would be
        // refused; the cluster manager keeps the old primary then.)
        let Some(t) = (0..2).find(|&i| {
            self.nodes[i].eng.role == Role::Secondary
                && self.nodes[i].eng.status().relation == Some(Relation::SyncTarget)
                && self.nodes[i].eng.durable.0 == DiskState::Inconsistent
        }) else {
            return false;
        };
        let s = 1 - t;
        if self.nodes[s].eng.role == Role::Primary {
            // The application stops first: what it has in flight finishes.
            for _ in 0..200 {
                if self.nodes[s].eng.status().inflight_requests == 0 {
                    break;
                }
                for n in 0..2 {
                    self.deliver(n);
                    self.complete_local(n);
                    self.persist_meta(n);
                }
            }
            if !matches!(
                self.nodes[s].eng.status().relation,
                Some(Relation::SyncSource { .. })
            ) {
                return true;
            }
            if self.demote(s).is_err() {
                return false;
            }
            self.log.push(format!("demote {s}"));
            self.drain(s);
            if let Some(w) = &mut self.witness
                && w.reach[s]
            {
                let epoch = self.nodes[s].eng.record().epoch;
                let (o, _) =
                    w.arb
                        .change(NAMES[s], w.now_ms, "v", NAMES[t], epoch, WitnessOp::Demote);
                w.note();
                if let ChangeOutcome::Done(r) = o {
                    let view = RecordView::of(&r, NAMES[s], NAMES[t]);
                    self.nodes[s].eng.witness_record(view);
                    self.drain(s);
                }
            }
        }
        // The target hears of the demotion.
        for _ in 0..64 {
            if !self.nodes[t].eng.peer_is_primary() || self.nodes[t].inbox.is_empty() {
                break;
            }
            self.deliver(t);
        }
        let promoted = if self.witness.is_some() {
            self.witness_promote(t)
        } else {
            let ok = self.nodes[t].eng.promote(false).is_ok();
            self.drain(t);
            ok
        };
        if promoted {
            self.cov.promotions += 1;
            self.last_primary = t;
            self.log.push(format!("promoted sync target {t}"));
        } else if self.witness.is_none() && self.nodes[s].eng.promote(false).is_ok() {
            // Without a witness the cluster manager puts the old primary
            // back (with one, its failover logic decides later).
            self.log.push(format!("promote {s} again"));
            self.drain(s);
            self.check_promoted(s);
        }
        true
    }

    /// Scripted tests: primary `n` writes version `v` of `block` and
    /// everything settles (the write is acknowledged).
    /// Node `n`'s client writes a new version of `block` (submitted, its
    /// first actions executed); the version.
    pub(super) fn start_write(&mut self, n: usize, block: u64, fua: bool) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.next_version += 1;
        let v = self.next_version;
        self.nodes[n].payload.insert(id, vec![(block, v)]);
        if fua {
            self.fua_writes.insert(id);
        }
        self.nodes[n]
            .eng
            .submit(id, Op::Write { fua }, Range::new(block * BLOCK, BLOCK));
        self.drain(n);
        v
    }

    pub(super) fn write_block(&mut self, n: usize, block: u64, fua: bool) -> u64 {
        let v = self.start_write(n, block, fua);
        self.run_until_quiet();
        assert!(
            self.acked.get(&block) == Some(&v),
            "the write was acknowledged"
        );
        v
    }

    /// Scripted tests: a client flush on primary `n`, settled.
    pub(super) fn flush(&mut self, n: usize) {
        let id = self.next_id;
        self.next_id += 1;
        self.flushes.insert(id, self.acked.clone());
        self.nodes[n].eng.submit(id, Op::Flush, Range::new(0, 0));
        self.drain(n);
        self.run_until_quiet();
        assert!(!self.flushes.contains_key(&id), "the flush completed");
    }

    /// Demotes node `n` as the shell does: while it flushes what it
    /// completed on both copies, everything runs on and it retries.
    pub(super) fn demote(&mut self, n: usize) -> Result<(), DemoteError> {
        for _ in 0..1000 {
            match self.nodes[n].eng.demote() {
                Ok(_) => {
                    self.drain(n);
                    return Ok(());
                }
                Err(DemoteError::Flushing(_)) => {
                    self.drain(n);
                    for m in 0..2 {
                        self.deliver(m);
                        self.complete_local(m);
                        self.persist_meta(m);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        panic!(
            "node {n} never finished flushing to demote; log {:?}",
            self.log
        )
    }

    pub(super) fn submit_write(&mut self) {
        let first = self.rng.below(2) as usize;
        let n = if self.serving(first) {
            first
        } else {
            1 - first
        };
        // Clients reach a primary only once it exports the volume.
        if !self.serving(n) || !self.nodes[n].eng.exported() {
            return;
        }
        if self.nodes[n].eng.role != Role::Primary
            || self.nodes[n].payload.len() > 16
            || self.client_requests(n) >= CLIENT_REQUESTS_MAX
        {
            return;
        }
        if self.power_cuts && self.rng2.below(6) == 0 {
            // A client flush: what was acknowledged until now becomes
            // durable once it completes (P1).
            let id = self.next_id;
            self.next_id += 1;
            self.flushes.insert(id, self.acked.clone());
            self.log.push(format!("f{id}"));
            self.nodes[n].eng.submit(id, Op::Flush, Range::new(0, 0));
            self.drain(n);
            return;
        }
        let first = self.rng.below(DATA_BYTES / BLOCK - 4);
        let count = 1 + self.rng.below(4);
        let range = Range::new(first * BLOCK, count * BLOCK);
        let id = self.next_id;
        self.next_id += 1;
        let zeroes = self.rng.below(10) == 0;
        let data: Vec<(u64, u64)> = blocks(range)
            .map(|b| {
                self.next_version += 1;
                (
                    b,
                    if zeroes {
                        self.next_version | ZERO_FLAG
                    } else {
                        self.next_version
                    },
                )
            })
            .collect();
        self.nodes[n].payload.insert(id, data);
        let op = if zeroes {
            Op::Zeroes { fua: false }
        } else {
            Op::Write {
                fua: self.rng.below(4) == 0,
            }
        };
        self.log.push(format!("w{id}@{first}+{count}"));
        if !op.volatile_write() {
            self.fua_writes.insert(id);
        }
        self.write_cuts.insert(id, self.cov.power_cuts);
        self.nodes[n].eng.submit(id, op, range);
        self.drain(n);
    }

    /// An operator forces an incomplete copy while the complete one is
    /// away (cut off; with a witness, its leases have run out): the
    /// scenario of issue 18. True when the promotion happened.
    pub(super) fn try_force(&mut self) -> bool {
        if self.connected || self.forced.is_some() {
            return false;
        }
        let Some(f) = (0..2).find(|&i| {
            self.nodes[i].eng.role == Role::Secondary
                && matches!(
                    self.nodes[i].eng.disk,
                    DiskState::Outdated | DiskState::Inconsistent
                )
        }) else {
            return false;
        };
        let c = 1 - f;
        let holds =
            |b: &u64, v: &u64| self.nodes[c].disk.get(b).copied().unwrap_or(0) & !ZERO_FLAG >= *v;
        if !self.acked.iter().all(|(b, v)| holds(b, v)) {
            return false;
        }
        let held = self.acked.clone();
        if self
            .witness
            .as_ref()
            .is_some_and(|w| w.arb.record(&key()).is_none())
        {
            // A witness that lost its disk would start a record for the
            // forced copy at an epoch the complete copy may have seen
            // already: the nodes then ignore the witness's answers and
            // writes stay frozen (safe, but stuck). Known, not modelled.
            return false;
        }
        if let Some(w) = &mut self.witness {
            // The complete copy's leases run out (it is away), then the
            // witness takes the forced promotion.
            let bound = LEASE
                .grantor_bound_ms(w.granted[f])
                .max(w.arb.lease_bound_ms(NAMES[c]))
                .max(w.witness_until[c])
                .max(w.peer_until[c]);
            w.now_ms = w.now_ms.max(bound) + 1;
            w.reach[f] = true;
            let mut epoch = self.nodes[f].eng.record().epoch;
            let mut granted = None;
            for _ in 0..3 {
                let (o, _) = w.arb.change(
                    NAMES[f],
                    w.now_ms,
                    "v",
                    NAMES[c],
                    epoch,
                    WitnessOp::Promote {
                        force: true,
                        incomplete: self.nodes[f].eng.promotion_is_forced(),
                    },
                );
                w.note();
                match o {
                    ChangeOutcome::Done(r) => {
                        granted = Some(r);
                        break;
                    }
                    ChangeOutcome::Conflict(r) => epoch = r.epoch,
                    _ => break,
                }
            }
            let Some(r) = granted else {
                return false;
            };
            self.nodes[f]
                .eng
                .witness_record(RecordView::of(&r, NAMES[f], NAMES[c]));
            self.drain(f);
        }
        self.land_replicas_before_promoting(f);
        if self.nodes[f].eng.promote(true).is_err() {
            return false;
        }
        self.log.push(format!("forced promotion of {f}"));
        self.drain(f);
        self.forced = Some(ForcedRun {
            complete: c,
            forced_id: self.nodes[f].eng.gens.forced,
            held,
        });
        true
    }
}

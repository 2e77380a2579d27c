//! The witness in the simulation: the real arbiter on virtual time, change
//! requests queued and answered in random order, per-node reachability,
//! heartbeats and the leases of rule 7.

use super::*;

impl Sim {
    /// Promotion through the witness (rule 3); true when it happened.
    pub(super) fn witness_promote(&mut self, n: usize) -> bool {
        let reachable = self.witness.as_ref().is_some_and(|w| w.reach[n]);
        // Connected but the peer's role not known yet: the shell waits.
        let peer_unknown = self.connected && self.nodes[n].eng.peer_view().is_none();
        if !reachable || peer_unknown || self.nodes[n].eng.promote_check(false).is_err() {
            return false;
        }
        let mut epoch = self.nodes[n].eng.record().epoch;
        for _ in 0..2 {
            let Some(w) = &mut self.witness else {
                return false;
            };
            let (o, _) = w.arb.change(
                NAMES[n],
                w.now_ms,
                "v",
                NAMES[1 - n],
                epoch,
                WitnessOp::Promote {
                    force: false,
                    incomplete: false,
                },
            );
            w.note();
            match o {
                ChangeOutcome::Done(r) => {
                    let view = RecordView::of(&r, NAMES[n], NAMES[1 - n]);
                    self.nodes[n].eng.witness_record(view);
                    self.land_replicas_before_promoting(n);
                    if self.nodes[n].eng.promote(false).is_ok() {
                        self.log.push(format!("witness promote {n}"));
                        self.drain(n);
                        self.check_promoted(n);
                        return true;
                    }
                    self.drain(n);
                    return false;
                }
                ChangeOutcome::Conflict(r) => {
                    epoch = r.epoch;
                    let view = RecordView::of(&r, NAMES[n], NAMES[1 - n]);
                    self.nodes[n].eng.witness_record(view);
                    self.drain(n);
                }
                _ => return false,
            }
        }
        false
    }

    /// One witness event: a queued change, a heartbeat, a retry tick, a
    /// reachability change, a restart or (rarely) a lost witness disk.
    pub(super) fn witness_event(&mut self) {
        let pick = self.rng.below(40);
        let n = self.rng.below(2) as usize;
        let Some(w) = &mut self.witness else { return };
        w.now_ms += self.rng.below(50);
        match pick {
            0..=15 => self.witness_deliver(),
            16..=25 => self.heartbeat(n),
            26..=31 if self.connected && pick % 2 == 0 => {
                // A lease ping round trip on the link (rule 7).
                w.peer_until[n] = LEASE.holder_until_ms(w.now_ms);
                w.granted[1 - n] = w.now_ms;
            }
            26..=31 => {
                self.nodes[n].eng.tick();
                self.drain(n);
            }
            32..=33 if pick == 32 => self.failover(n),
            32..=35 => {
                w.reach[n] = !w.reach[n];
                self.log.push(format!("witness reach {n} {}", w.reach[n]));
            }
            36..=37 => {
                let records = w.arb.records().clone();
                w.arb = Arbiter::new(Default::default(), &members(), w.now_ms, records);
                self.log.push("witness restart".into());
            }
            38 if self.rng.below(8) == 0 => {
                w.arb = Arbiter::new(Default::default(), &members(), w.now_ms, BTreeMap::new());
                self.log.push("witness disk lost".into());
            }
            _ => w.now_ms += 500,
        }
    }

    pub(super) fn witness_deliver(&mut self) {
        let Some(w) = &mut self.witness else { return };
        let Some((n, op, epoch)) = w.queue.pop_front() else {
            return;
        };
        let view = if w.reach[n] {
            let (o, _) = w
                .arb
                .change(NAMES[n], w.now_ms, "v", NAMES[1 - n], epoch, op);
            w.note();
            match o {
                ChangeOutcome::Done(r) | ChangeOutcome::Conflict(r) => {
                    Some(RecordView::of(&r, NAMES[n], NAMES[1 - n]))
                }
                _ => None,
            }
        } else {
            None
        };
        self.log.push(format!("witness {op:?} from {n}: {view:?}"));
        self.nodes[n].eng.witness_change_done(view);
        self.drain(n);
    }

    pub(super) fn heartbeat(&mut self, n: usize) {
        let Some(w) = &mut self.witness else { return };
        if !w.reach[n] {
            return;
        }
        let (view, primary_now) = self.nodes[n].eng.claim();
        let claim = Claim {
            volume: "v".into(),
            peer: NAMES[1 - n].into(),
            view,
            primary_now,
        };
        let (answers, _) = w.arb.heartbeat(NAMES[n], w.now_ms, &[claim]);
        w.note();
        if answers.first().is_some_and(|a| a.lease) {
            w.witness_until[n] = LEASE.holder_until_ms(w.now_ms);
        }
        if let Some(r) = answers.first().and_then(|a| a.record.clone()) {
            self.nodes[n]
                .eng
                .witness_record(RecordView::of(&r, NAMES[n], NAMES[1 - n]));
            self.drain(n);
        }
    }
}

/// The witness in the simulation: the real arbiter, a queue of change
/// requests, per-node reachability, and virtual time.
pub(super) struct WitnessSim {
    pub(super) arb: Arbiter,
    pub(super) reach: [bool; 2],
    pub(super) queue: VecDeque<(usize, WitnessOp, u64)>,
    pub(super) now_ms: u64,
    /// The newest record the witness ever held (it survives a lost disk in
    /// the nodes' superblocks).
    pub(super) latest: Option<crate::quorum::Record>,
    /// Per node: the primary lease from the witness runs until then.
    pub(super) witness_until: [u64; 2],
    /// Per node: the lease from the peer runs until then.
    pub(super) peer_until: [u64; 2],
    /// Per node: when it last granted its peer a lease.
    pub(super) granted: [u64; 2],
}

impl WitnessSim {
    /// Keeps the newest record the witness held.
    pub(super) fn note(&mut self) {
        if let Some(r) = self.arb.record(&key())
            && self.latest.as_ref().is_none_or(|l| r.epoch >= l.epoch)
        {
            self.latest = Some(r.clone());
        }
    }
}

pub(super) const LEASE: crate::quorum::LeaseSettings = crate::quorum::LeaseSettings {
    lease_ms: 2000,
    drift_permille: 50,
    margin_ms: 100,
};

/// The witness's data nodes.
pub(super) fn members() -> Vec<String> {
    NAMES.iter().map(|n| n.to_string()).collect()
}

pub(super) fn key() -> String {
    record_key("v", NAMES[0], NAMES[1])
}

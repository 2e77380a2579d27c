//! The witness's decisions: a deterministic state machine over the durable
//! records, the claims of a re-initialised witness, and the leases it
//! granted. Time is passed in (monotonic milliseconds); it does no I/O. The
//! server persists every changed record (fsync) before it answers.

use std::collections::{BTreeMap, BTreeSet};

use super::protocol::{
    ChangeOutcome, Claim, HEARTBEAT_CLAIMS_MAX, Refusal, VolumeAnswer, WitnessOp, WitnessRequest,
    WitnessResponse,
};
use crate::quorum::record::EPOCH_MAX;
use crate::quorum::{LeaseSettings, Record};

/// The storage key of a volume's record: the volume name and its two nodes
/// (one witness serves many node pairs; names may repeat across pairs).
pub fn record_key(volume: &str, a: &str, b: &str) -> String {
    let (x, y) = if a <= b { (a, b) } else { (b, a) };
    format!("{volume}@{x}+{y}")
}

/// A record that changed and must be made durable before answering.
pub type Changed = Option<(String, Record)>;

/// Volumes (records, and records being learnt) the witness holds per node
/// pair: what a node can make it store, in files and in memory.
pub const VOLUMES_PER_PAIR_MAX: usize = 10_000;

/// The witness state machine.
pub struct Arbiter {
    settings: LeaseSettings,
    /// The data nodes it serves (its config's `nodes`): a request naming
    /// another node as the peer is refused.
    members: BTreeSet<String>,
    started_ms: u64,
    records: BTreeMap<String, Record>,
    /// Learning: per key, each node's claimed record and when it said so.
    claims: BTreeMap<String, BTreeMap<String, (Record, u64)>>,
    /// The last time each node was granted a primary lease.
    granted_ms: BTreeMap<String, u64>,
}

impl Arbiter {
    /// A witness serving `members`, started at `now_ms` with the records
    /// found on its disk.
    pub fn new(
        settings: LeaseSettings,
        members: &[String],
        now_ms: u64,
        records: BTreeMap<String, Record>,
    ) -> Self {
        Arbiter {
            settings,
            members: members.iter().cloned().collect(),
            started_ms: now_ms,
            records,
            claims: BTreeMap::new(),
            granted_ms: BTreeMap::new(),
        }
    }

    /// Lease settings.
    pub fn settings(&self) -> LeaseSettings {
        self.settings
    }

    /// The record stored under `key`.
    pub fn record(&self, key: &str) -> Option<&Record> {
        self.records.get(key)
    }

    /// Every record.
    pub fn records(&self) -> &BTreeMap<String, Record> {
        &self.records
    }

    /// Sets (or drops) the record under `key` (after a failed persist).
    pub fn replace(&mut self, key: &str, record: Option<Record>) {
        match record {
            Some(r) => {
                self.records.insert(key.to_string(), r);
            }
            None => {
                self.records.remove(key);
            }
        }
    }

    /// Whether `node` may ask about `volume` shared with `peer`: a valid
    /// name (it becomes a file name), a peer this witness serves, and
    /// room for the record if it is new. Checked before anything changes.
    fn admit(&self, node: &str, volume: &str, peer: &str) -> Result<String, Refusal> {
        if !crate::config::valid_volume_name(volume) {
            return Err(Refusal::InvalidVolume(volume.chars().take(80).collect()));
        }
        if peer == node {
            return Err(Refusal::NotMember);
        }
        if !self.members.contains(peer) {
            return Err(Refusal::UnknownPeer(peer.chars().take(80).collect()));
        }
        let key = record_key(volume, node, peer);
        if !self.records.contains_key(&key) && !self.claims.contains_key(&key) {
            let pair = record_key("", node, peer);
            let held = self
                .records
                .keys()
                .chain(self.claims.keys())
                .filter(|k| k.ends_with(&pair))
                .count();
            if held >= VOLUMES_PER_PAIR_MAX {
                return Err(Refusal::TooManyVolumes(VOLUMES_PER_PAIR_MAX));
            }
        }
        Ok(key)
    }

    /// When any primary lease `node` may hold has run out (a restarted
    /// witness assumes one was granted just before it started).
    pub fn lease_bound_ms(&self, node: &str) -> u64 {
        let last = self
            .granted_ms
            .get(node)
            .copied()
            .unwrap_or(0)
            .max(self.started_ms);
        self.settings.grantor_bound_ms(last)
    }

    /// `Wait` while a primary lease `holder` may hold runs (rule 7: a
    /// promotion of another node waits it out).
    fn lease_wait(&self, holder: &str, now_ms: u64) -> Option<ChangeOutcome> {
        let bound = self.lease_bound_ms(holder);
        (now_ms < bound).then(|| ChangeOutcome::Wait {
            wait_ms: bound - now_ms,
            holder: holder.to_string(),
        })
    }

    /// Answers one request of `node` at `now_ms`, with every record that
    /// changed: the caller must make those durable before it sends the
    /// answer.
    pub fn handle(
        &mut self,
        node: &str,
        now_ms: u64,
        req: WitnessRequest,
    ) -> (WitnessResponse, Vec<(String, Record)>) {
        match req {
            WitnessRequest::Heartbeat { claims } if claims.len() > HEARTBEAT_CLAIMS_MAX => (
                WitnessResponse::Error(format!(
                    "a heartbeat carries at most {HEARTBEAT_CLAIMS_MAX} claims; this one has {} (send several)",
                    claims.len()
                )),
                Vec::new(),
            ),
            WitnessRequest::Heartbeat { claims } => {
                let (volumes, changed) = self.heartbeat(node, now_ms, &claims);
                (
                    WitnessResponse::Heartbeat {
                        lease_ms: self.settings.lease_ms,
                        volumes,
                    },
                    changed,
                )
            }
            WitnessRequest::Change {
                volume,
                peer,
                expected_epoch,
                op,
            } => {
                let (outcome, changed) =
                    self.change(node, now_ms, &volume, &peer, expected_epoch, op);
                if changed.is_some() {
                    tracing::info!("witness: {node} {op:?} on {volume}: {outcome:?}");
                }
                (
                    WitnessResponse::Change(outcome),
                    changed.into_iter().collect(),
                )
            }
        }
    }

    /// A heartbeat from `node`: renews its leases and answers with its
    /// volumes' records. Returns the records that changed.
    pub fn heartbeat(
        &mut self,
        node: &str,
        now_ms: u64,
        claims: &[Claim],
    ) -> (Vec<VolumeAnswer>, Vec<(String, Record)>) {
        let mut answers = Vec::with_capacity(claims.len());
        let mut changed = Vec::new();
        let mut lease_granted = false;
        for c in claims {
            let admitted = self.admit(node, &c.volume, &c.peer).and_then(|key| {
                if c.view.epoch > EPOCH_MAX {
                    return Err(Refusal::EpochOutOfRange(c.view.epoch));
                }
                Ok(key)
            });
            let key = match admitted {
                Ok(key) => key,
                Err(refusal) => {
                    answers.push(VolumeAnswer {
                        volume: c.volume.clone(),
                        record: None,
                        lease: false,
                        refused: Some(refusal),
                    });
                    continue;
                }
            };
            if !self.records.contains_key(&key) {
                if let Some(r) = self.learn(&key, node, now_ms, c) {
                    changed.push((key.clone(), r));
                }
            }
            let Some(rec) = self.records.get_mut(&key) else {
                answers.push(VolumeAnswer {
                    volume: c.volume.clone(),
                    record: None,
                    lease: false,
                    refused: None,
                });
                continue;
            };
            let is_primary = rec.primary.as_deref() == Some(node);
            if is_primary && !c.primary_now && c.view.epoch == rec.epoch {
                // It saw the record naming it primary and says it is not:
                // it demoted without reaching us.
                rec.primary = None;
                rec.epoch += 1;
                changed.push((key.clone(), rec.clone()));
            }
            let lease = rec.primary.as_deref() == Some(node);
            lease_granted |= lease;
            answers.push(VolumeAnswer {
                volume: c.volume.clone(),
                record: Some(rec.clone()),
                lease,
                refused: None,
            });
        }
        if lease_granted {
            self.granted_ms.insert(node.to_string(), now_ms);
        }
        (answers, changed)
    }

    /// Learning a record after the witness lost it: adopt it when both nodes
    /// claimed the same record recently.
    fn learn(&mut self, key: &str, node: &str, now_ms: u64, c: &Claim) -> Option<Record> {
        let fresh_ms = self.settings.lease_ms.saturating_mul(2);
        let mine = c.view.to_record(node, &c.peer);
        let entry = self.claims.entry(key.to_string()).or_default();
        entry.insert(node.to_string(), (mine.clone(), now_ms));
        let (theirs, at) = entry.get(&c.peer)?.clone();
        if theirs != mine || now_ms.saturating_sub(at) > fresh_ms {
            return None;
        }
        let mut r = mine;
        r.epoch += 1;
        self.claims.remove(key);
        self.records.insert(key.to_string(), r.clone());
        tracing::info!("witness learned the record of {key} from both nodes: {r:?}");
        Some(r)
    }

    /// A change requested by `node`. An answer `Done` that names `node`
    /// primary grants it the primary lease (the node counts one from it,
    /// also when it was primary already), so the grant is recorded for
    /// rule 7 whatever the path.
    pub fn change(
        &mut self,
        node: &str,
        now_ms: u64,
        volume: &str,
        peer: &str,
        expected_epoch: u64,
        op: WitnessOp,
    ) -> (ChangeOutcome, Changed) {
        let (outcome, changed) = self.decide_change(node, now_ms, volume, peer, expected_epoch, op);
        if let ChangeOutcome::Done(r) = &outcome
            && r.primary.as_deref() == Some(node)
        {
            self.granted_ms.insert(node.to_string(), now_ms);
        }
        (outcome, changed)
    }

    fn decide_change(
        &mut self,
        node: &str,
        now_ms: u64,
        volume: &str,
        peer: &str,
        expected_epoch: u64,
        op: WitnessOp,
    ) -> (ChangeOutcome, Changed) {
        let key = match self.admit(node, volume, peer) {
            Ok(key) => key,
            Err(refusal) => return (ChangeOutcome::Refused(refusal), None),
        };
        if expected_epoch > EPOCH_MAX {
            return (
                ChangeOutcome::Refused(Refusal::EpochOutOfRange(expected_epoch)),
                None,
            );
        }
        let Some(current) = self.records.get(&key).cloned() else {
            if let WitnessOp::Promote {
                force: true,
                incomplete,
            } = op
            {
                // The peer may hold a primary lease this witness granted
                // before it lost the record (or before it restarted): the
                // same wait as for a known record's holder (rule 7).
                if let Some(wait) = self.lease_wait(peer, now_ms) {
                    return (wait, None);
                }
                // The operator starts a history here; the epoch continues
                // after anything either node claimed.
                let epoch = self
                    .claims
                    .get(&key)
                    .map(|m| m.values().map(|(r, _)| r.epoch).max().unwrap_or(0))
                    .unwrap_or(0)
                    .max(expected_epoch)
                    + 1;
                // Marked forced when the copy is not known to be complete
                // (a new volume's first primary too, until its peer has
                // synced and is listed again).
                let r = Record {
                    epoch,
                    primary: Some(node.to_string()),
                    up_to_date: [node.to_string()].into_iter().collect(),
                    forced: incomplete,
                };
                self.records.insert(key.clone(), r.clone());
                self.claims.remove(&key);
                return (ChangeOutcome::Done(r.clone()), Some((key, r)));
            }
            return (ChangeOutcome::Refused(Refusal::Unknown), None);
        };
        if expected_epoch != current.epoch {
            return (ChangeOutcome::Conflict(current), None);
        }
        let mut next = current.clone();
        let me_up_to_date = current.up_to_date.contains(node);
        match op {
            WitnessOp::Promote { force, incomplete } => {
                // Only the operator's word made the forced copy the listed
                // one, and a crash may have undone its forced state since:
                // listing alone is no longer enough (rule 3).
                if current.forced && !force {
                    return (ChangeOutcome::Refused(Refusal::Forced), None);
                }
                if current.primary.as_deref() == Some(node) {
                    return (ChangeOutcome::Done(current), None);
                }
                if !me_up_to_date && !force {
                    return (ChangeOutcome::Refused(Refusal::Outdated), None);
                }
                if let Some(holder) = current.primary.as_deref() {
                    if let Some(wait) = self.lease_wait(holder, now_ms) {
                        return (wait, None);
                    }
                }
                next.primary = Some(node.to_string());
                if !me_up_to_date {
                    // Forced against the record: say so (see Record::forced).
                    next.up_to_date = [node.to_string()].into_iter().collect();
                    next.forced = true;
                } else if force && incomplete {
                    // Listed, but forced on a copy that is not complete: its
                    // later writes alone will not make it the proof either.
                    next.forced = true;
                }
            }
            WitnessOp::Outdate => {
                let primary_ok = match current.primary.as_deref() {
                    Some(p) => p == node,
                    None => me_up_to_date,
                };
                if !primary_ok || !me_up_to_date {
                    return (ChangeOutcome::Refused(Refusal::NotPrimary), None);
                }
                next.primary = Some(node.to_string());
                next.up_to_date.remove(peer);
            }
            WitnessOp::Restore => {
                if !me_up_to_date {
                    return (ChangeOutcome::Refused(Refusal::Outdated), None);
                }
                next.up_to_date.insert(peer.to_string());
                // Both copies are equal again: the forced history is the
                // only one left.
                next.forced = false;
            }
            WitnessOp::Demote => {
                if current.primary.as_deref() == Some(node) {
                    next.primary = None;
                }
            }
        }
        if next == current {
            return (ChangeOutcome::Done(current), None);
        }
        next.epoch += 1;
        self.records.insert(key.clone(), next.clone());
        (ChangeOutcome::Done(next.clone()), Some((key, next)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quorum::{Holder, RecordView};

    fn claim(peer: &str, view: RecordView, primary_now: bool) -> Claim {
        Claim {
            volume: "v".into(),
            peer: peer.into(),
            view,
            primary_now,
        }
    }

    /// A promotion request of a copy known to be complete.
    fn promote(force: bool) -> WitnessOp {
        WitnessOp::Promote {
            force,
            incomplete: false,
        }
    }

    fn members() -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    fn fresh() -> Arbiter {
        Arbiter::new(LeaseSettings::default(), &members(), 1000, BTreeMap::new())
    }

    fn both_up(epoch: u64, primary: Holder) -> RecordView {
        RecordView {
            epoch,
            primary,
            me_up_to_date: true,
            peer_up_to_date: true,
            forced: false,
        }
    }

    /// An epoch no witness handed out (a claim or an expected epoch near
    /// u64::MAX) is refused: incrementing it overflowed (a panic, or in a
    /// release build an epoch that went back to 0, so "epochs only grow"
    /// broke). Nothing is learnt or changed.
    #[test]
    fn epochs_beyond_the_limit_are_refused_and_change_nothing() {
        let mut w = fresh();
        for node in ["a", "b"] {
            let peer = if node == "a" { "b" } else { "a" };
            let (ans, changed) = w.heartbeat(
                node,
                1000,
                &[claim(peer, both_up(u64::MAX, Holder::Nobody), false)],
            );
            assert_eq!(ans[0].refused, Some(Refusal::EpochOutOfRange(u64::MAX)));
            assert!(changed.is_empty() && ans[0].record.is_none() && !ans[0].lease);
        }
        let (o, changed) = w.change("a", 1000, "v", "b", u64::MAX, promote(true));
        assert_eq!(
            o,
            ChangeOutcome::Refused(Refusal::EpochOutOfRange(u64::MAX))
        );
        assert!(changed.is_none() && w.records().is_empty());
        // At the limit, everything still works and the epoch grows.
        let later = w.lease_bound_ms("b");
        let (o, _) = w.change("a", later, "v", "b", EPOCH_MAX, promote(true));
        assert!(matches!(o, ChangeOutcome::Done(r) if r.epoch == EPOCH_MAX + 1));
    }

    /// Issue 14, hole 13: a forced promotion on a record this witness has
    /// not seen (it restarted, or lost its state) waits out any lease it
    /// may have granted the peer before, as for a known record's holder.
    #[test]
    fn a_forced_promotion_on_an_unseen_record_waits_for_the_peer_lease() {
        let mut w = fresh();
        let bound = w.lease_bound_ms("b");
        assert!(bound > 1000);
        let (o, changed) = w.change("a", 1000, "v", "b", 0, promote(true));
        assert_eq!(
            o,
            ChangeOutcome::Wait {
                wait_ms: bound - 1000,
                holder: "b".into()
            }
        );
        assert!(changed.is_none() && w.records().is_empty());
        let (o, changed) = w.change("a", bound, "v", "b", 0, promote(true));
        assert!(matches!(o, ChangeOutcome::Done(r) if r.primary.as_deref() == Some("a")));
        assert!(changed.is_some());
    }

    /// Found by the `witness_arbiter` fuzz target: a primary that asks
    /// again (a promotion retried, or an outdate) is answered `Done` and
    /// counts a new lease from that answer; the witness must count it too,
    /// or it lets the peer take over while that lease still runs (rule 7).
    #[test]
    fn a_repeated_grant_to_the_primary_delays_a_takeover() {
        let mut w = fresh();
        let start = w.lease_bound_ms("b");
        let (o, _) = w.change("a", start, "v", "b", 0, promote(true));
        assert!(matches!(o, ChangeOutcome::Done(_)));
        let (o, _) = w.change("a", start + 1, "v", "b", 1, WitnessOp::Restore);
        let ChangeOutcome::Done(r) = o else {
            panic!("{o:?}")
        };
        let first_bound = w.lease_bound_ms("a");
        for (at, op) in [
            (start + 1500, promote(false)),
            (start + 1600, WitnessOp::Outdate),
        ] {
            let (o, _) = w.change("a", at, "v", "b", r.epoch, op);
            let ChangeOutcome::Done(again) = o else {
                panic!("{o:?}")
            };
            assert_eq!(again.primary.as_deref(), Some("a"));
            assert_eq!(w.lease_bound_ms("a"), w.settings().grantor_bound_ms(at));
            let (o, changed) = w.change("b", first_bound, "v", "a", again.epoch, promote(true));
            assert!(
                matches!(o, ChangeOutcome::Wait { ref holder, .. } if holder == "a"),
                "{op:?}: {o:?}"
            );
            assert!(changed.is_none());
        }
    }

    #[test]
    fn learns_only_when_both_agree() {
        let mut w = fresh();
        let (a, ch) = w.heartbeat("a", 1000, &[claim("b", both_up(4, Holder::Me), true)]);
        assert!(a[0].record.is_none() && ch.is_empty() && !a[0].lease);
        // b disagrees (thinks nobody is primary): still unknown.
        let (a, _) = w.heartbeat("b", 1100, &[claim("a", both_up(4, Holder::Nobody), false)]);
        assert!(a[0].record.is_none());
        // Nothing can be decided meanwhile.
        let (o, _) = w.change("a", 1100, "v", "b", 4, WitnessOp::Outdate);
        assert_eq!(o, ChangeOutcome::Refused(Refusal::Unknown));
        // b agrees now.
        let (a, ch) = w.heartbeat("b", 1200, &[claim("a", both_up(4, Holder::Peer), false)]);
        let r = a[0].record.clone().unwrap();
        assert_eq!(r.epoch, 5);
        assert_eq!(r.primary.as_deref(), Some("a"));
        assert_eq!(ch.len(), 1);
        assert!(!a[0].lease);
    }

    #[test]
    fn promotion_waits_for_the_old_primary_lease_and_needs_up_to_date() {
        let mut w = fresh();
        let t = w.lease_bound_ms("b");
        let (_, _) = w.change("a", t, "v", "b", 0, promote(true));
        let (_, _) = w.change("a", t, "v", "b", 1, WitnessOp::Restore);
        let view = RecordView::of(w.record(&record_key("v", "a", "b")).unwrap(), "a", "b");
        let (ans, _) = w.heartbeat("a", 5000, &[claim("b", view, true)]);
        assert!(ans[0].lease);
        let e = view.epoch;
        let (o, _) = w.change("b", 5100, "v", "a", e, promote(false));
        let ChangeOutcome::Wait { wait_ms, holder } = o else {
            panic!("{o:?}")
        };
        assert_eq!(holder, "a");
        assert_eq!(
            5100 + wait_ms,
            LeaseSettings::default().grantor_bound_ms(5000)
        );
        // Even forced, never while the lease may run.
        let (o, _) = w.change("b", 5100, "v", "a", e, promote(true));
        assert!(matches!(o, ChangeOutcome::Wait { .. }));
        let later = LeaseSettings::default().grantor_bound_ms(5000);
        let (o, ch) = w.change("b", later, "v", "a", e, promote(false));
        let ChangeOutcome::Done(r) = o else { panic!() };
        assert_eq!(r.primary.as_deref(), Some("b"));
        assert!(ch.is_some());
        // a's old view is stale now.
        let (o, _) = w.change("a", later, "v", "b", e, WitnessOp::Outdate);
        assert!(matches!(o, ChangeOutcome::Conflict(_)));
        let (o, _) = w.change("a", later, "v", "b", r.epoch, WitnessOp::Outdate);
        assert_eq!(o, ChangeOutcome::Refused(Refusal::NotPrimary));
        // b outdates a; a can then not promote.
        let (o, _) = w.change("b", later, "v", "a", r.epoch, WitnessOp::Outdate);
        let ChangeOutcome::Done(r) = o else { panic!() };
        assert!(!r.up_to_date.contains("a"));
        let (o, _) = w.change("a", later + 100_000, "v", "b", r.epoch, promote(false));
        assert_eq!(o, ChangeOutcome::Refused(Refusal::Outdated));
    }

    #[test]
    fn restarted_witness_assumes_a_fresh_lease() {
        let mut records = BTreeMap::new();
        records.insert(
            record_key("v", "a", "b"),
            Record {
                epoch: 3,
                primary: Some("a".into()),
                up_to_date: ["a".to_string(), "b".to_string()].into_iter().collect(),
                forced: false,
            },
        );
        let mut w = Arbiter::new(LeaseSettings::default(), &members(), 50, records);
        let (o, _) = w.change("b", 60, "v", "a", 3, promote(false));
        assert!(matches!(o, ChangeOutcome::Wait { .. }));
    }

    #[test]
    fn a_primary_that_demoted_unseen_is_cleared_by_its_heartbeat() {
        let mut w = fresh();
        let t = w.lease_bound_ms("b");
        let (o, _) = w.change("a", t, "v", "b", 0, promote(true));
        let ChangeOutcome::Done(r) = o else { panic!() };
        let view = RecordView::of(&r, "a", "b");
        // An older view does not clear it (the promotion may be in flight).
        let old = RecordView { epoch: 0, ..view };
        let (_, ch) = w.heartbeat("a", t + 100, &[claim("b", old, false)]);
        assert!(ch.is_empty());
        let (ans, ch) = w.heartbeat("a", t + 200, &[claim("b", view, false)]);
        assert_eq!(ch.len(), 1);
        assert!(!ans[0].lease);
        assert_eq!(ans[0].record.as_ref().unwrap().primary, None);
    }

    /// Issue 14, hole 1: a volume name becomes a file name on the witness
    /// host, and the peer a key: a name outside the node-config rules, a
    /// peer the witness does not serve, or a record beyond the per-pair
    /// bound is refused, and nothing is stored or learnt for it.
    #[test]
    fn bad_names_unknown_peers_and_too_many_volumes_are_refused_unchanged() {
        let mut w = fresh();
        for bad in ["../../etc/x", "a/b", ".hidden", "", "v@a+b"] {
            let (o, ch) = w.change("a", 1000, bad, "b", 0, promote(true));
            assert!(
                matches!(o, ChangeOutcome::Refused(Refusal::InvalidVolume(_))),
                "{bad:?}: {o:?}"
            );
            assert!(ch.is_none());
            let mut c = claim("b", both_up(1, Holder::Me), true);
            c.volume = bad.into();
            let (ans, ch) = w.heartbeat("a", 1000, &[c]);
            assert!(matches!(ans[0].refused, Some(Refusal::InvalidVolume(_))));
            assert!(ch.is_empty() && !ans[0].lease);
        }
        let (o, _) = w.change("a", 1000, "v", "mallory", 0, promote(true));
        assert_eq!(
            o,
            ChangeOutcome::Refused(Refusal::UnknownPeer("mallory".into()))
        );
        let (ans, _) = w.heartbeat("a", 1000, &[claim("mallory", both_up(1, Holder::Me), true)]);
        assert!(matches!(ans[0].refused, Some(Refusal::UnknownPeer(_))));
        assert!(
            w.records().is_empty() && w.claims.is_empty(),
            "nothing kept"
        );
        // A good claim next to a bad one is answered as always.
        let (ans, _) = w.heartbeat(
            "a",
            1000,
            &[
                claim("mallory", both_up(1, Holder::Me), true),
                claim("b", both_up(1, Holder::Me), true),
            ],
        );
        assert!(ans[0].refused.is_some() && ans[1].refused.is_none());
        // The per-pair bound: full for a+b, another pair unaffected.
        let record = Record {
            epoch: 1,
            primary: None,
            up_to_date: BTreeSet::new(),
            forced: false,
        };
        let records = (0..VOLUMES_PER_PAIR_MAX)
            .map(|i| (record_key(&format!("v{i}"), "a", "b"), record.clone()))
            .collect();
        let three = vec!["a".to_string(), "b".into(), "c".into()];
        let mut w = Arbiter::new(LeaseSettings::default(), &three, 1000, records);
        let (o, ch) = w.change("a", 1000, "one-more", "b", 0, promote(true));
        assert_eq!(
            o,
            ChangeOutcome::Refused(Refusal::TooManyVolumes(VOLUMES_PER_PAIR_MAX))
        );
        assert!(ch.is_none());
        let (o, _) = w.change("a", 1000, "v7", "b", 1, WitnessOp::Demote);
        assert!(matches!(o, ChangeOutcome::Done(_)), "a known one: {o:?}");
        let t = w.lease_bound_ms("c");
        let (o, _) = w.change("a", t, "one-more", "c", 0, promote(true));
        assert!(matches!(o, ChangeOutcome::Done(_)), "another pair: {o:?}");
    }

    #[test]
    fn members_only() {
        let mut w = fresh();
        let (o, _) = w.change("a", 1000, "v", "a", 0, promote(true));
        assert_eq!(o, ChangeOutcome::Refused(Refusal::NotMember));
    }
}

//! The witness's decisions under any sequence of requests from any of its
//! nodes, with time passing and the witness restarting in between. Each
//! step is `[node | 0x80 restart] [time advance, 25 ms units] [u16 LE body
//! length] [body: a WitnessRequest as JSON]` (the frame layer around the
//! body is fuzzed by `witness_frame`). After every step it checks:
//! - every record the arbiter changed is in the list it hands the server to
//!   persist before answering, and nothing else changed;
//! - a record never changes without its epoch growing, and epochs never go
//!   back (one record, so one primary, per epoch);
//! - the primary moves from A to another node only once every lease A was
//!   granted has run out (rule 7), and is cleared only by A's own word.
#![no_main]

use std::collections::{BTreeMap, HashMap};

use blkrep::quorum::{LeaseSettings, Record};
use blkrep::witness::arbiter::Arbiter;
use blkrep::witness::protocol::{ChangeOutcome, WitnessRequest, WitnessResponse};
use libfuzzer_sys::fuzz_target;

/// "mallory" is not a member: the server would refuse its certificate, but
/// the arbiter must hold up even so.
const NODES: [&str; 4] = ["alpha", "beta", "gamma", "mallory"];
const STEPS_MAX: usize = 256;

fuzz_target!(|data: &[u8]| {
    let settings = LeaseSettings::default();
    let members: Vec<String> = NODES[..3].iter().map(|n| n.to_string()).collect();
    let mut now_ms: u64 = 1_000_000;
    let mut arbiter = Arbiter::new(settings, &members, now_ms, BTreeMap::new());
    // The last grant each node was observably given (from the answers).
    let mut granted_ms: HashMap<String, u64> = HashMap::new();
    let mut rest = data;
    for _ in 0..STEPS_MAX {
        let [who, advance, l0, l1, tail @ ..] = rest else {
            break;
        };
        let len = usize::from(u16::from_le_bytes([*l0, *l1])).min(tail.len());
        let (body, after) = tail.split_at(len);
        rest = after;
        now_ms += u64::from(*advance) * 25;
        if who & 0x80 != 0 {
            // A restart: the records survive (they were fsynced), the rest
            // is gone.
            arbiter = Arbiter::new(settings, &members, now_ms, arbiter.records().clone());
        }
        let node = NODES[usize::from(who & 3)];
        let Ok(req) = serde_json::from_slice::<WitnessRequest>(body) else {
            continue;
        };
        let before = arbiter.records().clone();
        let (response, changed) = arbiter.handle(node, now_ms, req);
        let after = arbiter.records();
        check_persisted(&before, after, &changed);
        for (key, new) in after {
            if let Some(old) = before.get(key) {
                check_transition(key, node, old, new, now_ms, &granted_ms, settings);
            }
        }
        // Leases granted by this answer.
        match &response {
            WitnessResponse::Heartbeat { volumes, .. } if volumes.iter().any(|v| v.lease) => {
                granted_ms.insert(node.to_string(), now_ms);
            }
            WitnessResponse::Change(ChangeOutcome::Done(r))
                if r.primary.as_deref() == Some(node) =>
            {
                granted_ms.insert(node.to_string(), now_ms);
            }
            _ => {}
        }
    }
});

/// What changed is exactly what the server is told to persist.
fn check_persisted(
    before: &BTreeMap<String, Record>,
    after: &BTreeMap<String, Record>,
    changed: &[(String, Record)],
) {
    assert!(
        before.keys().all(|k| after.contains_key(k)),
        "a record vanished"
    );
    let persisted: BTreeMap<&String, &Record> = changed.iter().map(|(k, r)| (k, r)).collect();
    for (key, record) in after {
        if before.get(key) != Some(record) {
            assert_eq!(
                persisted.get(key),
                Some(&record),
                "{key} changed to {record:?} but is not persisted as that"
            );
        }
    }
    for (key, record) in changed {
        assert_eq!(after.get(key), Some(record), "{key}: persisted != held");
    }
}

fn check_transition(
    key: &str,
    node: &str,
    old: &Record,
    new: &Record,
    now_ms: u64,
    granted_ms: &HashMap<String, u64>,
    settings: LeaseSettings,
) {
    if old == new {
        return;
    }
    assert!(
        new.epoch > old.epoch,
        "{key} changed without a new epoch: {old:?} -> {new:?}"
    );
    match (old.primary.as_deref(), new.primary.as_deref()) {
        (Some(a), Some(b)) if a != b => {
            if let Some(&at) = granted_ms.get(a) {
                assert!(
                    now_ms >= settings.grantor_bound_ms(at),
                    "{key}: {b} became primary at {now_ms} while {a}'s lease from {at} may run"
                );
            }
        }
        (Some(a), None) => assert_eq!(a, node, "{key}: {node} cleared {a}'s primary role"),
        _ => {}
    }
}

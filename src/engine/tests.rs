//! A seeded two-node simulation of the engine: random completion order, link
//! cuts and heals, with the rules checked after every step. A failure prints
//! its seed; `BLKREP_SIM_SEED=N cargo test engine::tests` replays one seed.

use std::collections::{BTreeMap, VecDeque};

use super::*;
use crate::meta::Bitmap;

const BLOCK: u64 = 4096;
const CHUNK: u64 = 16384;
const DATA_BYTES: u64 = 64 * BLOCK;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Version number per block on one node's disk.
type Disk = BTreeMap<u64, u64>;

enum Msg {
    State(NodeView),
    Write {
        id: RequestId,
        data: Vec<(u64, u64)>,
    },
    Flush {
        id: RequestId,
    },
    Ack {
        id: RequestId,
        ok: bool,
    },
    SyncDone(Generations),
}

enum Pending {
    /// A local write on a node: apply `data` then report.
    Local {
        id: RequestId,
        data: Vec<(u64, u64)>,
        range: Range,
        flush: bool,
    },
    /// A replica write on the secondary: apply, then ack over the link.
    Replica {
        id: RequestId,
        data: Vec<(u64, u64)>,
    },
}

struct Node {
    eng: Engine,
    disk: Disk,
    pending: Vec<Pending>,
    meta: VecDeque<u64>,
    /// Client payloads by request id.
    payload: BTreeMap<RequestId, Vec<(u64, u64)>>,
    inbox: VecDeque<Msg>,
}

struct Sim {
    rng: Rng,
    nodes: [Node; 2],
    connected: bool,
    next_id: RequestId,
    next_version: u64,
    completed_writes: u64,
    log: Vec<String>,
}

fn new_node(seed: u64, tie: bool) -> Node {
    let cfg = EngineConfig {
        data_bytes: DATA_BYTES,
        chunk_bytes: CHUNK,
        tie_winner: tie,
    };
    let gens = Generations {
        current: 77,
        ..Default::default()
    };
    Node {
        eng: Engine::new(
            cfg,
            DiskState::UpToDate,
            gens,
            Bitmap::new(DATA_BYTES, CHUNK),
            seed,
        ),
        disk: Disk::new(),
        pending: vec![],
        meta: VecDeque::new(),
        payload: BTreeMap::new(),
        inbox: VecDeque::new(),
    }
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut s = Sim {
            rng: Rng(seed),
            nodes: [new_node(seed, true), new_node(seed ^ 1, false)],
            connected: false,
            next_id: 1,
            next_version: 1,
            completed_writes: 0,
            log: vec![],
        };
        s.heal();
        s.run_until_quiet();
        s.nodes[0].eng.promote(false).expect("promote A");
        s.drain(0);
        s.run_until_quiet();
        s
    }

    fn heal(&mut self) {
        if self.connected {
            return;
        }
        // A node finishes applying the replica writes of the old connection
        // before it talks on the new one (the shell drains them), so none of
        // them can land after a resync of the same chunk.
        for n in 0..2 {
            let pending = std::mem::take(&mut self.nodes[n].pending);
            for p in pending {
                match p {
                    Pending::Replica { data, .. } => {
                        for (b, v) in data {
                            self.nodes[n].disk.insert(b, v);
                        }
                    }
                    local => self.nodes[n].pending.push(local),
                }
            }
        }
        self.connected = true;
        self.log.push("heal".into());
        for n in 0..2 {
            let v = self.nodes[n].eng.view();
            self.nodes[1 - n].inbox.push_back(Msg::State(v));
        }
    }

    fn cut(&mut self) {
        if !self.connected {
            return;
        }
        self.connected = false;
        self.log.push("cut".into());
        for n in 0..2 {
            self.nodes[n].inbox.clear();
            // Replica writes already handed to the disk still land, but their
            // acks are lost with the connection.
            self.nodes[n].eng.peer_disconnected();
            self.drain(n);
        }
    }

    fn send(&mut self, to: usize, m: Msg) {
        if self.connected {
            self.nodes[to].inbox.push_back(m);
        }
    }

    /// Executes every action node `n` has queued.
    fn drain(&mut self, n: usize) {
        while let Some(a) = self.nodes[n].eng.poll_action() {
            match a {
                Action::LocalIo { id, op, range } => {
                    let node = &mut self.nodes[n];
                    let data = match op {
                        Op::Write { .. } => node.payload.get(&id).cloned().unwrap_or_default(),
                        Op::Zeroes { .. } => blocks(range).map(|b| (b, 0)).collect(),
                        _ => vec![],
                    };
                    assert_no_overlap(&node.pending, range, op, &self.log);
                    node.pending.push(Pending::Local {
                        id,
                        data,
                        range,
                        flush: op == Op::Flush,
                    });
                }
                Action::PeerIo { id, op, range } => {
                    let data = match op {
                        Op::Write { .. } => {
                            self.nodes[n].payload.get(&id).cloned().unwrap_or_default()
                        }
                        Op::Zeroes { .. } => blocks(range).map(|b| (b, 0)).collect(),
                        _ => vec![],
                    };
                    let m = if op == Op::Flush {
                        Msg::Flush { id }
                    } else {
                        Msg::Write { id, data }
                    };
                    if self.connected {
                        self.send(1 - n, m);
                    } else {
                        self.nodes[n].eng.peer_done(id, false);
                    }
                }
                Action::ResyncChunk { id, range } => {
                    let data: Vec<(u64, u64)> = blocks(range)
                        .map(|b| (b, self.nodes[n].disk.get(&b).copied().unwrap_or(0)))
                        .collect();
                    if self.connected {
                        self.send(1 - n, Msg::Write { id, data });
                    } else {
                        self.nodes[n].eng.peer_done(id, false);
                    }
                }
                Action::Complete { id, result } => {
                    if let Some(data) = self.nodes[n].payload.remove(&id) {
                        if result.is_ok() {
                            self.check_rule1(n, &data);
                            self.completed_writes += 1;
                        }
                    }
                }
                Action::PersistMeta { token, .. } => self.nodes[n].meta.push_back(token),
                Action::AnnounceState => {
                    let v = self.nodes[n].eng.view();
                    self.send(1 - n, Msg::State(v));
                }
                Action::SendSyncDone { generations } => {
                    self.send(1 - n, Msg::SyncDone(generations))
                }
                Action::Export(_) | Action::Notify(_) => {}
            }
        }
    }

    /// Rule 1: a completed write is on the writer's disk and on the peer's,
    /// unless the writer's persisted bitmap covers it.
    fn check_rule1(&self, n: usize, data: &[(u64, u64)]) {
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
            assert!(
                on_peer || covered,
                "rule 1: block {b} v{v} neither on peer nor in bitmap; log {:?}",
                self.log
            );
        }
    }

    fn deliver(&mut self, to: usize) {
        let Some(m) = self.nodes[to].inbox.pop_front() else {
            return;
        };
        match m {
            Msg::State(v) => self.nodes[to].eng.peer_state(v),
            Msg::SyncDone(g) => self.nodes[to].eng.peer_sync_done(g),
            Msg::Ack { id, ok } => self.nodes[to].eng.peer_done(id, ok),
            Msg::Flush { id } => self.nodes[to]
                .pending
                .push(Pending::Replica { id, data: vec![] }),
            Msg::Write { id, data } => {
                if self.nodes[to].eng.accepts_peer_writes() {
                    self.nodes[to].pending.push(Pending::Replica { id, data });
                } else {
                    self.send(1 - to, Msg::Ack { id, ok: false });
                }
            }
        }
        self.drain(to);
    }

    fn complete_local(&mut self, n: usize) {
        if self.nodes[n].pending.is_empty() {
            return;
        }
        let i = self.rng.below(self.nodes[n].pending.len() as u64) as usize;
        let p = self.nodes[n].pending.swap_remove(i);
        match p {
            Pending::Local { id, data, .. } => {
                for (b, v) in data {
                    self.nodes[n].disk.insert(b, v);
                }
                self.nodes[n].eng.local_done(id, true);
            }
            Pending::Replica { id, data, .. } => {
                for (b, v) in data {
                    self.nodes[n].disk.insert(b, v);
                }
                self.send(1 - n, Msg::Ack { id, ok: true });
            }
        }
        self.drain(n);
    }

    fn persist_meta(&mut self, n: usize) {
        if let Some(t) = self.nodes[n].meta.pop_front() {
            self.nodes[n].eng.meta_persisted(t);
            self.drain(n);
        }
    }

    fn submit_write(&mut self) {
        let n = if self.nodes[0].eng.role == Role::Primary {
            0
        } else {
            1
        };
        if self.nodes[n].eng.role != Role::Primary || self.nodes[n].payload.len() > 16 {
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
                (b, if zeroes { 0 } else { self.next_version })
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
        self.nodes[n].eng.submit(id, op, range);
        self.drain(n);
    }

    fn step(&mut self) {
        match self.rng.below(100) {
            0..=24 => self.submit_write(),
            25..=44 => self.deliver(0),
            45..=64 => self.deliver(1),
            65..=74 => self.complete_local(0),
            75..=84 => self.complete_local(1),
            85..=91 => {
                let n = self.rng.below(2) as usize;
                self.persist_meta(n)
            }
            92..=93 => self.cut(),
            _ => self.heal(),
        }
    }

    fn quiet(&self) -> bool {
        self.nodes
            .iter()
            .all(|n| n.inbox.is_empty() && n.pending.is_empty() && n.meta.is_empty())
    }

    fn run_until_quiet(&mut self) {
        for _ in 0..100_000 {
            if self.quiet() {
                return;
            }
            for n in 0..2 {
                self.deliver(n);
                self.complete_local(n);
                self.persist_meta(n);
            }
        }
        panic!("simulation did not settle; log {:?}", self.log);
    }
}

fn blocks(r: Range) -> impl Iterator<Item = u64> {
    (r.offset / BLOCK)..(r.end() / BLOCK)
}

/// Rule 5: a node never has two overlapping data-changing ops issued at once.
fn assert_no_overlap(pending: &[Pending], range: Range, op: Op, log: &[String]) {
    if !op.locks_range() {
        return;
    }
    for p in pending {
        if let Pending::Local {
            range: r,
            flush: false,
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

fn norm(d: &Disk) -> Vec<(u64, u64)> {
    d.iter()
        .filter(|(_, v)| **v != 0)
        .map(|(k, v)| (*k, *v))
        .collect()
}

fn run_seed(seed: u64, steps: usize) {
    let mut sim = Sim::new(seed);
    for _ in 0..steps {
        sim.step();
    }
    sim.heal();
    sim.run_until_quiet();
    let (a, b) = (&sim.nodes[0], &sim.nodes[1]);
    assert_eq!(
        a.eng.status().relation,
        Some(Relation::InSync),
        "seed {seed}: not in sync after heal; peer {:?} {:?} resync {:?}; log {:?}",
        b.eng.status().relation,
        b.eng.disk,
        a.eng.resync,
        &sim.log[sim.log.len().saturating_sub(12)..]
    );
    assert_eq!(
        b.eng.status().relation,
        Some(Relation::InSync),
        "seed {seed}: peer not in sync"
    );
    assert_eq!(b.eng.disk, DiskState::UpToDate, "seed {seed}");
    assert_eq!(
        norm(&a.disk),
        norm(&b.disk),
        "seed {seed}: replicas differ after heal; log {:?}",
        sim.log
    );
    assert_eq!(a.eng.bitmap.set_count(), 0, "seed {seed}");
}

#[test]
fn seeded_schedules_keep_the_rules_and_converge() {
    let seeds: Vec<u64> = match std::env::var("BLKREP_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("BLKREP_SIM_SEED must be a number")],
        Err(_) => (1..=2000).collect(),
    };
    for seed in seeds {
        let r = std::panic::catch_unwind(|| run_seed(seed, 400));
        if r.is_err() {
            panic!("simulation failed for seed {seed}; replay with BLKREP_SIM_SEED={seed}");
        }
    }
}

#[test]
fn secondary_refuses_promotion_while_primary_connected() {
    let mut sim = Sim::new(3);
    assert_eq!(
        sim.nodes[1].eng.promote(false),
        Err(PromoteError::PeerPrimary)
    );
}

#[test]
fn outdated_copy_refuses_promotion_unless_forced() {
    let mut sim = Sim::new(4);
    sim.cut();
    sim.submit_write();
    sim.run_until_quiet();
    sim.nodes[1].eng.disk = DiskState::Outdated;
    assert_eq!(
        sim.nodes[1].eng.promote(false),
        Err(PromoteError::NotUpToDate(DiskState::Outdated))
    );
    assert!(sim.nodes[1].eng.promote(true).is_ok());
}

#[test]
fn writes_while_disconnected_are_in_the_bitmap_and_resynced() {
    let mut sim = Sim::new(5);
    sim.cut();
    for _ in 0..10 {
        sim.submit_write();
        sim.run_until_quiet();
    }
    assert!(sim.nodes[0].eng.bitmap.set_count() > 0);
    assert_ne!(sim.nodes[0].eng.gens.bitmap, 0);
    sim.heal();
    sim.run_until_quiet();
    assert_eq!(norm(&sim.nodes[0].disk), norm(&sim.nodes[1].disk));
    assert_eq!(sim.nodes[0].eng.bitmap.set_count(), 0);
}

#[test]
fn both_promoted_while_apart_is_split_brain() {
    let mut sim = Sim::new(6);
    sim.cut();
    sim.submit_write();
    sim.run_until_quiet();
    sim.nodes[1]
        .eng
        .promote(false)
        .expect("B alone may promote in this test");
    sim.drain(1);
    sim.run_until_quiet();
    sim.heal();
    sim.run_until_quiet();
    let rel = sim.nodes[0].eng.status().relation;
    assert!(
        matches!(rel, Some(Relation::Diverged) | Some(Relation::Refused(_))),
        "{rel:?}"
    );
}

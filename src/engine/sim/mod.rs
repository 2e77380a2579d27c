//! A seeded two-node simulation of the engine: random completion order, link
//! cuts and heals, crashes and power cuts, with the rules checked after
//! every step. A failure prints its seed; `BLKREP_SIM_SEED=N cargo test
//! engine::sim` replays one seed, `BLKREP_SIM_SEEDS=N` runs N seeds per test
//! instead of 2000. With a witness (the real arbiter, virtual time)
//! reachability flaps, restarts and lost witness disks join the faults, and
//! rule 2 is checked on every completion.
//!
//! | file | what |
//! |---|---|
//! | this file | the harness: nodes, messages, the step loop |
//! | `network` | the link: delivery in random order, cuts, heals |
//! | `disk` | data with a volatile cache, metadata written in order |
//! | `faults` | the fault model: crashes, power cuts, restarts, a new drive |
//! | `witness` | the real arbiter on virtual time, heartbeats, leases |
//! | `workload` | client I/O, promotions, demotions, forced promotions |
//! | `checks` | rules 1, 5, 7, complete-copy promotions, reads, convergence |
//! | `seeds` | the seeded runs and their coverage counters |
//! | `scenarios` | directed tests and the once-failing schedules |

use std::collections::{BTreeMap, VecDeque};

mod checks;
mod disk;
mod faults;
mod network;
mod scenarios;
mod seeds;
mod witness;
mod workload;

use super::*;
use crate::meta::Bitmap;
use crate::meta::activity_log::AlSlots;
use checks::{assert_no_overlap, check_converged};
use seeds::{run_forced_seed, run_seed};
use witness::{LEASE, WitnessSim, key, members};

const BLOCK: u64 = 4096;
/// Marks a block value written by a Zeroes op (the rest is its version).
const ZERO_FLAG: u64 = 1 << 63;
/// Few enough that long disconnects exercise the full-resync fallback too.
const DIRTY_RUNS_MAX: usize = 3;
const CHUNK: u64 = 16384;
const DATA_BYTES: u64 = 64 * BLOCK;

use crate::testkit::rng::SplitMix64 as Rng;
use crate::witness::{Arbiter, ChangeOutcome, Claim, record_key};

const NAMES: [&str; 2] = ["a", "b"];

/// Version number per block on one node's disk.
type Disk = BTreeMap<u64, u64>;

enum Msg {
    State(NodeView, Option<Vec<(u64, u64)>>),
    Write {
        id: RequestId,
        data: Vec<(u64, u64)>,
        fua: bool,
        /// Resync data (the link's FLAG_RESYNC), not a mirrored write.
        resync: bool,
    },
    /// A write of a primary whose copy the receiver is resyncing.
    Forward {
        id: RequestId,
        op: Op,
        range: Range,
        data: Vec<(u64, u64)>,
    },
    Read {
        id: RequestId,
        range: Range,
    },
    ReadReply {
        id: RequestId,
        data: Option<Vec<(u64, u64)>>,
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
        /// A flush: the blocks unflushed when it was issued.
        flush: Option<Vec<u64>>,
        fua: bool,
    },
    /// A replica write (or flush) on the secondary: apply, then ack over
    /// the link.
    Replica {
        id: RequestId,
        data: Vec<(u64, u64)>,
        flush: Option<Vec<u64>>,
        fua: bool,
    },
}

/// What a node's metadata area holds (only what was persisted survives a crash).
#[derive(Clone)]
struct Persisted {
    disk: DiskState,
    gens: Generations,
    primary: bool,
    bitmap_pages: BTreeMap<u32, Box<[u8; crate::meta::bitmap::BITMAP_PAGE_BYTES]>>,
    /// The two activity-log slots as on disk (zeros: never written).
    al_slots: [Vec<u8>; 2],
    record: RecordView,
    cache_lost: bool,
}

struct MetaWrite {
    record: RecordView,
    token: MetaToken,
    disk: DiskState,
    gens: Generations,
    primary: bool,
    pages: Vec<(u32, Box<[u8; crate::meta::bitmap::BITMAP_PAGE_BYTES]>)>,
    al: Option<crate::meta::activity_log::AlSnapshot>,
    cache_lost: bool,
    flush_data: bool,
}

impl MetaWrite {
    /// This write folded with the next one (as `MetaJob::then`).
    fn then(mut self, next: MetaWrite) -> MetaWrite {
        let mut pages = std::mem::take(&mut self.pages);
        pages.retain(|(p, _)| !next.pages.iter().any(|(q, _)| q == p));
        pages.extend(next.pages);
        MetaWrite {
            pages,
            al: next.al.or(self.al),
            flush_data: self.flush_data || next.flush_data,
            ..next
        }
    }
}

fn empty_al_slots() -> [Vec<u8>; 2] {
    let zero = vec![0u8; crate::meta::activity_log::AL_SLOT_BYTES];
    [zero.clone(), zero]
}

struct Node {
    eng: Engine,
    /// What reads see: the media plus the disk's volatile cache.
    disk: Disk,
    /// What survives a power cut: written with FUA or covered by a flush.
    durable: Disk,
    /// Per block, the completed versions no flush or FUA covered yet,
    /// oldest first: a power cut keeps the durable one or any of these.
    unflushed: BTreeMap<u64, Vec<u64>>,
    /// The shell's choice of the activity-log slot written next.
    al_next: AlSlots,
    pending: Vec<Pending>,
    meta: VecDeque<MetaWrite>,
    persisted: Persisted,
    /// Client payloads by request id.
    payload: BTreeMap<RequestId, Vec<(u64, u64)>>,
    inbox: VecDeque<Msg>,
    /// Writes the peer forwarded, by engine id: the peer's request id.
    forwards: BTreeMap<RequestId, RequestId>,
    /// Client reads in flight: the block and the newest version
    /// acknowledged when the read was issued (rule 7).
    reads: BTreeMap<RequestId, (u64, u64)>,
    /// What a read in flight got (from the peer or the local disk).
    read_values: BTreeMap<RequestId, u64>,
}

struct Sim {
    rng: Rng,
    nodes: [Node; 2],
    connected: bool,
    next_id: RequestId,
    next_version: u64,
    completed_writes: u64,
    log: Vec<String>,
    /// Highest acknowledged version per block (never may a final copy be older).
    acked: BTreeMap<u64, u64>,
    seed: u64,
    crashes: bool,
    witness: Option<WitnessSim>,
    /// Engines started after crashes and drive swaps: each gets its own
    /// entropy, as a restarted daemon does (clock and pid), so that it never
    /// hands out a generation id an earlier incarnation used.
    restarts: u64,
    cov: Coverage,
    /// A second stream for the events added with promoted sync targets, so
    /// that schedules which never reach them stay as they were (the
    /// once-failing seeds replay the same steps).
    rng2: Rng,
    /// Set once an operator forced an incomplete copy (see `ForcedRun`).
    forced: Option<ForcedRun>,
    /// Whether `step` cuts power too (besides killing processes).
    power_cuts: bool,
    /// P1: per block, the newest version a completed flush or FUA
    /// promised durable.
    promised: BTreeMap<u64, u64>,
    /// Client flushes in flight: the acknowledged versions when each was
    /// submitted.
    flushes: BTreeMap<RequestId, BTreeMap<u64, u64>>,
    /// Client writes in flight with FUA.
    fua_writes: std::collections::BTreeSet<RequestId>,
    /// Client writes in flight whose peer leg the peer acknowledged (it
    /// held the data then).
    peer_acked: std::collections::BTreeSet<RequestId>,
    /// Client writes in flight: the power cuts injected before each was
    /// submitted.
    write_cuts: BTreeMap<RequestId, u64>,
    /// The node promoted last (a cluster manager's memory).
    last_primary: usize,
    /// Scripted tests: a power cut drops every unflushed write (instead
    /// of a seeded subset).
    cut_drops_everything: bool,
}

/// A forced promotion of an incomplete copy while the complete one was
/// away. From then on "acknowledged" is per lineage (the forced copy lacks
/// writes by design), so the global rule-7 checks stand down and the
/// complete copy is watched instead: until an explicit resolve, none of
/// the acknowledged writes it held may be overwritten by older data, and
/// the forced lineage is never dropped silently either.
struct ForcedRun {
    /// The node that held every acknowledged write at the force.
    complete: usize,
    /// The forced lineage's mark (`Generations::forced`) on the other node.
    forced_id: u64,
    /// What it held then: block -> version of every acknowledged write.
    held: BTreeMap<u64, u64>,
}

/// How often the schedules reached the paths of a promoted sync target
/// (summed over all seeds; a run that never reaches them proves nothing).
#[derive(Clone, Copy, Debug, Default)]
struct Coverage {
    /// Sync targets promoted while their source was connected.
    promotions: u64,
    /// Writes a sync source applied for its primary.
    forwarded_writes: u64,
    /// Reads a forwarding primary completed (checked against rule 7).
    reads: u64,
    /// Resyncs finished into a primary.
    hand_overs: u64,
    /// Steps at which a forwarding primary held requests back.
    frozen_steps: u64,
    /// Power cuts injected.
    power_cuts: u64,
    /// Blocks whose newest completed version a power cut dropped.
    dropped_writes: u64,
    /// Writes in flight that a power cut tore (some blocks landed).
    torn_writes: u64,
    /// Promotions that waited for the old primary's writes to land.
    promotions_after_landing: u64,
}

/// A small activity log so that eviction and waiting are exercised.
const AL_EXTENT: u64 = 2 * CHUNK;
const AL_CAPACITY: usize = 6;
/// The simulated client's request permits (the shell's `CLIENT_INFLIGHT_MAX`).
const CLIENT_REQUESTS_MAX: usize = 64;

fn config(tie: bool, quorum: bool) -> EngineConfig {
    EngineConfig {
        quorum: quorum.then_some(NoQuorumPolicy::Suspend),
        data_bytes: DATA_BYTES,
        chunk_bytes: CHUNK,
        tie_winner: tie,
        al_extent_bytes: AL_EXTENT,
        al_extents: AL_CAPACITY,
        volatile_cache: true,
        client_requests_max: CLIENT_REQUESTS_MAX,
    }
}

fn new_node(seed: u64, tie: bool, quorum: bool) -> Node {
    let cfg = config(tie, quorum);
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
        durable: Disk::new(),
        unflushed: BTreeMap::new(),
        al_next: AlSlots::default(),
        pending: vec![],
        meta: VecDeque::new(),
        persisted: Persisted {
            disk: DiskState::UpToDate,
            gens,
            primary: false,
            bitmap_pages: BTreeMap::new(),
            al_slots: empty_al_slots(),
            record: RecordView::default(),
            cache_lost: false,
        },
        payload: BTreeMap::new(),
        inbox: VecDeque::new(),
        forwards: BTreeMap::new(),
        reads: BTreeMap::new(),
        read_values: BTreeMap::new(),
    }
}

impl Sim {
    fn new(seed: u64) -> Self {
        Self::with_witness(seed, false)
    }

    fn with_witness(seed: u64, witness: bool) -> Self {
        let mut s = Sim {
            witness: witness.then(|| WitnessSim {
                arb: Arbiter::new(Default::default(), &members(), 1, BTreeMap::new()),
                reach: [true, true],
                queue: VecDeque::new(),
                now_ms: 1,
                latest: None,
                witness_until: [0; 2],
                peer_until: [0; 2],
                granted: [0; 2],
            }),
            rng: Rng(seed),
            nodes: [
                // Generation ids come from a counter per engine: spread the
                // seeds so that two engines never hand out the same id.
                new_node(Rng(seed).next_u64(), true, witness),
                new_node(Rng(!seed).next_u64(), false, witness),
            ],
            connected: false,
            next_id: 1,
            next_version: 1,
            completed_writes: 0,
            log: vec![],
            acked: BTreeMap::new(),
            seed,
            crashes: false,
            restarts: 0,
            cov: Coverage::default(),
            rng2: Rng(seed ^ 0x5eed_5eed),
            forced: None,
            power_cuts: false,
            promised: BTreeMap::new(),
            flushes: BTreeMap::new(),
            fua_writes: Default::default(),
            peer_acked: Default::default(),
            write_cuts: BTreeMap::new(),
            last_primary: 0,
            cut_drops_everything: false,
        };
        s.heal();
        s.run_until_quiet();
        if let Some(w) = &mut s.witness {
            // (A forced first promotion waits out any lease the witness may
            // have granted the peer before it started.)
            w.now_ms = w.now_ms.max(w.arb.lease_bound_ms(NAMES[1]));
            let (o, _) = w.arb.change(
                NAMES[0],
                w.now_ms,
                "v",
                NAMES[1],
                0,
                WitnessOp::Promote {
                    force: true,
                    incomplete: false,
                },
            );
            w.note();
            let ChangeOutcome::Done(r) = o else {
                panic!("first promotion refused: {o:?}")
            };
            s.nodes[0]
                .eng
                .witness_record(RecordView::of(&r, NAMES[0], NAMES[1]));
        }
        s.nodes[0].eng.promote(false).expect("promote A");
        s.drain(0);
        s.run_until_quiet();
        s
    }

    fn trace(&self, what: &str) {
        if tracing() {
            let st = |n: usize| {
                let e = &self.nodes[n].eng;
                format!(
                    "role {:?} disk {:?}{} gens {:x}/{:x} dirty {:?} rec {:?} data {:?}",
                    e.role,
                    e.disk,
                    if e.cache_lost { " (cache lost)" } else { "" },
                    e.gens.current,
                    e.gens.bitmap,
                    (0..DATA_BYTES / CHUNK)
                        .filter(|c| e.bitmap.get(*c))
                        .collect::<Vec<_>>(),
                    e.quorum.record,
                    norm(&self.nodes[n].disk)
                )
            };
            eprintln!("{what}\n  a {}\n  b {}", st(0), st(1));
        }
    }

    /// Delivers, completes and persists on both nodes, in order, without
    /// faults, until `done` holds (at most 10,000 rounds).
    fn step_by_hand_until(&mut self, what: &str, done: impl Fn(&Sim) -> bool) {
        let mut rounds = 0;
        while !done(self) {
            for n in 0..2 {
                self.deliver(n);
                self.complete_local(n);
                self.persist_meta(n);
            }
            rounds += 1;
            assert!(rounds < 10_000, "never: {what}");
        }
    }

    /// One random event, then the engines' invariants.
    fn step(&mut self) {
        self.step_once();
        for n in &self.nodes {
            n.eng.check_invariants();
            // The engine counts what the node is applying for its peer (its
            // waits before a promotion or a new connection depend on it).
            let replicas = n
                .pending
                .iter()
                .filter(|p| matches!(p, Pending::Replica { .. }))
                .count();
            assert_eq!(
                n.eng.replicas_in_flight(),
                replicas,
                "the engine's count of replica writes in flight is off"
            );
        }
    }

    fn step_once(&mut self) {
        if self.nodes.iter().any(|n| !n.eng.frozen.is_empty()) {
            self.cov.frozen_steps += 1;
        }
        if self.power_cuts && self.rng2.below(16) == 0 {
            // The shell's 50 ms tick (age bound of unflushed writes).
            let n = self.rng2.below(2) as usize;
            self.nodes[n].eng.tick();
            self.drain(n);
        }
        if self.power_cuts && self.witness.is_none() && self.rng2.below(64) == 0 {
            let n = self.rng2.below(2) as usize;
            self.clean_restart(n);
        }
        if self.power_cuts && self.witness.is_none() && self.rng2.below(32) == 0 {
            // Nobody primary (the last one refused, having lost power): the
            // cluster manager tries again.
            let last = self.last_primary;
            if (0..2).all(|m| self.nodes[m].eng.role != Role::Primary)
                && self.nodes[last].eng.promote(false).is_ok()
            {
                self.log.push(format!("promote {last} again"));
                self.drain(last);
                self.check_promoted(last);
            }
        }
        if self.rng2.below(4) == 0
            && let Some(n) =
                (0..2).find(|&n| self.serving(n) && self.nodes[n].eng.read_path() == ReadPath::Peer)
        {
            self.submit_read(n);
        }
        if self.witness.is_some() {
            assert!(
                !(self.serving(0) && self.serving(1)),
                "rule 7: two nodes serve as primary at once; log {:?}",
                self.log
            );
            match self.rng.below(8) {
                0 | 1 => return self.witness_event(),
                2 => return self.read_check(),
                _ => {}
            }
        }
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
            95 => {
                let n = if self.nodes[0].eng.role == Role::Primary {
                    0
                } else {
                    1
                };
                if self.nodes[n].eng.start_verify().is_ok() {
                    self.log.push(format!("verify {n}"));
                    self.drain(n);
                }
            }
            94 if self.crashes => {
                let n = self.rng.below(2) as usize;
                if self.power_cuts && self.rng2.below(2) == 0 {
                    self.power_cut(n)
                } else {
                    self.crash(n)
                }
            }
            96 if self.crashes && self.witness.is_none() && self.rng.below(4) == 0 => {
                self.swap_drive()
            }
            98 => {
                if !self.promote_sync_target() {
                    self.heal()
                }
            }
            97 => {
                // The shell narrows and widens the resync window as the
                // application comes and goes.
                let n = self.rng.below(2) as usize;
                let w = 1 + self.rng.below(RESYNC_WINDOW as u64) as usize;
                if self.nodes[n].eng.set_resync_window(w) {
                    self.drain(n);
                }
            }
            _ => self.heal(),
        }
    }

    /// The end of a schedule: the link heals, everything settles, and with
    /// a witness both nodes reach it for a while (heartbeats, retries).
    fn settle(&mut self) {
        self.heal();
        self.run_until_quiet();
        if let Some(w) = &mut self.witness {
            w.reach = [true, true];
            for _ in 0..20 {
                for n in 0..2 {
                    self.heartbeat(n);
                    self.nodes[n].eng.tick();
                    self.drain(n);
                }
                self.run_until_quiet();
                self.check_complete_copy();
            }
        }
    }

    fn quiet(&self) -> bool {
        self.nodes
            .iter()
            .all(|n| n.inbox.is_empty() && n.pending.is_empty() && n.meta.is_empty())
            && self.witness.as_ref().is_none_or(|w| w.queue.is_empty())
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
            self.witness_deliver();
        }
        panic!("simulation did not settle; log {:?}", self.log);
    }
}

fn blocks(r: Range) -> impl Iterator<Item = u64> {
    (r.offset / BLOCK)..(r.end() / BLOCK)
}

fn norm(d: &Disk) -> Vec<(u64, u64)> {
    d.iter()
        .filter(|(_, v)| **v != 0)
        .map(|(k, v)| (*k, *v))
        .collect()
}

/// `BLKREP_SIM_TRACE` set: the simulator prints each state change.
fn tracing() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("BLKREP_SIM_TRACE").is_ok())
}

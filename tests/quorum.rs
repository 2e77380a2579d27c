//! The DRBD tiebreaker scenarios with real daemons and a real witness on
//! loopback; every path (alpha-beta, alpha-witness, beta-witness) runs
//! through a fault proxy that drops packets silently when cut. A primary
//! alpha, B secondary beta, W the witness. Each test ends with the same
//! check: every acknowledged write is present, and the replicas are equal
//! after the heal.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use blkrep::control::{self, Request, Response};
use blkrep::testkit::cluster::{ClusterOptions, LocalCluster, NetPath};
use blkrep::testkit::nbd_client::NbdClient;
use common::*;

const VOL: &str = "demo";
const BLOCK: u64 = 4096;

fn opts() -> ClusterOptions {
    ClusterOptions {
        witness: true,
        event_log: true,
        ..small()
    }
}

/// Brings the cluster up and waits until the witness lists both nodes.
async fn up_with_witness(tag: &str) -> LocalCluster {
    let c = up(tag, opts()).await;
    for i in 0..2 {
        if let Err(e) = c
            .wait_for(i, "both up to date at the witness", WAIT, |s| {
                s.quorum
                    .as_ref()
                    .is_some_and(|q| q.up_to_date && q.peer_up_to_date && q.witness_reachable)
            })
            .await
        {
            dump_all(&c);
            panic!("{e}");
        }
    }
    c
}

/// Watches both nodes for the whole run and records forbidden events: two
/// nodes serving as primary at the same moment (both primary with a valid
/// lease, polled together), or two nodes each seeing itself as the primary
/// of the same witness epoch.
struct Forbidden {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Forbidden {
    fn watch(c: &LocalCluster) -> Self {
        let sockets = [c.nodes[0].control.clone(), c.nodes[1].control.clone()];
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            let status = |p: std::path::PathBuf| async move {
                match control::call(
                    &p,
                    &Request::Status {
                        volume: Some(VOL.into()),
                    },
                )
                .await
                {
                    Ok(Response::Status(mut s)) if !s.volumes.is_empty() => {
                        Some(s.volumes.remove(0))
                    }
                    _ => None,
                }
            };
            while !flag.load(Ordering::Relaxed) {
                let t = Instant::now();
                let (a, b) = tokio::join!(status(sockets[0].clone()), status(sockets[1].clone()));
                // Only polls answered close together say "at the same moment"
                // (a promotion waits out the old lease plus 100 ms or more).
                if t.elapsed() < Duration::from_millis(50)
                    && let (Some(a), Some(b)) = (a, b)
                {
                    let serving = |s: &blkrep::control::VolumeStatusReport| {
                        s.role.as_deref() == Some("Primary")
                            && s.quorum.as_ref().is_some_and(|q| q.lease_valid)
                    };
                    if serving(&a) && serving(&b) {
                        seen.push(format!("two serving primaries: {a:?} / {b:?}"));
                    }
                    if let (Some(qa), Some(qb)) = (&a.quorum, &b.quorum)
                        && qa.epoch == qb.epoch
                        && qa.primary.as_deref() == Some("me")
                        && qb.primary.as_deref() == Some("me")
                    {
                        seen.push(format!("two primaries in epoch {}", qa.epoch));
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seen
        });
        Forbidden { stop, task }
    }

    async fn assert_none(self) {
        self.stop.store(true, Ordering::Relaxed);
        let seen = self.task.await.expect("monitor");
        assert!(seen.is_empty(), "forbidden events: {seen:?}");
    }
}

/// `demote VOL` as the control request (no --force).
fn demote_request() -> Request {
    Request::Secondary {
        volume: VOL.into(),
        force: false,
    }
}

fn dump_all(c: &LocalCluster) {
    dump_logs(c);
    if let Some(w) = &c.witness {
        eprintln!("===== witness log =====");
        eprintln!("{}", std::fs::read_to_string(&w.log).unwrap_or_default());
    }
}

/// What the test knows was acknowledged: block -> byte.
type Acked = BTreeMap<u64, u8>;

/// Writes `byte` over block `block` on node `i`; true when acknowledged
/// within `within`.
async fn write(c: &LocalCluster, i: usize, block: u64, byte: u8, within: Duration) -> bool {
    let sock = c.nbd_socket(i);
    let op = async {
        let mut n = NbdClient::connect(&sock).await.ok()?;
        n.write(block * BLOCK, &[byte; BLOCK as usize], true)
            .await
            .ok()?;
        Some(())
    };
    matches!(tokio::time::timeout(within, op).await, Ok(Some(())))
}

/// Reads block `block` on node `i`; None when no answer within `within`.
async fn read(c: &LocalCluster, i: usize, block: u64, within: Duration) -> Option<u8> {
    let sock = c.nbd_socket(i);
    let op = async {
        let mut n = NbdClient::connect(&sock).await.ok()?;
        let b = n.read(block * BLOCK, BLOCK as u32).await.ok()?;
        Some(b[0])
    };
    tokio::time::timeout(within, op).await.ok().flatten()
}

async fn must_write(c: &LocalCluster, i: usize, block: u64, byte: u8, acked: &mut Acked) {
    if !write(c, i, block, byte, WAIT).await {
        dump_all(c);
        panic!("write of block {block} on node {i} was not acknowledged");
    }
    acked.insert(block, byte);
}

/// Every acknowledged write is on node `i`'s disk.
fn assert_acked_on(c: &LocalCluster, i: usize, acked: &Acked) {
    let size = 16 << 20;
    let data = c.read_data(i, size).expect("read disk");
    for (&block, &byte) in acked {
        let at = (block * BLOCK) as usize;
        assert!(
            data[at..at + BLOCK as usize].iter().all(|&x| x == byte),
            "node {i} lacks acknowledged write {byte:#x} at block {block}"
        );
    }
}

fn exit_code(c: &LocalCluster, i: usize, args: &[&str]) -> (i32, String) {
    let out = cli(c, i, args);
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn heal_and_check(c: &LocalCluster, primary: usize, acked: &Acked) {
    for p in [
        NetPath::AlphaBeta,
        NetPath::AlphaWitness,
        NetPath::BetaWitness,
    ] {
        c.cut(p, false);
    }
    if let Err(e) = c.wait_in_sync(Duration::from_secs(60)).await {
        dump_all(c);
        panic!("{e}");
    }
    c.wait_both_up_to_date(primary, WAIT)
        .await
        .expect("the witness lists both again");
    assert_acked_on(c, 0, acked);
    assert_acked_on(c, 1, acked);
    assert_replicas_equal(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn witness_records_both_nodes_and_refuses_a_second_primary() {
    let c = up_with_witness("q-basic").await;
    let forbidden = Forbidden::watch(&c);
    let a = c.status(0).await.expect("status");
    let q = a.quorum.expect("quorum report");
    assert_eq!(q.primary.as_deref(), Some("me"));
    let mut acked = Acked::new();
    must_write(&c, 0, 1, 0x11, &mut acked).await;
    // beta, connected to a primary, refuses (rule 3): exit 6.
    let (code, text) = exit_code(&c, 1, &["promote", VOL]);
    assert_eq!(code, 6, "{text}");
    // A planned switchover: demote alpha, promote beta (no lease wait).
    let t = Instant::now();
    c.ok(0, demote_request()).await.expect("demote");
    let (code, text) = exit_code(&c, 1, &["promote", VOL]);
    assert_eq!(code, 0, "{text}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "switchover took {:?}",
        t.elapsed()
    );
    must_write(&c, 1, 2, 0x22, &mut acked).await;
    heal_and_check(&c, 1, &acked).await;
    forbidden.assert_none().await;
    let events = c.events(1);
    assert!(events.iter().any(|e| e == "promoted demo"), "{events:?}");
    assert!(c.events(0).iter().any(|e| e == "demoted demo"));
}

/// (1) cut A-B while both see W: A keeps writing, B becomes outdated and
/// refuses promotion. (5) W switches sides: B stays outdated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_1_and_5_cut_replication_link() {
    let c = up_with_witness("q-s1").await;
    let forbidden = Forbidden::watch(&c);
    let mut acked = Acked::new();
    must_write(&c, 0, 3, 0x31, &mut acked).await;
    c.cut(NetPath::AlphaBeta, true);
    // A completes writes once W outdated B (rule 2).
    must_write(&c, 0, 4, 0x41, &mut acked).await;
    let s = c.status(0).await.expect("status");
    assert!(!s.quorum.expect("q").peer_up_to_date);
    c.wait_for(1, "beta outdated", WAIT, |s| {
        s.disk.as_deref() == Some("Outdated")
    })
    .await
    .expect("beta learns it is outdated from the witness");
    let (code, text) = exit_code(&c, 1, &["promote", VOL]);
    assert_eq!(code, 4, "an outdated node refuses: {text}");
    // (5) W now only reachable from B: B still outdated; A loses both and
    // freezes (checked in scenario 3), B gains nothing.
    c.cut(NetPath::AlphaWitness, true);
    let (code, text) = exit_code(&c, 1, &["promote", VOL]);
    assert_eq!(code, 4, "still outdated after W switched sides: {text}");
    assert!(c.events(0).iter().any(|e| e == "peer-outdated demo"));
    heal_and_check(&c, 0, &acked).await;
    forbidden.assert_none().await;
}

/// (2) isolate B: A keeps writing; B regains nothing by reaching W alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_2_isolated_secondary() {
    let c = up_with_witness("q-s2").await;
    let forbidden = Forbidden::watch(&c);
    let mut acked = Acked::new();
    c.cut(NetPath::AlphaBeta, true);
    c.cut(NetPath::BetaWitness, true);
    must_write(&c, 0, 5, 0x52, &mut acked).await;
    c.cut(NetPath::BetaWitness, false);
    c.wait_for(1, "beta outdated", WAIT, |s| {
        s.disk.as_deref() == Some("Outdated")
    })
    .await
    .expect("outdated");
    let (code, text) = exit_code(&c, 1, &["promote", VOL]);
    assert_eq!(code, 4, "{text}");
    heal_and_check(&c, 0, &acked).await;
    forbidden.assert_none().await;
}

/// (3) isolate A: A freezes and stops serving reads, B promotes after the
/// lease, A later rejoins as resync target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_3_isolated_primary_freezes_and_survivor_takes_over() {
    let c = up_with_witness("q-s3").await;
    let forbidden = Forbidden::watch(&c);
    let mut acked = Acked::new();
    must_write(&c, 0, 6, 0x63, &mut acked).await;
    c.cut(NetPath::AlphaBeta, true);
    c.cut(NetPath::AlphaWitness, true);
    let cut_at = Instant::now();
    // A's write cannot complete: neither peer nor witness confirms.
    assert!(!write(&c, 0, 7, 0x73, Duration::from_secs(3)).await);
    // After its lease, A serves no reads either (rule 7).
    tokio::time::sleep(Duration::from_millis(2500).saturating_sub(cut_at.elapsed())).await;
    assert_eq!(read(&c, 0, 6, Duration::from_secs(2)).await, None);
    // B promotes (the cluster manager's hook); the witness consents once
    // A's lease ran out.
    let (code, text) = exit_code(&c, 1, &["promote", VOL]);
    assert_eq!(code, 0, "{text}");
    let promoted = cut_at.elapsed();
    assert!(
        promoted >= Duration::from_millis(2000),
        "promoted after {promoted:?}"
    );
    must_write(&c, 1, 8, 0x83, &mut acked).await;
    assert_eq!(read(&c, 1, 6, WAIT).await, Some(0x63));
    // Heal: A learns it was fenced and rejoins as the resync target.
    heal_and_check(&c, 1, &acked).await;
    forbidden.assert_none().await;
    let a = c.status(0).await.expect("status");
    assert_eq!(a.role.as_deref(), Some("Secondary"));
    eprintln!("scenario 3: promote completed {promoted:?} after the primary was cut off");
}

/// (4) W lost, then A-B cut: both freeze, nothing is lost, both resume when
/// anything heals; a W restarted empty relearns the record from A and B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_4_witness_lost_then_link_cut() {
    let mut c = up_with_witness("q-s4").await;
    let forbidden = Forbidden::watch(&c);
    let mut acked = Acked::new();
    c.kill_witness();
    // Still fine with the peer.
    must_write(&c, 0, 9, 0x94, &mut acked).await;
    c.cut(NetPath::AlphaBeta, true);
    assert!(!write(&c, 0, 10, 0xa4, Duration::from_secs(3)).await);
    let (code, text) = exit_code(&c, 1, &["promote", VOL]);
    assert_eq!(code, 5, "no quorum: {text}");
    // The link heals first: A resumes with B.
    c.cut(NetPath::AlphaBeta, false);
    must_write(&c, 0, 11, 0xb4, &mut acked).await;
    // W comes back with an empty disk; it learns the record from A and B.
    c.wipe_witness_state().expect("wipe");
    c.start_witness().await.expect("witness restart");
    for i in 0..2 {
        c.wait_for(i, "witness relearned", WAIT, |s| {
            s.quorum
                .as_ref()
                .is_some_and(|q| q.witness_reachable && q.epoch > 0)
        })
        .await
        .expect("relearn");
    }
    // And it arbitrates again: cut A-B, A continues after outdating B.
    c.cut(NetPath::AlphaBeta, true);
    must_write(&c, 0, 12, 0xc4, &mut acked).await;
    heal_and_check(&c, 0, &acked).await;
    forbidden.assert_none().await;
}

/// (6) both data nodes crash and only B returns with W: B promotes if and
/// only if the witness lists it as up to date.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_6_double_crash() {
    let mut c = up_with_witness("q-s6").await;
    let forbidden = Forbidden::watch(&c);
    let mut acked = Acked::new();
    must_write(&c, 0, 13, 0xd6, &mut acked).await;
    c.kill(0);
    c.kill(1);
    c.restart(1).await.expect("restart beta");
    let (code, text) = exit_code(&c, 1, &["promote", VOL]);
    assert_eq!(code, 0, "the witness lists beta as up to date: {text}");
    assert_eq!(read(&c, 1, 13, WAIT).await, Some(0xd6));
    // Now beta writes alone (outdating alpha), then both crash again and
    // only alpha returns: it must refuse.
    must_write(&c, 1, 14, 0xe6, &mut acked).await;
    c.kill(1);
    c.restart(0).await.expect("restart alpha");
    let (code, text) = exit_code(&c, 0, &["promote", VOL]);
    assert_eq!(code, 4, "alpha was outdated by beta: {text}");
    c.restart(1).await.expect("restart beta");
    c.promote(1).await.expect("beta primary again");
    heal_and_check(&c, 1, &acked).await;
    forbidden.assert_none().await;
}

/// (7) A loses W first (keeps writing with B), then A-B is cut: A stops
/// serving at once, B promotes only after A's peer lease ran out, and no
/// read on A returns data older than B's first write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_7_witness_first_then_peer() {
    let c = up_with_witness("q-s7").await;
    let forbidden = Forbidden::watch(&c);
    let mut acked = Acked::new();
    c.cut(NetPath::AlphaWitness, true);
    must_write(&c, 0, 15, 0xf7, &mut acked).await;
    assert_eq!(read(&c, 0, 15, WAIT).await, Some(0xf7));
    c.cut(NetPath::AlphaBeta, true);
    let cut_at = Instant::now();
    let (code, text) = exit_code(&c, 1, &["promote", VOL]);
    assert_eq!(code, 0, "{text}");
    let promoted = cut_at.elapsed();
    // B waited for the lease it had granted A (2 s plus drift margin).
    assert!(
        promoted >= Duration::from_millis(2000),
        "promoted after {promoted:?}"
    );
    must_write(&c, 1, 15, 0x77, &mut acked).await;
    // A, without any lease, serves nothing: no stale 0xf7.
    assert_eq!(read(&c, 0, 15, Duration::from_secs(2)).await, None);
    heal_and_check(&c, 1, &acked).await;
    forbidden.assert_none().await;
    eprintln!("scenario 7: promote completed {promoted:?} after the link was cut");
}

/// A script in tools/.
fn tool_path(script: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tools")
        .join(script)
}

fn tool(c: &LocalCluster, i: usize, script: &str, args: &[&str]) -> i32 {
    let path = tool_path(script);
    let guests = c.dir.join("guests");
    std::fs::create_dir_all(&guests).expect("guests dir");
    std::fs::write(guests.join("101"), format!("{VOL}\n")).expect("guest list");
    let out = std::process::Command::new(path)
        .args(args)
        .env("OCF_RESKEY_volume", VOL)
        .env("OCF_RESKEY_config", &c.nodes[i].config)
        .env("OCF_RESKEY_blkrep", bin())
        .env("BLKREP", bin())
        .env("BLKREP_CONFIG", &c.nodes[i].config)
        .env("BLKREP_GUESTS", &guests)
        .output()
        .expect("run tool");
    eprintln!(
        "{script} {args:?} on {i}: {:?} {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.status.code().unwrap_or(-1)
}

/// The Pacemaker agent and the Proxmox hookscript drive the real CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ocf_agent_and_proxmox_hookscript_move_the_primary() {
    let c = up_with_witness("q-ocf").await;
    assert_eq!(tool(&c, 0, "ocf-blkrep", &["meta-data"]), 0);
    assert_eq!(
        tool(&c, 0, "ocf-blkrep", &["monitor"]),
        8,
        "alpha is promoted"
    );
    assert_eq!(
        tool(&c, 1, "ocf-blkrep", &["monitor"]),
        0,
        "beta is unpromoted"
    );
    assert_eq!(
        tool(&c, 1, "ocf-blkrep", &["promote"]),
        1,
        "beta cannot promote while alpha is primary"
    );
    assert_eq!(tool(&c, 0, "ocf-blkrep", &["demote"]), 0);
    assert_eq!(tool(&c, 0, "ocf-blkrep", &["monitor"]), 0);
    assert_eq!(tool(&c, 1, "ocf-blkrep", &["promote"]), 0);
    assert_eq!(tool(&c, 1, "ocf-blkrep", &["monitor"]), 8);
    assert_eq!(tool(&c, 0, "ocf-blkrep", &["stop"]), 0);
    assert_eq!(tool(&c, 0, "ocf-blkrep", &["monitor"]), 7, "stopped");
    assert_eq!(tool(&c, 0, "ocf-blkrep", &["start"]), 0);
    assert_eq!(tool(&c, 0, "ocf-blkrep", &["monitor"]), 0);
    c.wait_in_sync(WAIT).await.expect("in sync after restart");
    // Proxmox: the guest stops on beta and starts on alpha.
    assert_eq!(tool(&c, 1, "proxmox-hookscript", &["101", "post-stop"]), 0);
    assert_eq!(tool(&c, 0, "proxmox-hookscript", &["101", "pre-start"]), 0);
    assert_eq!(tool(&c, 0, "ocf-blkrep", &["monitor"]), 8);
    // A guest start on beta now is refused (alpha is primary).
    assert_eq!(tool(&c, 1, "proxmox-hookscript", &["101", "pre-start"]), 1);
    let mut acked = Acked::new();
    must_write(&c, 0, 20, 0x20, &mut acked).await;
    heal_and_check(&c, 0, &acked).await;
}

/// Pacemaker's own checker (`ocf-tester` from Debian's resource-agents)
/// accepts the agent: start/stop/monitor/promote/demote against the real CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ocf_tester_accepts_the_agent() {
    let c = up_with_witness("q-ocft").await;
    // Leave alpha stopped and nobody primary: ocf-tester starts from there.
    c.ok(0, demote_request()).await.expect("demote");
    c.ok(
        0,
        Request::Detach {
            volume: VOL.into(),
            force: false,
        },
    )
    .await
    .expect("detach");
    // ocf-tester runs the agent as `nobody` too: give it a world-readable copy.
    let agent = c.dir.join("ocf-blkrep");
    std::fs::copy(tool_path("ocf-blkrep"), &agent).expect("copy agent");
    let out = std::process::Command::new("timeout")
        .arg("120")
        .arg("ocf-tester")
        .arg("-v")
        .arg("-n")
        .arg("vol")
        .arg("-o")
        .arg(format!("volume={VOL}"))
        .arg("-o")
        .arg(format!("config={}", c.nodes[0].config.display()))
        .arg("-o")
        .arg(format!("blkrep={}", bin().display()))
        .arg(&agent)
        .output()
        .expect("run ocf-tester (install resource-agents)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "ocf-tester failed: {text}");
    assert!(text.contains("passed all tests"), "{text}");
}

/// Rule 4: histories that diverged (two nodes wrote independently, here
/// without a witness) are never synced silently: both refuse, `status` says
/// SplitBrain, the split-brain handler runs, and `resolve --discard-local`
/// on the victim makes it a full-sync target of the survivor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_brain_is_reported_and_resolved_explicitly() {
    let mut c = up(
        "q-sb",
        ClusterOptions {
            event_log: true,
            ..small()
        },
    )
    .await;
    let mut acked = Acked::new();
    must_write(&c, 0, 30, 0x30, &mut acked).await;
    // beta goes away; alpha writes alone.
    c.kill(1);
    assert!(write(&c, 0, 31, 0xa1, WAIT).await);
    // alpha goes away; beta comes back alone and the operator forces it.
    c.kill(0);
    c.restart(1).await.expect("restart beta");
    let (code, text) = exit_code(&c, 1, &["promote", VOL, "--force"]);
    assert_eq!(code, 0, "{text}");
    must_write(&c, 1, 32, 0xb2, &mut acked).await;
    // alpha returns: diverged histories.
    c.restart(0).await.expect("restart alpha");
    for i in 0..2 {
        c.wait_for(i, "split brain reported", WAIT, |s| {
            s.peer.relation.as_deref() == Some("SplitBrain")
        })
        .await
        .expect("split brain");
    }
    let out = cli(&c, 0, &["status", VOL]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("SplitBrain"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        c.events(0).iter().any(|e| e == "split-brain demo"),
        "{:?}",
        c.events(0)
    );
    // Nothing was synced: alpha still has its own write.
    let a = c.read_data(0, 16 << 20).expect("alpha");
    assert_eq!(a[31 * BLOCK as usize], 0xa1);
    // The operator discards alpha's changes (refused on the primary).
    let (code, _) = exit_code(&c, 1, &["resolve", VOL, "--discard-local"]);
    assert_ne!(code, 0, "the primary's data is never discarded");
    let (code, text) = exit_code(&c, 0, &["resolve", VOL, "--discard-local"]);
    assert_eq!(code, 0, "{text}");
    c.wait_in_sync(Duration::from_secs(60))
        .await
        .expect("full resync");
    assert_acked_on(&c, 0, &acked);
    assert_replicas_equal(&c).await;
    let a = c.read_data(0, 16 << 20).expect("alpha");
    assert_eq!(a[31 * BLOCK as usize], 0, "alpha's discarded write is gone");
}

/// `on_no_quorum = "io-error"`: a primary cut off from peer and witness
/// fails writes with EIO instead of suspending them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_error_policy_fails_writes_without_quorum() {
    let mut c = cluster("q-eio", opts());
    for n in &c.nodes {
        let cfg = std::fs::read_to_string(&n.config).expect("config");
        let cfg = cfg.replace("[witness]\n", "[witness]\non_no_quorum = \"io-error\"\n");
        std::fs::write(&n.config, cfg).expect("config");
    }
    if let Err(e) = c.bring_up().await {
        dump_all(&c);
        panic!("{e}");
    }
    c.wait_both_up_to_date(0, WAIT).await.expect("quorum");
    c.cut(NetPath::AlphaBeta, true);
    c.cut(NetPath::AlphaWitness, true);
    let sock = c.nbd_socket(0);
    let result = tokio::time::timeout(WAIT, async {
        let mut n = NbdClient::connect(&sock).await.expect("connect");
        n.write(0, &[0x55; BLOCK as usize], true).await
    })
    .await
    .expect("the write is answered, not suspended");
    assert!(result.is_err(), "a write without quorum must fail");
    let s = c.status(0).await.expect("status");
    assert_eq!(s.quorum.expect("q").waiting_writes, 0);
    c.cut(NetPath::AlphaBeta, false);
    c.cut(NetPath::AlphaWitness, false);
    // Until a lease is back, writes keep failing (not waiting).
    c.wait_for(0, "lease regained", WAIT, |s| {
        s.quorum.as_ref().is_some_and(|q| q.lease_valid)
    })
    .await
    .expect("lease");
    let mut acked = Acked::new();
    must_write(&c, 0, 1, 0x01, &mut acked).await;
    heal_and_check(&c, 0, &acked).await;
}

/// keepalived's notify script: MASTER promotes, BACKUP demotes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalived_notify_moves_the_primary() {
    let c = up_with_witness("q-ka").await;
    let list = c.dir.join("keepalived-volumes");
    std::fs::write(&list, format!("{VOL}\n")).expect("list");
    let run = |i: usize, state: &str| {
        std::process::Command::new(tool_path("keepalived-notify"))
            .args(["INSTANCE", "VI_1", state, "100"])
            .env("BLKREP", bin())
            .env("BLKREP_CONFIG", &c.nodes[i].config)
            .env("BLKREP_VOLUMES", &list)
            .status()
            .expect("run notify")
            .code()
    };
    assert_eq!(run(0, "BACKUP"), Some(0));
    assert_eq!(run(1, "MASTER"), Some(0));
    let s = c.status(1).await.expect("status");
    assert_eq!(s.role.as_deref(), Some("Primary"));
    let mut acked = Acked::new();
    must_write(&c, 1, 2, 0x02, &mut acked).await;
    heal_and_check(&c, 1, &acked).await;
}

/// Rule 8 at the witness: a certificate for a node it does not serve, or
/// from another CA, gets no answer and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn witness_refuses_unknown_nodes_and_foreign_certificates() {
    use blkrep::link::tls::TlsMaterial;
    use blkrep::witness::{WitnessClient, WitnessOp};
    let c = up_with_witness("q-wtls").await;
    let w = c.witness.as_ref().expect("witness");
    let tls = c.dir.join("tls");
    let foreign = c.dir.join("foreign");
    blkrep::cert::create_ca(&foreign).expect("foreign CA");
    blkrep::cert::issue("mallory", &tls, &tls, 30).expect("mallory cert");
    blkrep::cert::issue("alpha", &foreign, &foreign, 30).expect("foreign alpha cert");
    let identities = [
        (
            tls.join("ca.pem"),
            tls.join("mallory.pem"),
            tls.join("mallory.key"),
        ),
        (
            tls.join("ca.pem"),
            foreign.join("alpha.pem"),
            foreign.join("alpha.key"),
        ),
    ];
    let before = std::fs::read_dir(&w.state_dir).expect("state").count();
    for (ca, cert, key) in identities {
        let m = TlsMaterial::load(&ca, &cert, &key).expect("tls material");
        let client = WitnessClient::new("witness", w.address, &m, 1000).expect("client");
        let r = client
            .change(
                VOL,
                "beta",
                0,
                WitnessOp::Promote {
                    force: true,
                    incomplete: false,
                },
            )
            .await;
        assert!(r.is_err(), "{} got an answer: {r:?}", cert.display());
    }
    assert_eq!(
        std::fs::read_dir(&w.state_dir).expect("state").count(),
        before
    );
    // The record is untouched: alpha is still primary and both up to date.
    let s = c.status(0).await.expect("status");
    let q = s.quorum.expect("quorum");
    assert!(q.primary.as_deref() == Some("me") && q.up_to_date && q.peer_up_to_date);
}

/// A new user's data loss (issue 18, item 2): beta is the target of a
/// resync from primary alpha when alpha dies. `promote` on beta is refused
/// (exit 4) with advice that names what is missing and what `--force`
/// costs; the operator forces it anyway and beta writes. When alpha, the
/// copy holding every acknowledged write, comes back, both refuse to sync
/// (split brain) and stay that way: alpha is never overwritten
/// automatically, with or without a witness. `resolve --discard-local` on
/// the forced copy then brings every acknowledged write back to both.
async fn forced_promotion_of_an_interrupted_sync_target(tag: &str, witness: bool) {
    let mut c = if witness {
        let c = up(
            tag,
            ClusterOptions {
                fault_injection: true,
                ..opts()
            },
        )
        .await;
        c.wait_both_up_to_date(0, WAIT).await.expect("witness");
        c
    } else {
        up(
            tag,
            ClusterOptions {
                fault_injection: true,
                event_log: true,
                ..small()
            },
        )
        .await
    };
    let mut acked = Acked::new();
    must_write(&c, 0, 1, 0x01, &mut acked).await;
    // beta goes away; alpha writes alone (one block in every other chunk,
    // 96 chunks that travel one by one; outdating beta at the witness
    // first).
    c.kill(1);
    for k in 0..96u64 {
        must_write(&c, 0, 2 + k * 32, 0x40 + k as u8, &mut acked).await;
    }
    // beta returns behind a cut link with a slow disk: its resync crawls
    // (32 chunks in flight, 2 s each).
    c.cut(NetPath::AlphaBeta, true);
    c.restart(1).await.expect("restart beta");
    let (code, text) = exit_code(&c, 1, &["debug", "slow-disk", VOL, "--delay-ms", "2000"]);
    assert_eq!(code, 0, "{text}");
    c.cut(NetPath::AlphaBeta, false);
    if let Err(e) = c
        .wait_for(1, "resyncing", WAIT, |s| {
            s.peer.relation.as_deref() == Some("SyncTarget")
        })
        .await
    {
        dump_all(&c);
        panic!("{e}");
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let s = c.status(1).await.expect("status");
    assert_eq!(s.disk.as_deref(), Some("Inconsistent"), "{s:?}");
    // The primary dies in the middle of the resync.
    c.kill(0);
    c.wait_for(1, "alpha gone", WAIT, |s| {
        s.peer.connection == "Disconnected"
    })
    .await
    .expect("disconnect");
    let (code, text) = exit_code(&c, 1, &["promote", VOL]);
    assert_eq!(code, 4, "{text}");
    for said in [
        "Bring the source back",
        "lacked",
        "--force",
        "split brain",
        "resolve",
    ] {
        assert!(
            text.contains(said),
            "the refusal should say {said:?}: {text}"
        );
    }
    let (code, text) = exit_code(&c, 1, &["debug", "slow-disk", VOL, "--delay-ms", "0"]);
    assert_eq!(code, 0, "{text}");
    // The operator forces it anyway: beta writes on its own history.
    let (code, text) = exit_code(&c, 1, &["promote", VOL, "--force"]);
    assert_eq!(code, 0, "{text}");
    assert!(write(&c, 1, 3, 0xb3, WAIT).await, "the forced copy serves");
    // alpha comes back: a split brain, and it stays one.
    c.restart(0).await.expect("restart alpha");
    for i in 0..2 {
        if let Err(e) = c
            .wait_for(i, "split brain reported", WAIT, |s| {
                s.peer.relation.as_deref() == Some("SplitBrain")
            })
            .await
        {
            dump_all(&c);
            panic!("{e}");
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 0..2 {
        let s = c.status(i).await.expect("status");
        assert_eq!(
            s.peer.relation.as_deref(),
            Some("SplitBrain"),
            "node {i} left the split brain on its own: {s:?}"
        );
        assert!(s.resync.is_none(), "node {i} resyncs: {s:?}");
    }
    assert_acked_on(&c, 0, &acked);
    assert!(
        c.events(0).iter().any(|e| e == "split-brain demo"),
        "{:?}",
        c.events(0)
    );
    // The operator picks the forced copy as the victim.
    let (code, text) = exit_code(&c, 1, &["demote", VOL]);
    assert_eq!(code, 0, "{text}");
    let (code, text) = exit_code(&c, 1, &["resolve", VOL, "--discard-local"]);
    assert_eq!(code, 0, "{text}");
    if let Err(e) = c.wait_in_sync(Duration::from_secs(60)).await {
        dump_all(&c);
        panic!("{e}");
    }
    assert_acked_on(&c, 0, &acked);
    assert_acked_on(&c, 1, &acked);
    assert_replicas_equal(&c).await;
    if witness {
        c.wait_both_up_to_date(0, WAIT)
            .await
            .expect("the witness lists both again");
    }
    let (code, text) = exit_code(&c, 0, &["promote", VOL]);
    assert_eq!(code, 0, "the complete copy serves again: {text}");
    must_write(&c, 0, 4, 0x04, &mut acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_promotion_of_a_sync_target_never_overwrites_the_complete_copy() {
    forced_promotion_of_an_interrupted_sync_target("q-force-w", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_promotion_of_a_sync_target_without_witness_stays_a_split_brain() {
    forced_promotion_of_an_interrupted_sync_target("q-force-nw", false).await;
}

/// Issue 18, item 3: a peer that detached the volume counts as gone for
/// promotion. `detach` of a primary demotes it first (telling the peer
/// and the witness), so the other node takes over at once; and a secondary
/// detached after a `demote` does not block the promotion either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_peer_does_not_block_failover() {
    let c = up_with_witness("q-detach").await;
    let mut acked = Acked::new();
    must_write(&c, 0, 7, 0x07, &mut acked).await;
    // Order 1: detach the primary directly.
    let (code, text) = exit_code(&c, 0, &["detach", VOL]);
    assert_eq!(code, 0, "{text}");
    let started = Instant::now();
    let (code, text) = exit_code(&c, 1, &["promote", VOL]);
    assert_eq!(code, 0, "promote after the primary detached: {text}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the promotion waited for a lease the detached primary gave up: {:?}",
        started.elapsed()
    );
    must_write(&c, 1, 8, 0x08, &mut acked).await;
    let (code, text) = exit_code(&c, 0, &["attach", VOL]);
    assert_eq!(code, 0, "{text}");
    if let Err(e) = c.wait_in_sync(WAIT).await {
        dump_all(&c);
        panic!("{e}");
    }
    // Order 2: demote, let the peer see it, then detach.
    let (code, text) = exit_code(&c, 1, &["demote", VOL]);
    assert_eq!(code, 0, "{text}");
    c.wait_for(0, "peer secondary", WAIT, |s| {
        s.peer.role.as_deref() == Some("Secondary")
    })
    .await
    .expect("peer secondary");
    let (code, text) = exit_code(&c, 1, &["detach", VOL]);
    assert_eq!(code, 0, "{text}");
    let (code, text) = exit_code(&c, 0, &["promote", VOL]);
    assert_eq!(code, 0, "promote after the secondary detached: {text}");
    must_write(&c, 0, 9, 0x09, &mut acked).await;
    let (code, text) = exit_code(&c, 1, &["attach", VOL]);
    assert_eq!(code, 0, "{text}");
    if let Err(e) = c.wait_in_sync(WAIT).await {
        dump_all(&c);
        panic!("{e}");
    }
    assert_acked_on(&c, 0, &acked);
    assert_acked_on(&c, 1, &acked);
    assert_replicas_equal(&c).await;
}

/// Issue 14, hole 2: the two nodes' link settings differ. Alpha grants
/// leases of 10 s and accepts 1024 requests in flight; beta grants 2 s and
/// accepts 8. The holder counts each lease with its grantor's length, and
/// each side sends no more than the other accepts:
/// - a storm with more writers than beta accepts keeps the link up (no
///   drop for exceeding the in-flight limit);
/// - alpha, cut off from the witness and heard by beta no more (it still
///   hears beta, so its link stays up), stops serving reads by the time
///   beta's promotion completes (rule 7), though its own config says 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_different_link_settings_keep_rule_7_and_the_link() {
    let mut c = cluster("q-terms", opts());
    for (i, extra) in [
        (0, "lease_ms = 10000\ninflight_requests_max = 1024\n"),
        (1, "inflight_requests_max = 8\n"),
    ] {
        let cfg = std::fs::read_to_string(&c.nodes[i].config).expect("config");
        let cfg = cfg.replacen("[link]\n", &format!("[link]\n{extra}"), 1);
        std::fs::write(&c.nodes[i].config, cfg).expect("config");
    }
    if let Err(e) = c.bring_up().await {
        dump_all(&c);
        panic!("bring up: {e}");
    }
    c.wait_both_up_to_date(0, WAIT)
        .await
        .expect("the witness lists both");
    let storm = blkrep::testkit::storm::Storm::start(c.nbd_socket(0), 32, 2048, 0x7e);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ledger = storm.stop().await;
    assert!(ledger.acked_writes() > 100, "{}", ledger.acked_writes());
    for i in 0..2 {
        let log = std::fs::read_to_string(&c.nodes[i].log).unwrap_or_default();
        assert!(
            !log.contains("in-flight request limit") && !log.contains("(connection 2)"),
            "node {i} dropped the link: {log}"
        );
    }
    let mut acked = Acked::new();
    must_write(&c, 0, 6, 0x63, &mut acked).await;
    c.cut_from_dialer(NetPath::AlphaBeta, true);
    c.cut(NetPath::AlphaWitness, true);
    let (code, text) = exit_code(&c, 1, &["promote", VOL]);
    assert_eq!(code, 0, "{text}");
    let s = c.status(0).await.expect("alpha status");
    assert_eq!(
        s.peer.connection, "Connected",
        "alpha's link is still up (it hears beta): only the lease stops it"
    );
    assert_eq!(
        read(&c, 0, 6, Duration::from_millis(500)).await,
        None,
        "alpha still serves reads after beta was promoted"
    );
    must_write(&c, 1, 8, 0x83, &mut acked).await;
    c.cut_from_dialer(NetPath::AlphaBeta, false);
    heal_and_check(&c, 1, &acked).await;
}

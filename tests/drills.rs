//! Fault drills with real daemons and a real witness: a write storm runs on
//! the primary while a fault hits (a killed process, a flapping, lossy or
//! slow replication link); every drill ends with the same check: every
//! acknowledged write is on both copies and the copies are equal.

mod common;

use std::path::Path;
use std::time::Duration;

use blkrep::control::Request;
use blkrep::testkit::cluster::{ClusterOptions, LocalCluster, NetPath};
use blkrep::testkit::nbd_client::NbdClient;
use blkrep::testkit::storm::STORM_BLOCK_BYTES;
use blkrep::testkit::storm::{Ledger, Storm};
use common::*;

const BLOCKS: u64 = 2048; // the storm writes the first 8 MiB
const WRITERS: u64 = 2;

async fn up_with_witness(tag: &str) -> LocalCluster {
    up_with(
        tag,
        ClusterOptions {
            witness: true,
            ..small()
        },
    )
    .await
}

/// `up` with the given options, then waits until the witness lists both
/// copies as up to date.
async fn up_with(tag: &str, opts: ClusterOptions) -> LocalCluster {
    let c = up(tag, opts).await;
    await_witness_record(&c).await;
    c
}

async fn await_witness_record(c: &LocalCluster) {
    c.wait_both_up_to_date(0, WAIT)
        .await
        .expect("witness record");
}

/// A write storm on node `i` (two QD1 writers), seeded with `seed`.
fn storm(c: &LocalCluster, i: usize, seed: u64) -> Storm {
    Storm::start(c.nbd_socket(i), WRITERS, BLOCKS, seed)
}

/// The cluster manager's failover hook on node `i` (`blkrep promote`).
fn promote_through_hook(c: &LocalCluster, i: usize) {
    let o = cli(c, i, &["promote", &c.opts.volume]);
    assert!(
        o.status.success(),
        "promote on node {i}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A drill's seed: `BLKREP_DRILL_SEED`, else `default`.
fn drill_seed(default: u64) -> u64 {
    std::env::var("BLKREP_DRILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// `newer` after what `ledger` holds so far (see `Ledger::then`);
/// returns the whole.
fn append(ledger: &mut Option<Ledger>, newer: Ledger) -> Ledger {
    let all = match ledger.take() {
        Some(old) => old.then(&newer),
        None => newer,
    };
    *ledger = Some(all.clone());
    all
}

/// Stops the storm and checks that it got writes acknowledged.
async fn stop(storm: Storm) -> Ledger {
    let ledger = storm.stop().await;
    assert!(
        ledger.acked_writes() > 0,
        "the storm got no write acknowledged"
    );
    ledger
}

/// Flushes through the export of the node that is primary.
async fn flush_through_the_primary(c: &LocalCluster) {
    for i in 0..2 {
        let role = c.status(i).await.expect("status").role;
        if role.as_deref() == Some("Primary") {
            let mut nbd = NbdClient::connect(&c.nbd_socket(i)).await.expect("nbd");
            nbd.flush().await.expect("flush through the primary");
            return;
        }
    }
    panic!("no node is primary");
}

/// Waits for both copies to be in sync, then checks every acknowledged
/// write on both disks and the copies byte for byte.
async fn assert_nothing_lost(c: &LocalCluster, ledger: &Ledger) {
    if let Err(e) = c.wait_in_sync(Duration::from_secs(90)).await {
        dump_logs(c);
        panic!("{e}");
    }
    let size = c.status(0).await.expect("status").size_bytes.expect("size");
    if c.opts.volatile_cache {
        // The disk files lack what the disks' caches still hold: the
        // primary's flush writes both caches out (a flush covers the peer).
        flush_through_the_primary(c).await;
    }
    for i in 0..2 {
        let data = c.read_data(i, size).expect("read disk");
        let lost = ledger.lost_in(&data);
        if !lost.is_empty() {
            dump_logs(c);
        }
        assert!(
            lost.is_empty(),
            "node {i} lost acknowledged writes to blocks {lost:?} ({} unacknowledged writes were in flight)",
            ledger.unacknowledged()
        );
    }
    assert_replicas_equal(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secondary_killed_during_writes() {
    let mut c = up_with_witness("d-kill-b").await;
    let storm = storm(&c, 0, 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.kill(1);
    // The primary goes on once the witness outdated beta.
    tokio::time::sleep(Duration::from_secs(4)).await;
    writes_continue(&c, &storm, Duration::from_secs(1), "without beta").await;
    c.restart(1).await.expect("restart beta");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ledger = stop(storm).await;
    assert_nothing_lost(&c, &ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_replication_link_during_writes() {
    let c = up_with_witness("d-flap").await;
    let storm = storm(&c, 0, 2);
    for round in 0..10 {
        c.cut(NetPath::AlphaBeta, round % 2 == 0);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    c.cut(NetPath::AlphaBeta, false);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ledger = stop(storm).await;
    assert_nothing_lost(&c, &ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_and_slow_replication_link_during_writes() {
    let c = up_with_witness("d-lossy").await;
    let storm = storm(&c, 0, 3);
    c.set_loss(NetPath::AlphaBeta, 200);
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.set_loss(NetPath::AlphaBeta, 0);
    c.set_delay(NetPath::AlphaBeta, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.set_delay(NetPath::AlphaBeta, Duration::ZERO);
    let ledger = stop(storm).await;
    assert_nothing_lost(&c, &ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn witness_killed_and_restarted_during_writes() {
    let mut c = up_with_witness("d-witness").await;
    let storm = storm(&c, 0, 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.kill_witness();
    // With the peer connected nothing needs the witness.
    writes_continue(&c, &storm, Duration::from_secs(3), "without the witness").await;
    c.start_witness().await.expect("witness restart");
    c.wait_for(0, "witness reachable again", WAIT, |s| {
        s.quorum.as_ref().is_some_and(|q| q.witness_reachable)
    })
    .await
    .expect("reachable");
    let ledger = stop(storm).await;
    assert_nothing_lost(&c, &ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_data_nodes_killed_and_restarted() {
    let mut c = up_with_witness("d-both").await;
    let storm = storm(&c, 0, 5);
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.kill(0);
    c.kill(1);
    let ledger = stop(storm).await;
    for i in 0..2 {
        c.restart(i).await.expect("restart");
    }
    // The witness still lists alpha as primary and both as up to date.
    c.promote(0).await.expect("alpha primary again");
    assert_nothing_lost(&c, &ledger).await;
}

/// libfaketime (Debian's `faketime` package), thread-safe flavour.
const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// Storm progress across one `window`: writes must keep completing.
/// On failure both daemons' logs go to stderr.
async fn writes_continue(c: &LocalCluster, storm: &Storm, window: Duration, what: &str) {
    let before = storm.acked_writes();
    tokio::time::sleep(window).await;
    if storm.acked_writes() <= before {
        dump_logs(c);
        panic!("writes stopped {what}");
    }
}

/// The wall clock of the witness and both daemons jumps 20 days forward,
/// then 20 hours back, during a write storm, each for longer than a lease:
/// leases count on the monotonic clock, so nothing freezes, no lease is
/// lost and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_jumps_do_not_touch_leases() {
    assert!(
        Path::new(FAKETIME_LIB).exists(),
        "{FAKETIME_LIB} is missing (apt install faketime; tools/test-all installs it)"
    );
    let clock = std::env::temp_dir().join(format!("blkrep-faketime-{}", std::process::id()));
    std::fs::write(&clock, "+0\n").expect("fake clock file");
    let env = [
        ("LD_PRELOAD", FAKETIME_LIB),
        (
            "FAKETIME_TIMESTAMP_FILE",
            clock.to_str().expect("utf-8 path"),
        ),
        ("FAKETIME_NO_CACHE", "1"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // The mechanism works here: `date` under the same environment jumps.
    std::fs::write(&clock, "+400d\n").expect("fake clock file");
    let year = |envs: &[(String, String)]| -> i32 {
        let o = std::process::Command::new("date")
            .arg("+%Y")
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("date");
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .expect("year")
    };
    assert!(
        year(&env) > year(&[]),
        "libfaketime does not move the wall clock here"
    );
    std::fs::write(&clock, "+0\n").expect("fake clock file");

    let c = up_with(
        "d-clock",
        ClusterOptions {
            witness: true,
            env: env.clone(),
            ..small()
        },
    )
    .await;
    // The daemons run with the fake clock loaded.
    for i in 0..2 {
        let pid = c.pid(i).expect("daemon pid");
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        assert!(
            maps.contains("libfaketime"),
            "node {i} runs without the fake clock"
        );
    }
    let storm = storm(&c, 0, 6);
    writes_continue(&c, &storm, Duration::from_millis(500), "before the jumps").await;
    std::fs::write(&clock, "+20d\n").expect("jump forward");
    writes_continue(
        &c,
        &storm,
        Duration::from_secs(3),
        "after the clock jumped 20 days forward",
    )
    .await;
    std::fs::write(&clock, "-20h\n").expect("jump back");
    writes_continue(
        &c,
        &storm,
        Duration::from_secs(3),
        "after the clock jumped back",
    )
    .await;
    std::fs::write(&clock, "+0\n").expect("clock back to normal");
    let s = c.status(0).await.expect("status");
    let q = s.quorum.expect("quorum status");
    assert!(q.lease_valid && q.peer_up_to_date, "{q:?}");
    assert_eq!(q.held_for_lease_requests, 0);
    let ledger = stop(storm).await;
    assert_nothing_lost(&c, &ledger).await;
    for n in &c.nodes {
        let log = std::fs::read_to_string(&n.log).unwrap_or_default();
        assert!(
            !log.contains("no lease") && !log.contains("quorum-lost"),
            "{} lost a lease when the wall clock jumped:\n{log}",
            n.name
        );
    }
    let _ = std::fs::remove_file(&clock);
}

/// Detaches and re-attaches node `i`'s volume (the operator's step after
/// replacing a failed disk or freeing space).
async fn reattach(c: &LocalCluster, i: usize) {
    let volume = || c.opts.volume.clone();
    // On a disk that failed, the final metadata write cannot land: the
    // detach says so, and the volume is stopped all the same.
    if let Err(e) = c
        .ok(
            i,
            Request::Detach {
                volume: volume(),
                force: false,
            },
        )
        .await
    {
        assert!(
            format!("{e:?}").contains("final metadata write failed"),
            "detach: {e:?}"
        );
    }
    c.ok(i, Request::Attach { volume: volume() })
        .await
        .expect("attach");
}

/// Reads every acknowledged block through node `i`'s export.
async fn assert_readable_through(c: &LocalCluster, i: usize, ledger: &Ledger) {
    let mut nbd = NbdClient::connect(&c.nbd_socket(i)).await.expect("nbd");
    for block in ledger.blocks() {
        let found = nbd
            .read(block * STORM_BLOCK_BYTES, STORM_BLOCK_BYTES as u32)
            .await
            .expect("read");
        assert!(
            ledger.holds(block, &found),
            "block {block} read wrong through node {i}"
        );
    }
}

/// The primary's local disk fails in the middle of a write storm: it goes
/// Diskless and keeps serving writes and reads through the peer; after the
/// operator re-attaches it (a new disk), it is fully resynced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_local_disk_fails_during_writes() {
    let c = up_with(
        "d-disk-fail",
        ClusterOptions {
            witness: true,
            fault_injection: true,
            event_log: true,
            ..small()
        },
    )
    .await;
    let storm = storm(&c, 0, 7);
    writes_continue(&c, &storm, Duration::from_millis(500), "before the failure").await;
    c.ok(
        0,
        Request::FailDisk {
            volume: c.opts.volume.clone(),
        },
    )
    .await
    .expect("fail alpha's disk");
    c.wait_for(0, "alpha diskless", WAIT, |s| {
        s.disk.as_deref() == Some("Diskless")
    })
    .await
    .expect("diskless");
    writes_continue(
        &c,
        &storm,
        Duration::from_secs(2),
        "after alpha's disk failed",
    )
    .await;
    let ledger = stop(storm).await;
    let s = c.status(0).await.expect("status");
    assert_eq!(s.role.as_deref(), Some("Primary"));
    assert!(
        c.events(0)
            .iter()
            .any(|e| e.starts_with("local-disk-failed"))
    );
    assert_readable_through(&c, 0, &ledger).await;
    // Heal: a new disk (the fault plan is reset on attach).
    reattach(&c, 0).await;
    assert_nothing_lost(&c, &ledger).await;
}

/// The secondary's disk is a sparse file on a filesystem that fills up in
/// the middle of a write storm (ENOSPC, as with an over-committed thin
/// pool): the secondary drops its disk, the primary goes on alone after
/// the witness outdated it; once space is freed and the volume
/// re-attached, it resyncs and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secondary_disk_full_during_writes() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("needs root to mount a small filesystem (CI runs as root): skipped");
        return;
    }
    let mut c = cluster(
        "d-full",
        ClusterOptions {
            witness: true,
            event_log: true,
            ..small()
        },
    );
    let fs = SmallFs::new(&c.dir, 48 << 20);
    // beta's disk moves onto the small filesystem (still sparse).
    fs.move_in(&c.nodes[1].disk);
    if let Err(e) = c.bring_up().await {
        dump_logs(&c);
        panic!("bring up: {e}");
    }
    await_witness_record(&c).await;
    // Leave about 1 MiB free: the storm fills it within a second.
    let ballast = fs.mountpoint.join("ballast");
    let keep_free = 1 << 20;
    run(
        "fallocate",
        &[
            "-l",
            &(fs.free_bytes() - keep_free).to_string(),
            ballast.to_str().expect("path"),
        ],
    );
    let storm = storm(&c, 0, 8);
    c.wait_for(1, "beta lost its disk", WAIT, |s| {
        s.disk.as_deref() == Some("Diskless")
    })
    .await
    .expect("beta diskless after ENOSPC");
    let log = std::fs::read_to_string(&c.nodes[1].log).unwrap_or_default();
    assert!(log.contains("No space left on device"), "{log}");
    writes_continue(
        &c,
        &storm,
        Duration::from_secs(2),
        "after beta's disk filled up",
    )
    .await;
    let s = c.status(0).await.expect("status");
    assert!(
        !s.quorum.expect("quorum").peer_up_to_date,
        "the witness outdated beta"
    );
    // Heal: free the space, re-attach.
    std::fs::remove_file(&ballast).expect("free space");
    reattach(&c, 1).await;
    writes_continue(&c, &storm, Duration::from_secs(1), "during the resync").await;
    let ledger = stop(storm).await;
    assert_nothing_lost(&c, &ledger).await;
    assert!(
        c.events(1)
            .iter()
            .any(|e| e.starts_with("local-disk-failed"))
    );
    drop(c);
    drop(fs);
}

/// The secondary's disk becomes much slower than the primary's (20 ms per
/// write) during a write storm: writes slow down to the secondary's pace
/// but keep completing, the link stays up and in sync (no spurious
/// timeout or outdating), and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_secondary_disk_during_writes() {
    let c = up_with(
        "d-slow",
        ClusterOptions {
            witness: true,
            fault_injection: true,
            ..small()
        },
    )
    .await;
    let storm = storm(&c, 0, 9);
    writes_continue(
        &c,
        &storm,
        Duration::from_millis(500),
        "before the slowdown",
    )
    .await;
    let slow = |delay_ms| Request::SlowDisk {
        volume: c.opts.volume.clone(),
        delay_ms,
    };
    c.ok(1, slow(20)).await.expect("slow beta's disk");
    let before = storm.acked_writes();
    let started = std::time::Instant::now();
    for _ in 0..6 {
        writes_continue(
            &c,
            &storm,
            Duration::from_millis(500),
            "with a slow secondary",
        )
        .await;
        let s = c.status(0).await.expect("status");
        assert_eq!(s.peer.relation.as_deref(), Some("InSync"), "{s:?}");
        assert!(s.quorum.expect("quorum").peer_up_to_date);
    }
    // Every write waited for beta's slow disk: at most one write per
    // writer per 20 ms (+ the one each had in flight).
    let slow_writes = storm.acked_writes() - before;
    let bound = WRITERS * (started.elapsed().as_millis() as u64 / 20 + 1);
    assert!(
        slow_writes <= bound,
        "{slow_writes} writes in the slow phase, at most {bound} possible: the delay did not apply"
    );
    c.ok(1, slow(0)).await.expect("beta's disk normal again");
    let ledger = stop(storm).await;
    assert_nothing_lost(&c, &ledger).await;
}

/// Every datagram on the replication link (both directions) is delivered
/// once more 300 ms later, as a replaying network or attacker would: the
/// stale copies of earlier writes must not overwrite newer data. QUIC's
/// packet protection and numbering refuse them; nothing is lost and the
/// copies stay equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_datagrams_on_the_replication_link_change_nothing() {
    let c = up_with_witness("d-replay").await;
    // Few blocks, so that replayed old writes would hit rewritten blocks.
    let storm = Storm::start(c.nbd_socket(0), WRITERS, 64, 10);
    c.set_replay(NetPath::AlphaBeta, Duration::from_millis(300));
    writes_continue(
        &c,
        &storm,
        Duration::from_secs(3),
        "while datagrams were replayed",
    )
    .await;
    let ledger = stop(storm).await;
    // The last replays arrive after the storm ended.
    tokio::time::sleep(Duration::from_millis(600)).await;
    c.set_replay(NetPath::AlphaBeta, Duration::ZERO);
    let replayed = c.replayed(NetPath::AlphaBeta);
    assert!(
        replayed > ledger.acked_writes(),
        "only {replayed} datagrams replayed"
    );
    let s = c.status(0).await.expect("status");
    assert_eq!(s.peer.relation.as_deref(), Some("InSync"), "{s:?}");
    assert_nothing_lost(&c, &ledger).await;
}

/// The failover's second half: a storm on beta (now primary) goes on
/// while alpha restarts and is resynced from beta.
async fn storm_on_beta_while_alpha_returns(c: &mut LocalCluster, seed: u64) -> Ledger {
    let second = storm(c, 1, seed);
    writes_continue(c, &second, Duration::from_millis(500), "on the new primary").await;
    c.restart(0).await.expect("restart alpha");
    writes_continue(c, &second, Duration::from_secs(1), "while alpha resyncs").await;
    stop(second).await
}

/// The primary is killed with SIGKILL in the middle of a write storm; the
/// cluster manager's hook (`blkrep promote`) makes the survivor primary as
/// soon as the witness consents; the storm goes on there; the dead node
/// comes back as secondary and is resynced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_killed_during_writes() {
    let mut c = up_with_witness("d-kill-a").await;
    let first = storm(&c, 0, 11);
    writes_continue(&c, &first, Duration::from_millis(500), "before the kill").await;
    c.kill(0);
    let first = stop(first).await;
    promote_through_hook(&c, 1);
    let second = storm_on_beta_while_alpha_returns(&mut c, 12).await;
    assert_nothing_lost(&c, &first.then(&second)).await;
}

/// Rule 6, many times: the primary is killed at seeded random moments of a
/// write storm, restarted and made primary again; its activity log marks
/// what it may have been writing, the resync copies that, and after every
/// cycle both copies hold every acknowledged write and are equal.
/// `BLKREP_DRILL_SEED=N` replays another schedule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_killed_at_seeded_moments_always_resyncs_to_equal_copies() {
    let seed = drill_seed(0x6b11);
    let mut rng = blkrep::testkit::rng::SplitMix64(seed);
    let mut c = up("d-kill-many", small()).await;
    let mut ledger: Option<Ledger> = None;
    for cycle in 0..6 {
        let s = storm(&c, 0, rng.next_u64());
        let kill_after_ms = 100 + rng.below(900);
        tokio::time::sleep(Duration::from_millis(kill_after_ms)).await;
        c.kill(0);
        let this = stop(s).await;
        append(&mut ledger, this);
        c.restart(0).await.expect("restart alpha");
        c.promote(0).await.unwrap_or_else(|e| {
            dump_logs(&c);
            panic!("seed {seed} cycle {cycle}: alpha primary again: {e}")
        });
        if let Some(l) = &ledger {
            assert_nothing_lost(&c, l).await;
        }
    }
}

/// A power cut tears a 64 KiB write on the primary: half of it reaches the
/// disk, the write never completes, the process dies. After the restart the
/// activity log covers the torn region, the resync copies it, and both
/// copies are equal; the region holds the old data, the new data, or the
/// torn mix (the write was never acknowledged), and nothing else changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_write_at_a_crash_resyncs_to_equal_copies() {
    let mut c = up(
        "d-torn",
        ClusterOptions {
            fault_injection: true,
            ..small()
        },
    )
    .await;
    const AT: u64 = 1 << 20;
    let storm = storm(&c, 0, 13);
    writes_continue(&c, &storm, Duration::from_millis(300), "before the tear").await;
    let ledger = stop(storm).await;
    let old = vec![0x11u8; 65536];
    let new = vec![0x22u8; 65536];
    let mut nbd = NbdClient::connect(&c.nbd_socket(0)).await.expect("nbd");
    nbd.write(AT, &old, true).await.expect("old data");
    c.ok(
        0,
        Request::TearWrite {
            volume: c.opts.volume.clone(),
        },
    )
    .await
    .expect("tear");
    let write = tokio::spawn(async move { nbd.write(AT, &new, true).await });
    // Wait until the first half is on alpha's disk, then cut the power.
    let half_on_disk = || {
        let d = c.read_data(0, AT + 65536).expect("read");
        d[AT as usize..AT as usize + 32768]
            .iter()
            .all(|&x| x == 0x22)
    };
    let deadline = std::time::Instant::now() + WAIT;
    while !half_on_disk() {
        assert!(
            std::time::Instant::now() < deadline,
            "the torn half never landed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.kill(0);
    assert!(
        !matches!(write.await, Ok(Ok(()))),
        "the torn write must not be acknowledged"
    );
    c.restart(0).await.expect("restart alpha");
    c.promote(0).await.expect("alpha primary again");
    // The storm's blocks are all below 8 MiB; the torn region lies inside
    // them, so leave its blocks out of the storm check.
    let region = AT / STORM_BLOCK_BYTES..(AT + 65536) / STORM_BLOCK_BYTES;
    let mut kept = ledger.clone();
    kept.forget(region);
    assert_nothing_lost(&c, &kept).await;
    let d = c.read_data(0, AT + 65536).expect("read");
    let r = &d[AT as usize..];
    let is = |lo: usize, hi: usize, b: u8| r[lo..hi].iter().all(|&x| x == b);
    assert!(
        is(0, 65536, 0x11) || is(0, 65536, 0x22) || (is(0, 32768, 0x22) && is(32768, 65536, 0x11)),
        "the torn region holds something no write put there"
    );
}

// ---- power cuts (issue 13) ----
//
// The data disks get a volatile write cache held in the daemon's memory
// (`debug.volatile_cache`): a write without FUA completes once it is
// cached and reaches the disk only when a flush covers it. `power_cut`
// keeps a seeded subset of what is cached and ends the daemon at once, and
// its restart sees another boot. With one node cut at a time, the other
// holds every acknowledged write, so nothing acknowledged may be lost (P2,
// which implies P1 for the flushed ones), and the copies end equal (P3).

/// A witness cluster whose data disks have volatile caches.
async fn up_volatile(tag: &str) -> LocalCluster {
    up_with(
        tag,
        ClusterOptions {
            witness: true,
            volatile_cache: true,
            ..small()
        },
    )
    .await
}

async fn cut_power(c: &mut LocalCluster, i: usize, seed: u64) {
    c.power_cut(i, seed).await.expect("power cut");
}

/// The storm issued flushes and FUA writes (the ledger knows what they
/// promised) and some acknowledged writes were not flushed when the power
/// went.
fn assert_storm_mixed(ledger: &Ledger) {
    assert!(ledger.flushes() > 0, "the storm never flushed");
    assert!(ledger.promised_blocks() > 0, "nothing was promised durable");
}

/// Hole 1 of issue 13, with real daemons: the secondary loses power in the
/// middle of a storm (its cache held acknowledged writes no flush covered
/// yet). The primary marks what the secondary may have lost; once the
/// secondary is back and in sync, the primary loses power too and the
/// cluster manager fails over to the secondary: it holds everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secondary_power_cut_during_writes_then_failover_to_it() {
    let mut c = up_volatile("d-pc-b").await;
    let s = storm(&c, 0, 21);
    writes_continue(&c, &s, Duration::from_millis(700), "before the cut").await;
    cut_power(&mut c, 1, 21).await;
    // The storm ends with the cut (the writes in flight then complete
    // without beta): the resync must then copy what beta lost, not just
    // the few chunks written since, which would cover it by chance.
    let first = stop(s).await;
    assert_storm_mixed(&first);
    c.restart(1).await.expect("restart beta");
    assert_nothing_lost(&c, &first).await;
    cut_power(&mut c, 0, 22).await;
    promote_through_hook(&c, 1);
    assert_readable_through(&c, 1, &first).await;
    c.restart(0).await.expect("restart alpha");
    assert_nothing_lost(&c, &first).await;
}

/// The primary loses power mid-storm; the survivor is promoted through the
/// hook and holds every acknowledged write; the storm goes on there; the
/// old primary comes back (it knows it lost power: it syncs from the
/// survivor, whatever its activity log says) and both copies end equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_power_cut_during_writes_survivor_promoted() {
    let mut c = up_volatile("d-pc-a").await;
    let s = storm(&c, 0, 31);
    writes_continue(&c, &s, Duration::from_millis(700), "before the cut").await;
    cut_power(&mut c, 0, 31).await;
    let first = stop(s).await;
    assert_storm_mixed(&first);
    promote_through_hook(&c, 1);
    assert_readable_through(&c, 1, &first).await;
    let second = storm_on_beta_while_alpha_returns(&mut c, 32).await;
    assert_nothing_lost(&c, &first.then(&second)).await;
}

/// The secondary is cut again and again at seeded moments of a storm, and
/// once more while the resync after the previous cut runs (a cut on the
/// target); then the primary is cut while it is the source of a resync.
/// After each round every acknowledged write is on both copies.
/// `BLKREP_DRILL_SEED=N` replays another schedule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_at_seeded_moments_and_during_resyncs() {
    let seed = drill_seed(0x9c07);
    let mut rng = blkrep::testkit::rng::SplitMix64(seed);
    let mut c = up_volatile("d-pc-many").await;
    let mut ledger: Option<Ledger> = None;
    let mut keep = |l: Ledger| append(&mut ledger, l);
    for round in 0..3 {
        let s = storm(&c, 0, rng.next_u64());
        tokio::time::sleep(Duration::from_millis(200 + rng.below(800))).await;
        cut_power(&mut c, 1, rng.next_u64()).await;
        writes_continue(&c, &s, Duration::from_secs(4), "without beta").await;
        c.restart(1).await.expect("restart beta");
        if round == 1 {
            // The resync into beta is running: cut beta (the target) again.
            tokio::time::sleep(Duration::from_millis(100 + rng.below(300))).await;
            cut_power(&mut c, 1, rng.next_u64()).await;
            c.restart(1).await.expect("restart beta");
        }
        let l = keep(stop(s).await);
        assert_nothing_lost(&c, &l).await;
    }
    // The source of a resync loses power: beta is away while alpha writes,
    // comes back, and alpha is cut while it copies to beta. Beta cannot
    // take over (its copy is incomplete); alpha comes back and finishes.
    let s = storm(&c, 0, rng.next_u64());
    cut_power(&mut c, 1, rng.next_u64()).await;
    writes_continue(&c, &s, Duration::from_secs(4), "without beta").await;
    let l = keep(stop(s).await);
    c.restart(1).await.expect("restart beta");
    tokio::time::sleep(Duration::from_millis(50 + rng.below(200))).await;
    cut_power(&mut c, 0, rng.next_u64()).await;
    c.restart(0).await.expect("restart alpha");
    // Alpha lost power: it promotes only once it synced with beta.
    if let Err(e) = c.wait_in_sync(Duration::from_secs(90)).await {
        dump_logs(&c);
        panic!("seed {seed}: {e}");
    }
    if let Err(e) = c.promote(0).await {
        dump_logs(&c);
        panic!("seed {seed}: alpha primary again after its power cut and the resync: {e}");
    }
    assert_nothing_lost(&c, &l).await;
}

//! Fault drills with real daemons and a real witness: a write storm runs on
//! the primary while a fault hits (a killed process, a flapping, lossy or
//! slow replication link); every drill ends with the same check: every
//! acknowledged write is on both copies and the copies are equal.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blkrep::testkit::cluster::{ClusterOptions, LocalCluster, NetPath};
use blkrep::testkit::nbd_client::NbdClient;
use blkrep::testkit::rng::SplitMix64;
use common::*;

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 2048; // the storm writes the first 8 MiB

type Acked = Arc<Mutex<BTreeMap<u64, u64>>>;

async fn up_with_witness(tag: &str) -> LocalCluster {
    let c = up(
        tag,
        ClusterOptions {
            witness: true,
            ..small()
        },
    )
    .await;
    c.wait_for(0, "both up to date at the witness", WAIT, |s| {
        s.quorum
            .as_ref()
            .is_some_and(|q| q.up_to_date && q.peer_up_to_date)
    })
    .await
    .expect("witness record");
    c
}

/// A write storm on node `i`: QD1 writes of tagged blocks until `stop`;
/// records what was acknowledged. Ends early when the node goes away.
struct Storm {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
    acked: Acked,
}

impl Storm {
    fn start(c: &LocalCluster, i: usize, seed: u64, acked: Acked) -> Self {
        let sock = c.nbd_socket(i);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let record = acked.clone();
        let task = tokio::spawn(async move {
            let Ok(mut n) = NbdClient::connect(&sock).await else {
                return 0;
            };
            let mut rng = SplitMix64(seed);
            let mut buf = vec![0u8; BLOCK as usize];
            let mut done = 0;
            while !flag.load(Ordering::Relaxed) {
                let block = rng.next_u64() % BLOCKS;
                let tag = rng.next_u64();
                SplitMix64::fill(&mut buf, tag);
                let w = n.write(block * BLOCK, &buf, done % 16 == 0);
                match tokio::time::timeout(Duration::from_secs(20), w).await {
                    Ok(Ok(())) => {
                        if let Ok(mut a) = record.lock() {
                            a.insert(block, tag);
                        }
                        done += 1;
                    }
                    _ => break,
                }
            }
            done
        });
        Storm { stop, task, acked }
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let n = self.task.await.unwrap_or(0);
        assert!(
            !self.acked.lock().expect("acked").is_empty(),
            "the storm got no write acknowledged"
        );
        n
    }
}

/// Waits for both copies to be in sync, then checks every acknowledged
/// write on both disks and the copies byte for byte.
async fn assert_nothing_lost(c: &LocalCluster, acked: &Acked) {
    if let Err(e) = c.wait_in_sync(Duration::from_secs(90)).await {
        dump_logs(c);
        panic!("{e}");
    }
    let size = c.status(0).await.expect("status").size_bytes.expect("size");
    let acked = acked.lock().expect("acked").clone();
    let mut buf = vec![0u8; BLOCK as usize];
    for i in 0..2 {
        let data = c.read_data(i, size).expect("read disk");
        for (&block, &tag) in &acked {
            SplitMix64::fill(&mut buf, tag);
            let at = (block * BLOCK) as usize;
            assert!(
                data[at..at + BLOCK as usize] == buf[..],
                "node {i} lost acknowledged write to block {block}"
            );
        }
    }
    assert_replicas_equal(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secondary_killed_during_writes() {
    let mut c = up_with_witness("d-kill-b").await;
    let acked = Acked::default();
    let storm = Storm::start(&c, 0, 1, acked.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.kill(1);
    // The primary goes on once the witness outdated beta.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let before = acked.lock().expect("acked").len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        acked.lock().expect("acked").len() > before,
        "writes go on without beta"
    );
    c.restart(1).await.expect("restart beta");
    tokio::time::sleep(Duration::from_secs(1)).await;
    storm.stop().await;
    assert_nothing_lost(&c, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_replication_link_during_writes() {
    let c = up_with_witness("d-flap").await;
    let acked = Acked::default();
    let storm = Storm::start(&c, 0, 2, acked.clone());
    for round in 0..10 {
        c.cut(NetPath::AlphaBeta, round % 2 == 0);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    c.cut(NetPath::AlphaBeta, false);
    tokio::time::sleep(Duration::from_secs(1)).await;
    storm.stop().await;
    assert_nothing_lost(&c, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_and_slow_replication_link_during_writes() {
    let c = up_with_witness("d-lossy").await;
    let acked = Acked::default();
    let storm = Storm::start(&c, 0, 3, acked.clone());
    c.set_loss(NetPath::AlphaBeta, 200);
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.set_loss(NetPath::AlphaBeta, 0);
    c.set_delay(NetPath::AlphaBeta, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.set_delay(NetPath::AlphaBeta, Duration::ZERO);
    let n = storm.stop().await;
    assert!(n > 0);
    assert_nothing_lost(&c, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn witness_killed_and_restarted_during_writes() {
    let mut c = up_with_witness("d-witness").await;
    let acked = Acked::default();
    let storm = Storm::start(&c, 0, 4, acked.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.kill_witness();
    // With the peer connected nothing needs the witness.
    let before = acked.lock().expect("acked").len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        acked.lock().expect("acked").len() > before,
        "writes go on without the witness"
    );
    c.start_witness().await.expect("witness restart");
    c.wait_for(0, "witness reachable again", WAIT, |s| {
        s.quorum.as_ref().is_some_and(|q| q.witness_reachable)
    })
    .await
    .expect("reachable");
    storm.stop().await;
    assert_nothing_lost(&c, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_data_nodes_killed_and_restarted() {
    let mut c = up_with_witness("d-both").await;
    let acked = Acked::default();
    let storm = Storm::start(&c, 0, 5, acked.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.kill(0);
    c.kill(1);
    storm.stop().await;
    for i in 0..2 {
        c.restart(i).await.expect("restart");
    }
    // The witness still lists alpha as primary and both as up to date.
    c.promote(0).await.expect("alpha primary again");
    assert_nothing_lost(&c, &acked).await;
}

//! Two real daemons on loopback, real NBD clients, byte-for-byte checks.

mod common;

use std::time::Duration;

use blkrep::control::Request;
use blkrep::testkit::cluster::{ClusterOptions, LocalCluster};
use blkrep::testkit::nbd_client::NbdClient;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_land_on_both_disks() {
    let c = up("qemu-io", small()).await;
    qemu_io(
        &c,
        0,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 4M 64k",
            "write -P 0x11 -f 8M 4k",
            "write -z 256k 128k",
            "discard 512k 64k",
            "flush",
        ],
    );
    // Read back through the export, including an unaligned read.
    qemu_io(
        &c,
        0,
        &[
            "read -P 0xab 0 256k",
            "read -P 0 256k 128k",
            "read -P 0xcd 4M 64k",
            "read -P 0xab 1000 3000",
        ],
    );
    assert_replicas_equal(&c).await;
    // The pattern is really on beta's disk, not just equal zeros.
    let b = c.read_data(1, 5 << 20).expect("read beta");
    assert!(b[..256 * 1024].iter().all(|&x| x == 0xab));
    assert!(b[4 << 20..(4 << 20) + 65536].iter().all(|&x| x == 0xcd));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_copies_an_image_onto_the_volume() {
    let c = up("qemu-img", small()).await;
    let src = c.dir.join("src.raw");
    let mut data = vec![0u8; 8 << 20];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    std::fs::write(&src, &data).expect("write source image");
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(nbd_uri(&c, 0))
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_replicas_equal(&c).await;
    assert_eq!(c.read_data(1, data.len() as u64).expect("beta"), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_overlapping_writes_keep_replicas_identical() {
    let c = up("overlap", small()).await;
    let socket = c.nbd_socket(0);
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let socket = socket.clone();
        tasks.push(tokio::spawn(async move {
            let mut cl = NbdClient::connect(&socket).await.expect("connect");
            let mut x = t.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            for _ in 0..300 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // All writes hit the same 64 KiB, in sizes of 4-32 KiB.
                let block = x % 16;
                let count = 1 + (x >> 8) % 8;
                let count = count.min(16 - block);
                let data = vec![(x >> 16) as u8; (count * 4096) as usize];
                cl.write(block * 4096, &data, false).await.expect("write");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    assert_replicas_equal(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_secondary_is_resynced_from_the_bitmap() {
    let mut c = up("kill-secondary", small()).await;
    let mut cl = NbdClient::connect(&c.nbd_socket(0)).await.expect("connect");
    let block = vec![0x5au8; 4096];
    for i in 0..200u64 {
        cl.write(i * 4096, &block, false)
            .await
            .expect("write before kill");
    }
    c.kill(1);
    // Writes keep completing on the primary while the peer is gone.
    let block2 = vec![0xa5u8; 4096];
    for i in 0..300u64 {
        cl.write((1000 + i * 3) * 4096, &block2, i % 10 == 0)
            .await
            .expect("write while peer is down");
    }
    cl.flush().await.expect("flush");
    let s = c
        .wait_for(0, "peer marked outdated", WAIT, |s| {
            s.peer.connection == "Disconnected" && s.out_of_sync_bytes > 0
        })
        .await
        .expect("alpha tracks out-of-sync regions");
    assert_eq!(s.peer.disk.as_deref(), Some("Outdated"));
    let dirty = s.out_of_sync_bytes;
    assert!(
        dirty < 16 << 20,
        "only touched chunks are dirty, not the whole volume ({dirty})"
    );
    c.restart(1).await.expect("restart beta");
    c.wait_in_sync(WAIT).await.expect("resync");
    assert_eq!(c.status(0).await.expect("status").out_of_sync_bytes, 0);
    assert_replicas_equal(&c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_disk_failure_detaches_and_serves_through_the_peer() {
    let opts = ClusterOptions {
        fault_injection: true,
        ..small()
    };
    let c = up("disk-fail", opts).await;
    qemu_io(&c, 0, &["write -P 0x42 0 64k", "flush"]);
    c.ok(
        0,
        Request::FailDisk {
            volume: c.opts.volume.clone(),
        },
    )
    .await
    .expect("fail disk");
    // The next I/O hits the dead disk; the node detaches it and carries on.
    qemu_io(
        &c,
        0,
        &[
            "write -P 0x77 1M 64k",
            "flush",
            "read -P 0x42 0 64k",
            "read -P 0x77 1M 64k",
        ],
    );
    let s = c
        .wait_for(0, "diskless", WAIT, |s| {
            s.disk.as_deref() == Some("Diskless")
        })
        .await
        .expect("diskless");
    assert_eq!(s.role.as_deref(), Some("Primary"));
    let b = c.read_data(1, 2 << 20).expect("beta");
    assert!(
        b[1 << 20..(1 << 20) + 65536].iter().all(|&x| x == 0x77),
        "the peer holds the write"
    );
    let beta = c.status(1).await.expect("beta status");
    assert_eq!(beta.disk.as_deref(), Some("UpToDate"));
    // Its final metadata write cannot land on the dead disk: the detach
    // says so instead of reporting a clean stop, and the volume is gone.
    let out = cli(&c, 0, &["detach", "demo"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "detach reported success: {text}");
    assert!(
        text.contains("final metadata write failed"),
        "detach does not say why: {text}"
    );
    let out = cli(&c, 0, &["detach", "demo"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not attached"),
        "the volume is still attached: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secondary_refuses_promotion_while_the_primary_is_connected() {
    let c = up("peer-primary", small()).await;
    let out = cli(&c, 1, &["primary", "demo"]);
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("peer still primary"));
    // After an orderly switch-over the other node may write.
    let out = cli(&c, 0, &["secondary", "demo"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.wait_for(1, "peer secondary", WAIT, |s| {
        s.peer.role.as_deref() == Some("Secondary")
    })
    .await
    .expect("peer state");
    let out = cli(&c, 1, &["primary", "demo"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.wait_for(1, "export", Duration::from_secs(10), |s| s.export.is_some())
        .await
        .expect("export on beta");
    qemu_io(&c, 1, &["write -P 0x99 0 4k", "flush"]);
    assert_replicas_equal(&c).await;
}

/// Rule 6 with real daemons: kill -9 the primary in the middle of a write
/// storm (a different moment per run), restart it; its activity log marks
/// exactly the extents it may have been writing, the resync copies those
/// (not the whole volume), every acknowledged write is there, and both disks
/// end up equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_primary_recovers_from_its_activity_log() {
    for run in 0..3u64 {
        let opts = ClusterOptions {
            disk_bytes: 64 << 20,
            ..small()
        };
        let mut c = up(&format!("kill-primary-{run}"), opts).await;
        let socket = c.nbd_socket(0);
        let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel();
        let writer = tokio::spawn(async move {
            let mut cl = NbdClient::connect(&socket).await.expect("connect");
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ run;
            loop {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Writes stay in the first 8 MiB: two activity-log extents.
                let block = x % 2048;
                let data = vec![(x >> 24) as u8 | 1; 4096];
                // (block, value, acknowledged): the attempt first, then the ack.
                if acked_tx.send((block, data[0], false)).is_err() {
                    return;
                }
                if cl.write(block * 4096, &data, false).await.is_err() {
                    return;
                }
                if acked_tx.send((block, data[0], true)).is_err() {
                    return;
                }
            }
        });
        let mut acked = std::collections::BTreeMap::new();
        // The one write in flight at the kill may or may not have landed.
        let mut in_flight = None;
        let mut note = |(b, v, done): (u64, u8, bool),
                        acked: &mut std::collections::BTreeMap<u64, u8>| {
            if done {
                acked.insert(b, v);
                in_flight = None;
            } else {
                in_flight = Some((b, v));
            }
        };
        let kill_after = 200 + run * 150;
        while (acked.len() as u64) < kill_after {
            let ev = acked_rx.recv().await.expect("writer alive");
            note(ev, &mut acked);
        }
        // Hundreds of writes into two 4 MiB extents cost a couple of
        // activity-log updates, not one per write.
        let al = c.status(0).await.expect("status").activity_log_updates;
        assert!(
            (1..=4).contains(&al),
            "{al} activity-log updates for {} writes",
            acked.len()
        );
        c.kill(0);
        let _ = writer.await;
        while let Ok(ev) = acked_rx.try_recv() {
            note(ev, &mut acked);
        }
        c.restart(0).await.expect("restart alpha");
        let s = c.status(0).await.expect("status");
        let size = s.size_bytes.expect("size");
        if s.out_of_sync_bytes == 0 || s.out_of_sync_bytes > 12 << 20 {
            dump_logs(&c);
            eprintln!("alpha: {s:?}\nbeta: {:?}", c.status(1).await);
        }
        assert!(s.out_of_sync_bytes > 0, "the activity log marked nothing");
        assert!(
            s.out_of_sync_bytes <= 12 << 20,
            "only the active extents are resynced, not the whole volume ({} of {size})",
            s.out_of_sync_bytes
        );
        c.ok(
            0,
            Request::Primary {
                volume: c.opts.volume.clone(),
                force: false,
            },
        )
        .await
        .expect("primary again");
        c.wait_in_sync(WAIT).await.expect("resync after the crash");
        let mut cl = NbdClient::connect(&c.nbd_socket(0)).await.expect("connect");
        for (block, v) in &acked {
            let got = cl.read(block * 4096, 4096).await.expect("read");
            let newer = in_flight.filter(|(b, _)| b == block).map(|(_, nv)| nv);
            assert!(
                got.iter().all(|x| x == v) || newer.is_some_and(|nv| got.iter().all(|x| *x == nv)),
                "run {run}: acknowledged write to block {block} lost"
            );
        }
        assert_replicas_equal(&c).await;
    }
}

/// After a failover the dead primary comes back: the new primary resyncs the
/// union of its own changes and the old primary's activity log, not the
/// whole volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_resync_copies_only_what_may_differ() {
    let opts = ClusterOptions {
        disk_bytes: 64 << 20,
        ..small()
    };
    let mut c = up("failover-partial", opts).await;
    let mut cl = NbdClient::connect(&c.nbd_socket(0))
        .await
        .expect("connect alpha");
    for i in 0..100u64 {
        cl.write(i * 4096, &[0x11; 4096], false)
            .await
            .expect("write on alpha");
    }
    c.kill(0);
    c.wait_for(1, "peer loss", WAIT, |s| {
        s.peer.connection == "Disconnected"
    })
    .await
    .expect("beta notices");
    c.ok(
        1,
        Request::Primary {
            volume: c.opts.volume.clone(),
            force: false,
        },
    )
    .await
    .expect("promote beta");
    c.wait_for(1, "export", WAIT, |s| s.export.is_some())
        .await
        .expect("export on beta");
    let mut cl = NbdClient::connect(&c.nbd_socket(1))
        .await
        .expect("connect beta");
    for i in 0..100u64 {
        cl.write((32 << 20) + i * 4096, &[0x22; 4096], false)
            .await
            .expect("write on beta");
    }
    c.restart(0).await.expect("restart alpha");
    c.wait_in_sync(WAIT).await.expect("resync");
    let s = c.status(1).await.expect("beta status");
    let moved = s.last_resync.expect("beta was the sync source").total_bytes;
    let size = s.size_bytes.expect("size");
    assert!(
        moved > 0 && moved <= 8 << 20,
        "resync moved {moved} of {size} bytes"
    );
    assert_replicas_equal(&c).await;
    let d = c.read_data(0, 33 << 20).expect("alpha data");
    assert!(
        d[32 << 20..(32 << 20) + 409600].iter().all(|&x| x == 0x22),
        "beta's writes reached alpha"
    );
}

/// Restarts node `i` after a crash, waits for the resync and returns the
/// bytes it copied (alpha's `last_resync`, source either way once in sync:
/// alpha is the up-to-date copy in the tests that use this).
async fn restart_and_resync(c: &mut LocalCluster, i: usize) -> u64 {
    c.restart(i).await.expect("restart");
    c.wait_in_sync(WAIT).await.expect("resync finishes");
    c.status(0)
        .await
        .expect("status")
        .last_resync
        .expect("resync ran")
        .total_bytes
}

/// A resync interrupted by the loss of its target resumes where it stopped:
/// the bytes copied after the restart are about the remainder, not the total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_resync_resumes_where_it_stopped() {
    let opts = ClusterOptions {
        disk_bytes: 32 << 20,
        resync_rate_max_bytes_per_s: 8 << 20,
        ..small()
    };
    let mut c = up("resync-resume", opts).await;
    c.kill(1);
    let mut cl = NbdClient::connect(&c.nbd_socket(0)).await.expect("connect");
    let mut data = vec![0u8; 1 << 20];
    for i in 0..16u64 {
        data.iter_mut()
            .enumerate()
            .for_each(|(j, b)| *b = (i as usize * 31 + j % 251) as u8 | 1);
        cl.write(i << 20, &data, false)
            .await
            .expect("write while beta is down");
    }
    cl.flush().await.expect("flush");
    let dirty = c.status(0).await.expect("status").out_of_sync_bytes;
    assert_eq!(dirty, 16 << 20);
    c.restart(1).await.expect("restart beta");
    let progress = c
        .wait_for(0, "a third of the resync", WAIT, |s| {
            s.resync.as_ref().is_some_and(|r| r.done_bytes >= 5 << 20)
        })
        .await
        .expect("resync progresses");
    c.kill(1);
    let done_before = progress.resync.map(|r| r.done_bytes).unwrap_or(0);
    let second = restart_and_resync(&mut c, 1).await;
    // Slack: chunks the target acknowledged but had not flushed yet are
    // copied again (they may have been lost with it), plus 1 MiB.
    let slack = blkrep::engine::RESYNC_FLUSH_EVERY_BYTES + (1 << 20);
    assert!(
        second <= dirty - done_before + slack,
        "after the restart {second} bytes were copied; {done_before} of {dirty} were already done"
    );
    assert_replicas_equal(&c).await;
}

/// Online verify finds damage on the peer's copy while the volume is in use,
/// reports where, marks it; `resync --checksum` repairs exactly that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_verify_finds_damage_and_resync_repairs_it() {
    use std::os::unix::fs::FileExt;
    let c = up("verify", small()).await;
    qemu_io(&c, 0, &["write -P 0xab 0 8M", "flush"]);
    // Bit rot on beta's disk, behind blkrep's back.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&c.nodes[1].disk)
        .expect("beta disk");
    f.write_all_at(&[0x00], (1 << 20) + 100).expect("damage 1");
    f.write_all_at(&[0x5a; 4096], 5 << 20).expect("damage 2");
    f.sync_all().expect("sync");
    drop(f);
    let o = cli(&c, 0, &["verify", "demo"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("131072 bytes differ"), "{out}");
    assert!(
        out.contains("offset 1048576 length 65536") && out.contains("offset 5242880 length 65536"),
        "{out}"
    );
    assert_eq!(c.status(0).await.expect("status").out_of_sync_bytes, 131072);
    let o = cli(&c, 0, &["resync", "demo", "--checksum"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    if let Err(e) = c
        .wait_for(0, "repaired", WAIT, |s| {
            s.out_of_sync_bytes == 0 && s.peer.relation.as_deref() == Some("InSync")
        })
        .await
    {
        dump_logs(&c);
        eprintln!("beta: {:?}", c.status(1).await);
        panic!("resync did not repair: {e}");
    }
    c.wait_in_sync(WAIT).await.expect("in sync");
    assert_replicas_equal(&c).await;
    let o = cli(&c, 0, &["verify", "demo"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("; 0 bytes differ"), "{out}");
}

/// Replaces node `i`'s disk by a blank one (`create-md` on it) and restarts
/// it; returns once it is a sync target (Inconsistent, connected).
async fn swap_drive(c: &mut LocalCluster, i: usize, size: u64) {
    c.kill(i);
    std::fs::remove_file(&c.nodes[i].disk).expect("remove old disk");
    let f = std::fs::File::create(&c.nodes[i].disk).expect("new disk");
    f.set_len(size).expect("size");
    drop(f);
    let o = cli(c, i, &["create-md", "demo"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    c.restart(i).await.expect("restart");
    let s = c
        .wait_for(i, "sync target", WAIT, |s| {
            s.peer.relation.as_deref() == Some("SyncTarget")
                && s.disk.as_deref() == Some("Inconsistent")
        })
        .await
        .expect("a sync target");
    assert_eq!(s.peer.relation.as_deref(), Some("SyncTarget"));
}

/// A 16 MiB cluster where alpha wrote 0x3c at 0-4 MiB and 0x4d at 12 MiB,
/// then beta's drive was swapped: beta is the target of a full sync running
/// at `rate_bytes_per_s`.
async fn swapped_drive_cluster(tag: &str, rate_bytes_per_s: u64) -> LocalCluster {
    let opts = ClusterOptions {
        resync_rate_max_bytes_per_s: rate_bytes_per_s,
        ..small()
    };
    let mut c = up(tag, opts).await;
    qemu_io(
        &c,
        0,
        &["write -P 0x3c 0 4M", "write -P 0x4d 12M 1M", "flush"],
    );
    swap_drive(&mut c, 1, 16 << 20).await;
    c
}

/// The cluster manager moves the primary role from alpha to beta, the sync
/// target; exits of both commands must be 0.
fn move_primary_to_the_sync_target(c: &LocalCluster) {
    for (i, cmd) in [(0, "secondary"), (1, "primary")] {
        let o = cli(c, i, &[cmd, "demo"]);
        assert!(
            o.status.success(),
            "{cmd} on node {i}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// Kills alpha and waits until beta has noticed.
async fn kill_the_source(c: &mut LocalCluster) {
    c.kill(0);
    c.wait_for(1, "source gone", WAIT, |s| {
        s.peer.connection == "Disconnected"
    })
    .await
    .expect("beta sees alpha gone");
}

/// Drive swap: a node's disk is replaced by a blank one; `create-md` on it
/// and `attach` give a full sync from the up-to-date node; the node is
/// UpToDate only when that finishes. While its source is unreachable it
/// refuses promotion (exit 4) and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drive_swap_gets_a_full_sync() {
    let mut c = swapped_drive_cluster("drive-swap", 2 << 20).await;
    // The source goes away: a copy still being synced is not promoted.
    kill_the_source(&mut c).await;
    let o = cli(&c, 1, &["primary", "demo"]);
    let why = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(4),
        "a sync target without its source was promoted: {why}"
    );
    assert!(why.contains("Inconsistent"), "{why}");
    c.restart(0).await.expect("restart alpha");
    c.wait_in_sync(WAIT).await.expect("full sync");
    let o = cli(&c, 1, &["primary", "demo"]);
    assert!(
        o.status.success(),
        "up to date now: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let last = c
        .status(0)
        .await
        .expect("status")
        .last_resync
        .expect("resync");
    assert_eq!(
        last.total_bytes,
        c.status(0).await.expect("status").size_bytes.expect("size"),
        "a full sync"
    );
    assert_replicas_equal(&c).await;
}

/// A sync target whose source is connected can be made primary: it reads
/// regions not synced yet from the source, forwards its writes to the
/// source (and writes its own copy after it, in order with the resync), and
/// serves locally once the resync is done. Both copies end equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoted_sync_target_serves_through_its_source() {
    // 16 MiB at 1 MiB/s: the copy is far from complete while we look.
    let c = swapped_drive_cluster("promote-target", 1 << 20).await;
    move_primary_to_the_sync_target(&c);
    let text = cli(&c, 1, &["status", "demo"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("I/O goes through the sync source"),
        "status does not say where I/O goes:\n{text}"
    );
    // Regions the resync has not reached (it copies from the start at
    // 1 MiB/s) come from the source; then the application writes.
    qemu_io(
        &c,
        1,
        &[
            "read -P 0x4d 12M 1M",
            "read -P 0x00 14M 1M",
            "read -P 0x3c 0 4M",
            "write -P 0x77 8M 1M",
            "write -P 0x66 13M 64k",
            "write -z 14M 512k",
            "flush",
            "read -P 0x77 8M 1M",
            "read -P 0x66 13M 64k",
        ],
    );
    let s = c.status(1).await.expect("status");
    assert_eq!(
        (s.role.as_deref(), s.disk.as_deref()),
        (Some("Primary"), Some("Inconsistent")),
        "the reads and writes above must have run while beta's copy was incomplete"
    );
    c.wait_in_sync(Duration::from_secs(60))
        .await
        .expect("the resync into the primary finishes");
    let s = c.status(1).await.expect("status");
    assert_eq!(s.role.as_deref(), Some("Primary"));
    // Now local reads: everything the application wrote is on beta's disk.
    qemu_io(
        &c,
        1,
        &[
            "read -P 0x3c 0 4M",
            "read -P 0x77 8M 1M",
            "read -P 0x4d 12M 1M",
            "read -P 0x66 13M 64k",
            "read -P 0x00 14M 512k",
            "write -P 0x11 1M 4k",
            "flush",
        ],
    );
    assert_replicas_equal(&c).await;
}

/// A promoted sync target whose source goes away freezes its I/O (its own
/// copy is incomplete, and no other copy may take over): a write waits,
/// `status` says why, and it completes once the source is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoted_sync_target_freezes_while_its_source_is_away() {
    let mut c = swapped_drive_cluster("target-freeze", 1 << 20).await;
    move_primary_to_the_sync_target(&c);
    kill_the_source(&mut c).await;
    let uri = nbd_uri(&c, 1);
    let writer = std::thread::spawn(move || {
        std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x5a 10M 64k", "-c", "flush"])
            .arg(uri)
            .output()
            .expect("run qemu-io")
    });
    let s = c
        .wait_for(1, "frozen write", WAIT, |s| s.frozen_requests > 0)
        .await
        .expect("the write waits for the source");
    assert_eq!(s.disk.as_deref(), Some("Inconsistent"));
    assert!(
        !writer.is_finished(),
        "the write completed without its source"
    );
    let text = cli(&c, 1, &["status", "demo"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("I/O FROZEN"),
        "status does not say so:\n{text}"
    );
    c.restart(0).await.expect("restart alpha");
    let out = writer.join().expect("writer thread");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && !log.contains("failed"), "{log}");
    c.wait_in_sync(Duration::from_secs(60))
        .await
        .expect("the resync finishes");
    qemu_io(&c, 1, &["read -P 0x3c 0 4M", "read -P 0x5a 10M 64k"]);
    assert_replicas_equal(&c).await;
}

/// A full sync (drive swap) interrupted by a crash of its *source*, the
/// primary, resumes where it stopped after the restart: the target took the
/// source's bitmap base as its generation, so the remainder travels as a
/// bitmap resync instead of the whole volume again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_sync_interrupted_by_a_source_crash_resumes() {
    let size: u64 = 64 << 20;
    let opts = ClusterOptions {
        disk_bytes: size,
        // 256 chunks (the progress persisted per step) are 4 MiB.
        chunk_bytes: 16 * 1024,
        resync_rate_max_bytes_per_s: 8 << 20,
        ..small()
    };
    let mut c = up("full-resume", opts).await;
    // One activity-log extent (4 MiB) hot on the primary at its crash.
    qemu_io(&c, 0, &["write -P 0x5e 0 1M", "flush"]);
    swap_drive(&mut c, 1, size).await;
    let volume_bytes = c.status(0).await.expect("status").size_bytes.expect("size");
    let progress = c
        .wait_for(0, "half of the full sync", WAIT, |s| {
            s.resync
                .as_ref()
                .is_some_and(|r| r.total_bytes == volume_bytes && r.done_bytes >= volume_bytes / 2)
        })
        .await
        .expect("full sync progresses");
    let done_before = progress.resync.map(|r| r.done_bytes).unwrap_or(0);
    c.kill(0);
    let second = restart_and_resync(&mut c, 0).await;
    // Slack: progress is persisted every 256 chunks (4 MiB here) and the
    // crash marks the primary's hot activity-log extent (4 MiB).
    let slack = 8 << 20;
    assert!(
        second <= volume_bytes - done_before + slack,
        "after the source's restart {second} bytes were copied; {done_before} of \
         {volume_bytes} were already done"
    );
    assert_replicas_equal(&c).await;
}

/// libnbd's tools against the export: nbdinfo sees the size and block
/// constraints, nbdcopy copies an image in and out (multi-connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_and_nbdcopy_work_against_the_export() {
    let c = up("nbdcopy", small()).await;
    let uri = nbd_uri(&c, 0);
    let o = std::process::Command::new("nbdinfo")
        .arg("--json")
        .arg(&uri)
        .output()
        .expect("nbdinfo (libnbd-bin)");
    assert!(
        o.status.success(),
        "nbdinfo: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).expect("nbdinfo JSON");
    let export = &info["exports"][0];
    let size = c.status(0).await.expect("status").size_bytes.expect("size");
    assert_eq!(export["export-size"], size);
    assert_eq!(export["block_size_minimum"], 4096);
    assert_eq!(export["can_flush"], true);
    assert_eq!(export["can_fua"], true);
    let src = c.dir.join("in.raw");
    let data: Vec<u8> = (0..size as usize).map(|i| (i / 4096 % 251) as u8).collect();
    std::fs::write(&src, &data).expect("source image");
    let o = std::process::Command::new("nbdcopy")
        .arg(&src)
        .arg(&uri)
        .output()
        .expect("nbdcopy");
    assert!(
        o.status.success(),
        "nbdcopy in: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = c.dir.join("out.raw");
    let o = std::process::Command::new("nbdcopy")
        .arg(&uri)
        .arg(&out)
        .output()
        .expect("nbdcopy");
    assert!(
        o.status.success(),
        "nbdcopy out: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(std::fs::read(&out).expect("copy"), data);
    assert_replicas_equal(&c).await;
    assert_eq!(c.read_data(1, size).expect("beta"), data);
}

/// Issue 18, item 5: one rule for `demote` and `detach` (as DRBD refuses
/// `secondary` and `down` while the device is open): an export with a
/// client connected is in use, busy or idle, and both are refused (exit 9)
/// while the client keeps working; `--force` disconnects the client and
/// steps down. Without a client they succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demote_and_detach_refuse_an_export_in_use_unless_forced() {
    let c = up("in-use", small()).await;
    let run = |i: usize, args: &[&str]| {
        let o = cli(&c, i, args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.code(), text)
    };
    let mut client = NbdClient::connect(&c.nbd_socket(0)).await.expect("connect");
    client.write(0, &[0x5a; 4096], true).await.expect("write");
    for verb in ["demote", "detach"] {
        let (code, text) = run(0, &[verb, "demo"]);
        assert_eq!(code, Some(9), "{verb} with an idle client: {text}");
        assert!(
            text.contains("in use") && text.contains("1 NBD client") && text.contains("--force"),
            "{text}"
        );
    }
    // Refused means nothing changed: the client still writes, alpha is
    // still primary.
    client
        .write(4096, &[0x5b; 4096], true)
        .await
        .expect("write after the refusals");
    assert_eq!(
        c.status(0).await.expect("status").role.as_deref(),
        Some("Primary")
    );
    // A busy client is refused the same way, every time.
    let sock = c.nbd_socket(0);
    let busy = tokio::spawn(async move {
        let mut n = NbdClient::connect(&sock).await.expect("connect");
        for k in 0..200u64 {
            if n.write((16 + k % 64) * 4096, &[k as u8; 4096], false)
                .await
                .is_err()
            {
                return k;
            }
        }
        200
    });
    for _ in 0..3 {
        let (code, text) = run(0, &["demote", "demo"]);
        assert_eq!(code, Some(9), "demote with a busy client: {text}");
    }
    // --force disconnects the clients and demotes.
    let (code, text) = run(0, &["demote", "demo", "--force"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        client.write(8192, &[0x5c; 4096], true).await.is_err(),
        "the forced demotion left the client connected"
    );
    let _ = busy.await;
    assert_eq!(
        c.status(0).await.expect("status").role.as_deref(),
        Some("Secondary")
    );
    // The same for detach, on the other node.
    let (code, text) = run(1, &["promote", "demo"]);
    assert_eq!(code, Some(0), "{text}");
    let mut client = NbdClient::connect(&c.nbd_socket(1)).await.expect("connect");
    client.write(0, &[0x6a; 4096], true).await.expect("write");
    let (code, text) = run(1, &["detach", "demo"]);
    assert_eq!(code, Some(9), "{text}");
    let (code, text) = run(1, &["detach", "demo", "--force"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        client.read(0, 4096).await.is_err(),
        "detach --force left the client connected"
    );
    // Without clients, both succeed at once.
    let (code, text) = run(1, &["attach", "demo"]);
    assert_eq!(code, Some(0), "{text}");
    c.wait_in_sync(WAIT).await.expect("in sync");
    let (code, text) = run(0, &["promote", "demo"]);
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = run(0, &["demote", "demo"]);
    assert_eq!(code, Some(0), "{text}");
}

/// Issue 18: the NBD socket a crashed primary left behind is removed when
/// its daemon starts again, so that clients get "no such file" (nothing is
/// exported here) instead of a refused connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_primarys_nbd_socket_is_removed_when_it_restarts() {
    let mut c = up("stale-sock", small()).await;
    let sock = c.nbd_socket(0);
    assert!(sock.exists());
    c.kill(0);
    assert!(sock.exists(), "a kill -9 leaves the socket file");
    c.start(0).await.expect("restart alpha");
    let e = std::os::unix::net::UnixStream::connect(&sock).expect_err("nothing exported");
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
}

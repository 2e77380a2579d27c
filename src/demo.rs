//! `blkrep demo`: a throw-away two-node cluster with a witness on loopback
//! that shows the promise end to end: writes acknowledged through NBD are on
//! both disks; after the primary is killed with SIGKILL the survivor is
//! promoted through the failover hook (`blkrep promote`, as a cluster manager
//! calls it; the witness consents once the dead primary's lease ran out) and
//! holds every acknowledged write; the dead node comes back, resyncs, and
//! both copies are byte-for-byte equal.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::control::Request;
use crate::testkit::cluster::{ClusterError, ClusterOptions, LocalCluster, scratch_dir};
use crate::testkit::nbd_client::{NbdClient, NbdClientError};
use crate::testkit::rng::SplitMix64;

/// Options of `blkrep demo`.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Size of each node's disk in MiB.
    #[arg(long, default_value_t = 64)]
    pub size_mib: u64,
    /// Number of 4 KiB writes before the primary is killed.
    #[arg(long, default_value_t = 2000)]
    pub writes: u64,
    /// Leave the cluster's files in place and print where they are.
    #[arg(long)]
    pub keep: bool,
    /// Print one JSON object instead of the timeline.
    #[arg(long)]
    pub json: bool,
    /// Working directory (default: a fresh one under the temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Demo errors.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Cluster setup or control.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// NBD client.
    #[error(transparent)]
    Nbd(#[from] NbdClientError),
    /// The current executable cannot be found.
    #[error("cannot find the blkrep executable: {0}")]
    Exe(std::io::Error),
    /// The failover hook failed.
    #[error("failover hook: {0}")]
    Hook(String),
}

/// What the demo measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DemoReport {
    /// Writes acknowledged to the client before the kill.
    pub acked_writes: u64,
    /// Acknowledged writes missing or wrong on the new primary.
    pub acked_writes_lost: u64,
    /// Both backing data areas equal at the end.
    pub replicas_equal: bool,
    /// Milliseconds from the kill until the survivor saw the peer gone.
    pub detected_ms: u64,
    /// Milliseconds from the kill until `primary` succeeded on the survivor.
    pub promoted_ms: u64,
    /// Milliseconds from the kill until the first write on the new primary.
    pub first_write_ms: u64,
    /// Milliseconds from the kill until the restarted node was resynced.
    pub resync_done_ms: u64,
    /// Bytes the resync copied (the union of the new primary's changes and
    /// the old primary's activity log), and the volume size for scale.
    pub resync_bytes: u64,
    /// Size of the volume.
    pub volume_bytes: u64,
}

/// Runs the demo; true when nothing was lost and the replicas are equal.
pub async fn run(args: DemoArgs) -> Result<bool, DemoError> {
    let bin = std::env::current_exe().map_err(DemoError::Exe)?;
    let dir = args.dir.clone().unwrap_or_else(|| scratch_dir("demo"));
    let say = |s: &str| {
        if !args.json {
            println!("{s}");
        }
    };
    let opts = ClusterOptions {
        disk_bytes: args.size_mib << 20,
        witness: true,
        ..Default::default()
    };
    let mut c = LocalCluster::create(&bin, &dir, opts)?;
    c.keep = args.keep;
    say(&format!(
        "cluster in {}: alpha on {}, beta on {}",
        dir.display(),
        c.nodes[0].address,
        c.nodes[1].address
    ));
    c.bring_up().await?;
    c.wait_for(
        0,
        "both up to date at the witness",
        Duration::from_secs(30),
        |s| {
            s.quorum
                .as_ref()
                .is_some_and(|q| q.up_to_date && q.peer_up_to_date)
        },
    )
    .await?;
    let size = c.status(0).await?.size_bytes.unwrap_or(0);
    say(&format!(
        "volume {} ({} MiB) is primary on alpha, in sync with beta; the witness lists both as up to date",
        c.opts.volume,
        size >> 20
    ));

    // Write through NBD on alpha, remembering every acknowledged write.
    let mut client = NbdClient::connect(&c.nbd_socket(0)).await?;
    let blocks = size / 4096;
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    let mut rng = SplitMix64(0x5eed);
    let mut buf = vec![0u8; 4096];
    for i in 0..args.writes {
        let block = rng.next_u64() % blocks;
        let tag = rng.next_u64();
        SplitMix64::fill(&mut buf, tag);
        client.write(block * 4096, &buf, i % 8 == 0).await?;
        acked.insert(block, tag);
    }
    client.flush().await?;
    say(&format!(
        "{} writes acknowledged by alpha (each on both disks)",
        acked.len()
    ));

    let t0 = Instant::now();
    c.kill(0);
    say("T+0      alpha killed with SIGKILL");
    let mut report = DemoReport {
        acked_writes: acked.len() as u64,
        ..Default::default()
    };
    // The cluster manager calls the hook right away; it returns once the
    // witness consents (alpha's leases have run out).
    let hook = {
        let (bin, config, volume) = (
            bin.clone(),
            c.nodes[1].config.clone(),
            c.opts.volume.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let out = std::process::Command::new(bin)
                .arg("--config")
                .arg(config)
                .arg("promote")
                .arg(volume)
                .output();
            (t.elapsed(), out)
        })
    };
    c.wait_for(1, "peer loss", Duration::from_secs(30), |s| {
        s.peer.connection == "Disconnected"
    })
    .await?;
    report.detected_ms = t0.elapsed().as_millis() as u64;
    say(&format!(
        "T+{}ms  beta detected the loss of alpha",
        report.detected_ms
    ));
    let (_, out) = hook.await.map_err(|e| DemoError::Hook(e.to_string()))?;
    let out = out.map_err(|e| DemoError::Hook(e.to_string()))?;
    if !out.status.success() {
        return Err(DemoError::Hook(format!(
            "`blkrep promote` on beta failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    report.promoted_ms = t0.elapsed().as_millis() as u64;
    say(&format!(
        "T+{}ms  beta promoted (`blkrep promote`, called at T+0; the witness consented after alpha's lease ran out)",
        report.promoted_ms
    ));

    let mut client = NbdClient::connect(&c.nbd_socket(1)).await?;
    let mut lost = 0;
    for (&block, &tag) in &acked {
        SplitMix64::fill(&mut buf, tag);
        if client.read(block * 4096, 4096).await? != buf {
            lost += 1;
        }
    }
    report.acked_writes_lost = lost;
    SplitMix64::fill(&mut buf, 42);
    client.write(0, &buf, true).await?;
    acked.insert(0, 42);
    report.first_write_ms = t0.elapsed().as_millis() as u64;
    say(&format!(
        "T+{}ms  first write on beta; {lost} of {} acknowledged writes lost",
        report.first_write_ms, report.acked_writes
    ));
    client.disconnect().await?;

    c.start(0).await?;
    c.ok(
        0,
        Request::Attach {
            volume: c.opts.volume.clone(),
        },
    )
    .await?;
    c.wait_in_sync(Duration::from_secs(300)).await?;
    report.resync_done_ms = t0.elapsed().as_millis() as u64;
    report.volume_bytes = size;
    report.resync_bytes = c
        .status(1)
        .await?
        .last_resync
        .map(|r| r.total_bytes)
        .unwrap_or(0);
    say(&format!(
        "T+{}ms  alpha rejoined as secondary and is resynced ({} KiB copied of a {} MiB volume)",
        report.resync_done_ms,
        report.resync_bytes >> 10,
        size >> 20
    ));
    report.replicas_equal = c.read_data(0, size)? == c.read_data(1, size)?;
    let ok = report.acked_writes_lost == 0 && report.replicas_equal;
    if args.json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        println!(
            "verdict: {} (acknowledged writes lost: {}, replicas equal: {})",
            if ok { "PASS" } else { "FAIL" },
            report.acked_writes_lost,
            report.replicas_equal
        );
        if args.keep {
            println!(
                "cluster left running in {}; configs: {} and {}",
                dir.display(),
                c.nodes[0].config.display(),
                c.nodes[1].config.display()
            );
        }
    }
    if args.keep {
        // Leave the daemons running for inspection.
        std::mem::forget(c);
    }
    Ok(ok)
}

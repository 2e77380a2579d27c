//! `blkrep demo`: a throw-away two-node cluster with a witness on loopback
//! that shows the promise end to end: a write storm runs through NBD on the
//! primary, which is killed with SIGKILL in the middle of it; the survivor is
//! promoted through the failover hook (`blkrep promote`, as a cluster manager
//! calls it; the witness consents once the dead primary's lease ran out) and
//! holds every acknowledged write; the dead node comes back, resyncs, and
//! both copies are byte-for-byte equal. With `--power-cut` the kill is a
//! power cut: the nodes' disks get a volatile write cache (held in each
//! daemon's memory, as the drills do), and alpha loses what no flush
//! covered yet when it goes.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::control::Request;
use crate::testkit::cluster::{ClusterError, ClusterOptions, LocalCluster, scratch_dir};
use crate::testkit::rng::SplitMix64;
use crate::testkit::storm::{BlockClient, BlockClientError, StormTarget};
use crate::testkit::storm::{STORM_BLOCK_BYTES, Storm};
use crate::units::{parse_duration_ms, parse_size_bytes};

/// The smallest disk the demo accepts.
const MIN_SIZE_BYTES: u64 = 16 << 20;

/// Options of `blkrep demo`.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Size of each node's disk (e.g. 64M, 1G; at least 16M).
    #[arg(long = "size", default_value = "64M", value_parser = parse_size_bytes)]
    pub size_bytes: u64,
    /// How long the write storm runs before the primary is killed
    /// (e.g. 3s, 500ms, 1m).
    #[arg(long = "duration", default_value = "3s", value_parser = parse_duration_ms)]
    pub duration_ms: u64,
    /// How the volume is exported: `auto` (ublk when this kernel has it and
    /// we are root, NBD otherwise), `nbd` or `ublk`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "nbd", "ublk"])]
    pub export: String,
    /// Concurrent writers in the storm (one NBD connection or device handle each).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub writers: u64,
    /// Leave the cluster running at the end and print how to poke at it.
    #[arg(long)]
    pub keep: bool,
    /// Cut alpha's power instead of killing it: the disks get a volatile
    /// write cache (in the daemons' memory), and alpha loses every write
    /// that no flush or FUA covered yet (a seeded half of them).
    #[arg(long)]
    pub power_cut: bool,
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
    Client(#[from] BlockClientError),
    /// The current executable cannot be found.
    #[error("cannot find the blkrep executable: {0}")]
    Exe(std::io::Error),
    /// The failover hook failed.
    #[error("failover hook: {0}")]
    Hook(String),
    /// Bad options.
    #[error("{0}")]
    Options(String),
    /// Interrupted (Ctrl-C); the cluster was torn down.
    #[error("interrupted; the demo cluster was stopped and removed")]
    Interrupted,
}

/// What the demo measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DemoReport {
    /// The primary lost power (`--power-cut`) instead of being killed.
    pub power_cut: bool,
    /// Writes acknowledged to the clients before the kill.
    pub acked_writes: u64,
    /// Distinct blocks whose last acknowledged write was checked.
    pub blocks_checked: u64,
    /// Writes in flight (sent, never acknowledged) at the kill: each may
    /// or may not be on disk afterwards.
    pub unacked_in_flight: u64,
    /// Acknowledged writes missing or wrong on the new primary.
    pub acked_writes_lost: u64,
    /// Both backing data areas equal at the end.
    pub replicas_equal: bool,
    /// Milliseconds the storm ran before the kill.
    pub storm_ms: u64,
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
    /// How the volume was exported ("nbd" or "ublk").
    pub export: String,
}

/// Runs the demo; true when nothing was lost and the replicas are equal.
/// Ctrl-C (SIGINT) stops it and removes the cluster (unless `--keep`).
pub async fn run(args: DemoArgs) -> Result<bool, DemoError> {
    if args.size_bytes < MIN_SIZE_BYTES || args.size_bytes % STORM_BLOCK_BYTES != 0 {
        return Err(DemoError::Options(format!(
            "--size must be at least 16M and a multiple of 4K (got {} bytes)",
            args.size_bytes
        )));
    }
    let keep = args.keep;
    let (ok, cluster) = tokio::select! {
        r = run_demo(args) => r?,
        _ = tokio::signal::ctrl_c() => return Err(DemoError::Interrupted),
    };
    if keep {
        eprintln!("{}", poke_help(&cluster));
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("stopping the demo cluster");
    }
    drop(cluster);
    Ok(ok)
}

/// The last `lines` lines of each daemon's and the witness's log.
fn log_tails(c: &LocalCluster, lines: usize) -> String {
    let mut out = String::new();
    let logs = c
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), &n.log))
        .chain(c.witness.iter().map(|w| ("witness", &w.log)));
    for (name, path) in logs {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        out.push_str(&format!("----- {name} log (last {lines} lines) -----\n"));
        for l in &all[all.len().saturating_sub(lines)..] {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// Whether this machine can run ublk devices for us: the kernel has the
/// driver and we are root.
fn ublk_available() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    root && std::path::Path::new("/dev/ublk-control").exists()
}

/// Where node `i` (primary) exports the volume: its ublk device (waiting
/// for the device node to appear) or its NBD socket.
async fn target_of(c: &LocalCluster, i: usize) -> Result<StormTarget, DemoError> {
    if c.opts.export != "ublk" {
        return Ok(StormTarget::Nbd(c.nbd_socket(i)));
    }
    let s = c
        .wait_for(i, "the ublk device", Duration::from_secs(30), |s| {
            s.export
                .as_deref()
                .is_some_and(|e| std::path::Path::new(e).exists())
        })
        .await?;
    Ok(StormTarget::Device(s.export.unwrap_or_default().into()))
}

/// How to look at a kept cluster.
fn poke_help(c: &LocalCluster) -> String {
    let bin = c.bin.display();
    let vol = &c.opts.volume;
    let mut s = format!(
        "the cluster stays up until Ctrl-C (files in {}); try:\n",
        c.dir.display()
    );
    for (i, n) in c.nodes.iter().enumerate() {
        s += &format!(
            "  {bin} --config {} status {vol}{}\n",
            n.config.display(),
            if i == 1 { " --json" } else { "" }
        );
    }
    s += &format!(
        "  nbdinfo 'nbd+unix:///{vol}?socket={}'   (beta's export; it is primary now)\n",
        c.nbd_socket(1).display()
    );
    s += &format!(
        "  {bin} --config {} demote {vol} && {bin} --config {} promote {vol}   (switch over)\n",
        c.nodes[1].config.display(),
        c.nodes[0].config.display()
    );
    s += &format!(
        "  logs: {} and {}",
        c.nodes[0].log.display(),
        c.nodes[1].log.display()
    );
    s
}

async fn run_demo(args: DemoArgs) -> Result<(bool, LocalCluster), DemoError> {
    let bin = std::env::current_exe().map_err(DemoError::Exe)?;
    let dir = args.dir.clone().unwrap_or_else(|| scratch_dir("demo"));
    let say = |s: &str| {
        if !args.json {
            println!("{s}");
        }
    };
    let export = match args.export.as_str() {
        "auto" if ublk_available() => "ublk",
        "auto" => "nbd",
        other => other,
    };
    let opts = ClusterOptions {
        disk_bytes: args.size_bytes,
        witness: true,
        export: export.into(),
        volatile_cache: args.power_cut,
        ..Default::default()
    };
    let mut c = LocalCluster::create(&bin, &dir, opts)?;
    say(&format!(
        "cluster in {}: alpha on {}, beta on {}, witness on loopback",
        dir.display(),
        c.nodes[0].address,
        c.nodes[1].address
    ));
    c.bring_up().await?;
    c.wait_both_up_to_date(0, Duration::from_secs(30)).await?;
    let size = c.status(0).await?.size_bytes.unwrap_or(0);
    say(&format!(
        "volume {} ({} MiB) is primary on alpha, in sync with beta; the witness lists both as up to date",
        c.opts.volume,
        size >> 20
    ));

    // The storm: writers on alpha's NBD export, each recording what it got
    // acknowledged; alpha is killed in the middle of it. The last block is
    // left for the first write on the new primary.
    let target = target_of(&c, 0).await?;
    say(&format!("alpha exports it through {export}: {target:?}"));
    let storm = Storm::start_on(target, args.writers, size / STORM_BLOCK_BYTES - 1, 0x5eed);
    let fate = if args.power_cut {
        "loses power"
    } else {
        "is killed"
    };
    say(&format!(
        "write storm: {} writers on alpha for {} ms (with FUA writes and flushes), then alpha {fate} mid-storm",
        args.writers, args.duration_ms
    ));
    let storm_start = Instant::now();
    tokio::time::sleep(Duration::from_millis(args.duration_ms)).await;
    let t0 = Instant::now();
    if args.power_cut {
        c.power_cut(0, 0x5eed).await?;
    } else {
        c.kill(0);
    }
    let storm_ms = storm_start.elapsed().as_millis() as u64;
    let ledger = storm.stop().await;
    say(&format!(
        "T+0      alpha {} after {} acknowledged writes ({} flushes; {} more were in flight)",
        if args.power_cut {
            "lost power (its disk kept a seeded half of the writes no flush covered)"
        } else {
            "killed with SIGKILL"
        },
        ledger.acked_writes(),
        ledger.flushes(),
        ledger.unacknowledged()
    ));
    let mut report = DemoReport {
        power_cut: args.power_cut,
        acked_writes: ledger.acked_writes(),
        blocks_checked: ledger.blocks().count() as u64,
        unacked_in_flight: ledger.unacknowledged() as u64,
        storm_ms,
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

    let mut client = BlockClient::open(&target_of(&c, 1).await?).await?;
    let mut buf = vec![0u8; STORM_BLOCK_BYTES as usize];
    SplitMix64::fill(&mut buf, 42);
    let last_block = size / STORM_BLOCK_BYTES - 1;
    client.write_block(last_block, &buf, true).await?;
    report.first_write_ms = t0.elapsed().as_millis() as u64;
    say(&format!(
        "T+{}ms  first write on beta",
        report.first_write_ms
    ));
    let mut lost = 0;
    for block in ledger.blocks() {
        let found = client.read_block(block).await?;
        if !ledger.holds(block, &found) {
            lost += 1;
        }
    }
    report.acked_writes_lost = lost;
    say(&format!(
        "         checked on beta: {lost} of {} acknowledged blocks lost",
        report.blocks_checked
    ));
    drop(client);

    c.start(0).await?;
    c.ok(
        0,
        Request::Attach {
            volume: c.opts.volume.clone(),
        },
    )
    .await?;
    if let Err(e) = c.wait_in_sync(Duration::from_secs(300)).await {
        // The cluster's files go with it: show why first.
        eprintln!("{}", log_tails(&c, 40));
        return Err(e.into());
    }
    report.resync_done_ms = t0.elapsed().as_millis() as u64;
    report.volume_bytes = size;
    report.export = export.to_string();
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
    }
    Ok((ok, c))
}

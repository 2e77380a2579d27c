//! `blkrep bench --memory-volumes N`: the daemon's resident memory with N
//! attached volumes (sparse backing files, `--memory-volume-size` each):
//! started with nothing attached, with all N attached and primary (peer
//! away), and the peak while the peer fully resyncs all of them.

use std::time::{Duration, Instant};

use super::BenchError;
use crate::control::Request;
use crate::testkit::cluster::{ClusterOptions, LocalCluster, extra_volume, scratch_dir};

/// The memory figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MemoryFigures {
    /// Volumes attached.
    pub volumes: u32,
    /// Size of each.
    pub volume_bytes: u64,
    /// Daemon RSS before any volume is attached.
    pub rss_empty_bytes: u64,
    /// With every volume attached and primary, the peer away.
    pub rss_attached_bytes: u64,
    /// (attached - empty) / volumes.
    pub per_volume_bytes: u64,
    /// Highest RSS of the primary while the peer resynced all volumes.
    pub rss_peak_resync_source_bytes: u64,
    /// Highest RSS of the peer meanwhile.
    pub rss_peak_resync_target_bytes: u64,
}

/// How long the resync peak is watched.
const RESYNC_WATCH: Duration = Duration::from_secs(15);

/// A field of /proc/PID/status in bytes (`VmRSS`, `VmHWM`).
fn proc_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Runs the measurement with its own cluster.
pub async fn run(
    bin: &std::path::Path,
    volumes: u32,
    volume_bytes: u64,
) -> Result<MemoryFigures, BenchError> {
    let opts = ClusterOptions {
        volume: "mem".into(),
        disk_bytes: volume_bytes,
        extra_volumes: volumes.saturating_sub(1),
        ..Default::default()
    };
    let mut c = LocalCluster::create(bin, &scratch_dir("bench-mem"), opts)?;
    let names: Vec<String> = std::iter::once("mem".to_string())
        .chain((1..volumes).map(|k| extra_volume("mem", k)))
        .collect();
    let pid = |c: &LocalCluster, i: usize| c.pid(i).unwrap_or(0);
    c.start(0).await?;
    let rss_empty_bytes = proc_kib(pid(&c, 0), "VmRSS");
    for v in &names {
        c.ok(0, Request::Attach { volume: v.clone() }).await?;
        c.ok(
            0,
            Request::Primary {
                volume: v.clone(),
                force: true,
            },
        )
        .await?;
    }
    let rss_attached_bytes = proc_kib(pid(&c, 0), "VmRSS");
    c.start(1).await?;
    for v in &names {
        c.ok(1, Request::Attach { volume: v.clone() }).await?;
    }
    let start = Instant::now();
    while start.elapsed() < RESYNC_WATCH {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let source = proc_kib(pid(&c, 0), "VmHWM");
    let target = proc_kib(pid(&c, 1), "VmHWM");
    Ok(MemoryFigures {
        volumes,
        volume_bytes,
        rss_empty_bytes,
        rss_attached_bytes,
        per_volume_bytes: rss_attached_bytes.saturating_sub(rss_empty_bytes)
            / u64::from(volumes.max(1)),
        rss_peak_resync_source_bytes: source,
        rss_peak_resync_target_bytes: target,
    })
}

/// Prints the figures.
pub fn print(m: &MemoryFigures) {
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!(
        "memory, {} volumes of {} GiB: daemon RSS {:.1} MiB empty, {:.1} MiB with all attached and primary ({:.0} KiB per volume); peak while the peer resyncs all: {:.1} MiB (source), {:.1} MiB (target)",
        m.volumes,
        m.volume_bytes >> 30,
        mib(m.rss_empty_bytes),
        mib(m.rss_attached_bytes),
        m.per_volume_bytes as f64 / 1024.0,
        mib(m.rss_peak_resync_source_bytes),
        mib(m.rss_peak_resync_target_bytes)
    );
}

//! `blkrep bench --resync`: what a resync costs. Resync throughput of a
//! whole dirty volume on an idle system against the link's capacity, the
//! time to resync 1 % dirty in scattered 64 KiB pieces, application 4 KiB
//! synchronous write latency during a resync against an idle one, and
//! activity-log updates per 1000 application writes.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{BenchError, Metric, Workload, common, figure, fio};
use crate::link::capacity::LinkCapacity;
use crate::testkit::cluster::LocalCluster;

/// The resync figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ResyncFigures {
    /// Bytes of the whole-volume resync on an idle system.
    pub idle_resync_bytes: u64,
    /// Its rate.
    pub idle_resync_bytes_per_s: f64,
    /// That rate against the link's capacity.
    pub idle_resync_vs_link: f64,
    /// What the raw disk gives for the resync's own I/O pattern: 64 KiB
    /// sequential reads of one region while 64 KiB writes go to another
    /// (both copies share this disk here), the smaller of the two rates.
    pub disk_copy_bytes_per_s: f64,
    /// The resync's floor: min(link capacity, disk copy rate).
    pub idle_resync_floor_bytes_per_s: f64,
    /// The idle resync rate against that floor.
    pub idle_resync_vs_floor: f64,
    /// Bytes of the 1 % scattered resync.
    pub scattered_resync_bytes: u64,
    /// Its duration in milliseconds (reattach to in sync).
    pub scattered_resync_ms: u64,
    /// 4 KiB QD1 synchronous write latency, no resync running.
    pub write_p50_us_idle: f64,
    /// The same, p99.
    pub write_p99_us_idle: f64,
    /// During a whole-volume resync.
    pub write_p50_us_during_resync: f64,
    /// The same, p99.
    pub write_p99_us_during_resync: f64,
    /// p99 during / p99 idle (goal: at most 2).
    pub p99_during_vs_idle: f64,
    /// The resync was still running when the latency run ended (else the
    /// "during" figures partly saw an idle link).
    pub resync_outlasted_the_latency_run: bool,
    /// Activity-log updates per 1000 random writes over the whole volume.
    pub al_updates_per_1000_random_writes: f64,
    /// The same within a 64 MiB region (a typical working set).
    pub al_updates_per_1000_local_writes: f64,
    /// Metadata writes (bitmap, activity log, superblock; concurrent
    /// updates share one) per 1000 random writes at depth 8.
    pub metadata_writes_per_1000_random_writes: f64,
    /// The same within 64 MiB.
    pub metadata_writes_per_1000_local_writes: f64,
}

const QD1_SYNC: Workload = Workload {
    name: "qd1-sync",
    rw: "randwrite",
    bs: "4k",
    iodepth: 1,
    sync: true,
    fua: false,
    metric: Metric::LatencyP50Us,
};

/// p50 and p99 of one QD1 synchronous write run on the volume.
fn write_latency(socket: &Path, size: u64, runtime_s: u64) -> Result<(f64, f64), BenchError> {
    let mut a = common(&QD1_SYNC, size, runtime_s);
    a.push("--ioengine=nbd".into());
    a.push(format!("--uri=nbd+unix:///?socket={}", socket.display()));
    a.push("--fsync=1".into());
    let v = fio(&a)?;
    let p99 = Workload {
        metric: Metric::LatencyP99Us,
        ..QD1_SYNC
    };
    Ok((figure(&v, &QD1_SYNC), figure(&v, &p99)))
}

/// Writes on the primary with fio: `rw` in `bs` pieces over `size` bytes,
/// `io_size` bytes in all (or `ios` requests).
fn dirty(
    socket: &Path,
    rw: &'static str,
    bs: &'static str,
    size: u64,
    amount: &str,
) -> Result<(), BenchError> {
    let w = Workload {
        name: "dirty",
        rw,
        bs,
        iodepth: 8,
        sync: false,
        fua: false,
        metric: Metric::Iops,
    };
    let mut a = common(&w, size, 0);
    a.retain(|x| x != "--time_based" && !x.starts_with("--runtime"));
    a.push("--ioengine=nbd".into());
    a.push(format!("--uri=nbd+unix:///?socket={}", socket.display()));
    a.push(amount.to_string());
    fio(&a).map(|_| ())
}

/// The raw disk copying as a resync does: 64 KiB sequential reads of the
/// first half of `raw` while 64 KiB writes go to the second half, each at
/// the resync window's depth; the smaller rate, in bytes per second.
fn disk_copy_rate(raw: &Path, size: u64, runtime_s: u64) -> Result<f64, BenchError> {
    let half = size / 2;
    let mut a = Vec::new();
    for (name, rw, offset) in [("copy-read", "read", 0), ("copy-write", "write", half)] {
        a.extend([
            format!("--name={name}"),
            format!("--filename={}", raw.display()),
            format!("--rw={rw}"),
            "--bs=64k".into(),
            format!("--iodepth={}", crate::engine::RESYNC_WINDOW / 2),
            format!("--offset={offset}"),
            format!("--size={half}"),
            format!("--runtime={runtime_s}"),
            "--time_based".into(),
            "--ioengine=io_uring".into(),
            "--direct=1".into(),
        ]);
    }
    let v = fio(&a)?;
    let bw = |job: usize, side: &str| v["jobs"][job][side]["bw_bytes"].as_f64().unwrap_or(0.0);
    Ok(bw(0, "read").min(bw(1, "write")))
}

/// Stops the secondary, runs `dirty`, restarts it; returns when it is
/// attached again (the resync starts).
async fn secondary_misses(
    c: &mut LocalCluster,
    dirty_it: impl FnOnce() -> Result<(), BenchError>,
) -> Result<Instant, BenchError> {
    c.kill(1);
    dirty_it()?;
    c.restart(1).await?;
    Ok(Instant::now())
}

/// (activity-log updates, metadata writes) of the primary since attach.
async fn metadata_counts(c: &LocalCluster) -> Result<(u64, u64), BenchError> {
    let s = c.status(0).await?;
    Ok((s.activity_log_updates, s.metadata_writes))
}

async fn resynced_bytes(c: &LocalCluster) -> Result<u64, BenchError> {
    Ok(c.status(0)
        .await?
        .last_resync
        .map(|r| r.total_bytes)
        .unwrap_or(0))
}

/// Runs the resync measurements on a running, in-sync cluster.
pub async fn run(
    c: &mut LocalCluster,
    size: u64,
    raw: &Path,
    link: &LinkCapacity,
    runtime_s: u64,
) -> Result<ResyncFigures, BenchError> {
    let socket = c.nbd_socket(0);
    let disk_copy = disk_copy_rate(raw, size, runtime_s)?;
    let sync_wait = Duration::from_secs(600);

    // Activity-log updates per 1000 writes.
    let before = metadata_counts(c).await?;
    dirty(&socket, "randwrite", "4k", size, "--number_ios=1000")?;
    let mid = metadata_counts(c).await?;
    dirty(
        &socket,
        "randwrite",
        "4k",
        size.min(64 << 20),
        "--number_ios=1000",
    )?;
    let after = metadata_counts(c).await?;

    // Latency without a resync.
    let (p50_idle, p99_idle) = write_latency(&socket, size, runtime_s)?;

    // Whole-volume resync, idle.
    let t = secondary_misses(c, || {
        dirty(&socket, "write", "1m", size, &format!("--io_size={size}"))
    })
    .await?;
    c.wait_in_sync(sync_wait).await?;
    let idle_s = t.elapsed().as_secs_f64();
    let idle_bytes = resynced_bytes(c).await?;

    // Whole-volume resync while the application writes.
    secondary_misses(c, || {
        dirty(&socket, "write", "1m", size, &format!("--io_size={size}"))
    })
    .await?;
    let (p50_during, p99_during) = write_latency(&socket, size, runtime_s)?;
    let outlasted = c.status(0).await?.resync.is_some();
    c.wait_in_sync(sync_wait).await?;

    // 1 % dirty in scattered 64 KiB pieces.
    let one_percent = (size / 100).max(64 << 10);
    let t = secondary_misses(c, || {
        dirty(
            &socket,
            "randwrite",
            "64k",
            size,
            &format!("--io_size={one_percent}"),
        )
    })
    .await?;
    c.wait_in_sync(sync_wait).await?;
    let scattered_ms = t.elapsed().as_millis() as u64;
    let scattered_bytes = resynced_bytes(c).await?;

    let rate = idle_bytes as f64 / idle_s.max(1e-6);
    let floor = disk_copy.min(link.capacity_bytes_per_s as f64).max(1.0);
    Ok(ResyncFigures {
        idle_resync_bytes: idle_bytes,
        idle_resync_bytes_per_s: rate,
        idle_resync_vs_link: rate / (link.capacity_bytes_per_s.max(1) as f64),
        disk_copy_bytes_per_s: disk_copy,
        idle_resync_floor_bytes_per_s: floor,
        idle_resync_vs_floor: rate / floor,
        scattered_resync_bytes: scattered_bytes,
        scattered_resync_ms: scattered_ms,
        write_p50_us_idle: p50_idle,
        write_p99_us_idle: p99_idle,
        write_p50_us_during_resync: p50_during,
        write_p99_us_during_resync: p99_during,
        p99_during_vs_idle: if p99_idle > 0.0 {
            p99_during / p99_idle
        } else {
            0.0
        },
        resync_outlasted_the_latency_run: outlasted,
        al_updates_per_1000_random_writes: mid.0.saturating_sub(before.0) as f64,
        al_updates_per_1000_local_writes: after.0.saturating_sub(mid.0) as f64,
        metadata_writes_per_1000_random_writes: mid.1.saturating_sub(before.1) as f64,
        metadata_writes_per_1000_local_writes: after.1.saturating_sub(mid.1) as f64,
    })
}

/// Prints the figures under the main table.
pub fn print(r: &ResyncFigures) {
    println!("resync:");
    println!(
        "  whole volume, idle: {} MiB at {:.0} MB/s = {:.2} of the link's capacity, {:.2} of the floor {:.0} MB/s = min(link, raw disk copying 64 KiB reads + writes at once: {:.0} MB/s)",
        r.idle_resync_bytes >> 20,
        r.idle_resync_bytes_per_s / 1e6,
        r.idle_resync_vs_link,
        r.idle_resync_vs_floor,
        r.idle_resync_floor_bytes_per_s / 1e6,
        r.disk_copy_bytes_per_s / 1e6
    );
    println!(
        "  1 % dirty in scattered 64 KiB pieces: {} KiB in {} ms (reattach to in sync)",
        r.scattered_resync_bytes >> 10,
        r.scattered_resync_ms
    );
    println!(
        "  4 KiB QD1 sync write latency: idle p50 {:.0} us p99 {:.0} us; during a resync p50 {:.0} us p99 {:.0} us (p99 x{:.2}{})",
        r.write_p50_us_idle,
        r.write_p99_us_idle,
        r.write_p50_us_during_resync,
        r.write_p99_us_during_resync,
        r.p99_during_vs_idle,
        if r.resync_outlasted_the_latency_run {
            ""
        } else {
            "; the resync ended before the run did"
        }
    );
    println!(
        "  per 1000 4 KiB writes at depth 8: {:.0} activity-log updates in {:.0} metadata writes random over the volume, {:.0} in {:.0} within 64 MiB (bitmap writes while connected: none)",
        r.al_updates_per_1000_random_writes,
        r.metadata_writes_per_1000_random_writes,
        r.al_updates_per_1000_local_writes,
        r.metadata_writes_per_1000_local_writes
    );
}

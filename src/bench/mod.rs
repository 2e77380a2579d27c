//! `blkrep bench`: the same workloads against (a) a raw file on the same
//! disk (io_uring, O_DIRECT) and (b) the replicated volume with both nodes on
//! this machine (fio's NBD engine on the primary's export, or blkrep's own
//! load generator where fio or its NBD engine is missing), in one run,
//! printed side by side with ratios.

use std::path::{Path, PathBuf};
use std::process::Command;

mod loadgen;
mod memory;
mod resync;

use crate::link::capacity::LinkCapacity;
use crate::testkit::cluster::{ClusterError, ClusterOptions, LocalCluster, scratch_dir};

/// Options of `blkrep bench`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// Size of the volume and of the raw file in MiB.
    #[arg(long, default_value_t = 512)]
    pub size_mib: u64,
    /// Seconds per workload and target.
    #[arg(long, default_value_t = 5)]
    pub runtime_s: u64,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Working directory (default: a fresh one under the temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Also measure resync: throughput on an idle volume, application
    /// write latency during a resync, activity-log writes per 1000 writes.
    #[arg(long)]
    pub resync: bool,
    /// Also measure the daemon's memory with this many attached volumes
    /// (0: skip).
    #[arg(long, default_value_t = 0)]
    pub memory_volumes: u32,
    /// Size of each volume of the memory measurement (sparse files).
    #[arg(long, default_value = "10G", value_parser = crate::units::parse_size_bytes)]
    pub memory_volume_size: u64,
    /// Skip the fio workloads (only the link, and --resync / --memory-volumes).
    #[arg(long)]
    pub no_workloads: bool,
    /// Who drives the workloads: fio (io_uring on the raw file, its NBD
    /// engine on the volume), blkrep's own generator, or auto (fio when it
    /// has the NBD engine).
    #[arg(long, value_enum, default_value_t = LoadGenerator::Auto)]
    pub load_generator: LoadGenerator,
    /// After laying out the volume, print its NBD socket and keep the
    /// cluster up until Ctrl-C (to profile or to run your own clients).
    #[arg(long)]
    pub hold: bool,
}

/// Who drives the workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadGenerator {
    /// fio when it is installed and has the NBD engine, else `own`.
    Auto,
    /// fio (fails when it or its NBD engine is missing).
    Fio,
    /// blkrep's own generator: `iodepth` workers at depth 1 each.
    Own,
}

impl LoadGenerator {
    /// `Fio` or `Own`: resolves `Auto` by asking fio for its NBD engine.
    fn resolve(self) -> Self {
        match self {
            LoadGenerator::Auto => {
                let has_nbd = Command::new("fio")
                    .arg("--enghelp=nbd")
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if has_nbd {
                    LoadGenerator::Fio
                } else {
                    LoadGenerator::Own
                }
            }
            other => other,
        }
    }

    fn name(self) -> &'static str {
        match self {
            LoadGenerator::Fio => "fio",
            _ => "blkrep's own load generator",
        }
    }
}

/// Bench errors.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Cluster problem.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// fio missing or failing.
    #[error("fio: {0}")]
    Fio(String),
    /// Other I/O.
    #[error("{0}")]
    Io(String),
    /// The link probe failed.
    #[error(transparent)]
    Link(#[from] crate::link::LinkError),
    /// TLS material.
    #[error(transparent)]
    Tls(#[from] crate::link::tls::TlsError),
}

/// One workload.
pub(crate) struct Workload {
    pub(crate) name: &'static str,
    pub(crate) rw: &'static str,
    pub(crate) bs: &'static str,
    pub(crate) iodepth: u32,
    pub(crate) sync: bool,
    /// Every write is a FUA write (O_DSYNC on the raw file, NBD_CMD_FLAG_FUA
    /// on the volume): durable in one request, one link round trip.
    /// Always driven by blkrep's own generator (fio's NBD engine cannot
    /// send FUA).
    pub(crate) fua: bool,
    pub(crate) metric: Metric,
}

#[derive(Clone, Copy)]
pub(crate) enum Metric {
    Iops,
    BytesPerS,
    LatencyP50Us,
    LatencyP99Us,
}

impl Metric {
    fn unit(self) -> &'static str {
        match self {
            Metric::Iops => "IOPS",
            Metric::BytesPerS => "MB/s",
            Metric::LatencyP50Us => "us p50 (lower is better)",
            Metric::LatencyP99Us => "us p99 (lower is better)",
        }
    }
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "4k-randwrite-qd1-sync",
        rw: "randwrite",
        bs: "4k",
        iodepth: 1,
        sync: true,
        fua: false,
        metric: Metric::LatencyP50Us,
    },
    Workload {
        name: "4k-randwrite-qd1-sync-p99",
        rw: "randwrite",
        bs: "4k",
        iodepth: 1,
        sync: true,
        fua: false,
        metric: Metric::LatencyP99Us,
    },
    Workload {
        name: "4k-randwrite-qd1-fua",
        rw: "randwrite",
        bs: "4k",
        iodepth: 1,
        sync: false,
        fua: true,
        metric: Metric::LatencyP50Us,
    },
    Workload {
        name: "4k-randwrite-qd1-fua-p99",
        rw: "randwrite",
        bs: "4k",
        iodepth: 1,
        sync: false,
        fua: true,
        metric: Metric::LatencyP99Us,
    },
    Workload {
        name: "4k-randwrite-qd32",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
        sync: false,
        fua: false,
        metric: Metric::Iops,
    },
    Workload {
        name: "1m-seqwrite-qd8",
        rw: "write",
        bs: "1m",
        iodepth: 8,
        sync: false,
        fua: false,
        metric: Metric::BytesPerS,
    },
    Workload {
        name: "4k-randread-qd1",
        rw: "randread",
        bs: "4k",
        iodepth: 1,
        sync: false,
        fua: false,
        metric: Metric::Iops,
    },
    Workload {
        name: "4k-randread-qd32",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
        sync: false,
        fua: false,
        metric: Metric::Iops,
    },
    Workload {
        name: "4k-randrw70-qd32",
        rw: "randrw",
        bs: "4k",
        iodepth: 32,
        sync: false,
        fua: false,
        metric: Metric::Iops,
    },
];

/// One row of the result.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchRow {
    /// Workload name.
    pub name: String,
    /// Raw file figure.
    pub raw: f64,
    /// Replicated volume figure.
    pub replicated: f64,
    /// replicated / raw for throughput, raw / replicated for latency
    /// (so higher is always better, 1.0 = no overhead).
    pub ratio: f64,
    /// The best a replicated volume can do here (see [`floor`]).
    pub floor: f64,
    /// The replicated figure against the floor (higher is better, 1.0 =
    /// at the floor).
    pub vs_floor: f64,
    /// Unit.
    pub unit: String,
}

/// The physical floor of a replicated figure with both nodes on this
/// machine: writes go to the same disk twice (half its throughput, and no
/// more than the link carries), a synchronous write waits for the local
/// write and a link round trip plus the remote write, reads are local.
fn floor(w: &Workload, raw: f64, link: &LinkCapacity) -> f64 {
    let link_per_s = match w.metric {
        Metric::Iops => link.capacity_bytes_per_s as f64 / 4096.0,
        _ => link.capacity_bytes_per_s as f64 / 1e6,
    };
    match (w.rw, w.metric) {
        (_, Metric::LatencyP50Us | Metric::LatencyP99Us) => raw + link.rtt_us as f64,
        ("randread", _) => raw,
        // 30 % writes at half speed.
        ("randrw", _) => (raw / (0.7 + 0.3 * 2.0)).min(link_per_s / 0.3),
        _ => (raw / 2.0).min(link_per_s),
    }
}

/// Higher-is-better ratio of `a` over `b` (inverted for latencies).
fn better_ratio(w: &Workload, a: f64, b: f64) -> f64 {
    let (num, den) = match w.metric {
        Metric::LatencyP50Us | Metric::LatencyP99Us => (b, a),
        _ => (a, b),
    };
    if den > 0.0 { num / den } else { 0.0 }
}

pub(crate) fn fio(args: &[String]) -> Result<serde_json::Value, BenchError> {
    let out = Command::new("fio")
        .args(args)
        .arg("--output-format=json")
        .output()
        .map_err(|e| {
            BenchError::Fio(format!(
                "cannot run fio ({e}); install it (apt-get install fio)"
            ))
        })?;
    if !out.status.success() {
        return Err(BenchError::Fio(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text
        .find('{')
        .ok_or_else(|| BenchError::Fio("no JSON output".into()))?;
    serde_json::from_str(&text[start..])
        .map_err(|e| BenchError::Fio(format!("unreadable output: {e}")))
}

pub(crate) fn figure(v: &serde_json::Value, w: &Workload) -> f64 {
    let job = &v["jobs"][0];
    let side = |k: &str| &job[k];
    match w.metric {
        Metric::Iops => {
            side("read")["iops"].as_f64().unwrap_or(0.0)
                + side("write")["iops"].as_f64().unwrap_or(0.0)
        }
        Metric::BytesPerS => {
            (side("read")["bw_bytes"].as_f64().unwrap_or(0.0)
                + side("write")["bw_bytes"].as_f64().unwrap_or(0.0))
                / 1e6
        }
        Metric::LatencyP50Us | Metric::LatencyP99Us => {
            let p = if matches!(w.metric, Metric::LatencyP50Us) {
                "50.000000"
            } else {
                "99.000000"
            };
            let clat = &side("write")["clat_ns"]["percentile"][p];
            let sync = &job["sync"]["lat_ns"]["percentile"][p];
            (clat.as_f64().unwrap_or(0.0) + sync.as_f64().unwrap_or(0.0)) / 1000.0
        }
    }
}

pub(crate) fn common(w: &Workload, size: u64, runtime_s: u64) -> Vec<String> {
    let mut a = vec![
        format!("--name={}", w.name),
        format!("--rw={}", w.rw),
        format!("--bs={}", w.bs),
        format!("--iodepth={}", w.iodepth),
        format!("--size={size}"),
        format!("--runtime={runtime_s}"),
        "--time_based".into(),
        "--randrepeat=0".into(),
        "--norandommap".into(),
    ];
    if w.rw == "randrw" {
        a.push("--rwmixread=70".into());
    }
    a
}

fn run_raw(w: &Workload, file: &Path, size: u64, runtime_s: u64) -> Result<f64, BenchError> {
    let mut a = common(w, size, runtime_s);
    a.push("--ioengine=io_uring".into());
    a.push("--direct=1".into());
    a.push(format!("--filename={}", file.display()));
    if w.sync {
        a.push("--fdatasync=1".into());
    }
    Ok(figure(&fio(&a)?, w))
}

fn run_nbd(w: &Workload, socket: &Path, size: u64, runtime_s: u64) -> Result<f64, BenchError> {
    let mut a = common(w, size, runtime_s);
    a.push("--ioengine=nbd".into());
    a.push(format!("--uri=nbd+unix:///?socket={}", socket.display()));
    if w.sync {
        // fio's nbd engine sends --fsync as an NBD flush.
        a.push("--fsync=1".into());
    }
    Ok(figure(&fio(&a)?, w))
}

/// Writes both targets once, sequentially, with 1 MiB writes.
async fn fill(
    generator: LoadGenerator,
    raw: &Path,
    socket: &Path,
    size: u64,
) -> Result<(), BenchError> {
    if generator != LoadGenerator::Fio {
        loadgen::fill_raw(raw, size)?;
        return loadgen::fill_nbd(socket, size).await;
    }
    let fill = Workload {
        name: "fill",
        rw: "write",
        bs: "1m",
        iodepth: 8,
        sync: false,
        fua: false,
        metric: Metric::BytesPerS,
    };
    let fill_args = |extra: Vec<String>| {
        let mut a = common(&fill, size, 0);
        a.retain(|x| x != "--time_based" && !x.starts_with("--runtime"));
        a.extend(extra);
        a
    };
    fio(&fill_args(vec![
        "--ioengine=io_uring".into(),
        "--direct=1".into(),
        format!("--filename={}", raw.display()),
    ]))?;
    fio(&fill_args(vec![
        "--ioengine=nbd".into(),
        format!("--uri=nbd+unix:///?socket={}", socket.display()),
    ]))?;
    Ok(())
}

/// The link's own capacity and round trip, with the cluster's certificates
/// and the link's settings, between the nodes' addresses.
async fn measure_link(c: &LocalCluster) -> Result<LinkCapacity, BenchError> {
    let tls = c.dir.join("tls");
    let load = |n: &str| {
        crate::link::tls::TlsMaterial::load(
            &tls.join("ca.pem"),
            &tls.join(format!("{n}.pem")),
            &tls.join(format!("{n}.key")),
        )
    };
    let settings = crate::link::LinkSettings::from(&crate::config::LinkConfig::default());
    let ip = |i: usize| std::net::SocketAddr::new(c.nodes[i].address.ip(), 0);
    Ok(crate::link::capacity::measure(
        &load("alpha")?,
        &load("beta")?,
        "beta",
        (ip(0), ip(1)),
        &settings,
        LINK_PROBE_BYTES,
    )
    .await?)
}

/// Bytes of the link probe's bulk transfer.
const LINK_PROBE_BYTES: u64 = 512 << 20;

/// Runs the benchmark and prints the table (or JSON).
pub async fn run(args: BenchArgs) -> Result<Vec<BenchRow>, BenchError> {
    let bin = std::env::current_exe().map_err(|e| BenchError::Io(e.to_string()))?;
    let dir = args.dir.clone().unwrap_or_else(|| scratch_dir("bench"));
    let size = args.size_mib << 20;
    let opts = ClusterOptions {
        volume: "bench".into(),
        disk_bytes: size + (16 << 20),
        ..Default::default()
    };
    let mut c = LocalCluster::create(&bin, &dir, opts)?;
    c.bring_up().await?;
    let vol_size = c.status(0).await?.size_bytes.unwrap_or(size);
    let raw = dir.join("raw.img");
    {
        let f = std::fs::File::create(&raw).map_err(|e| BenchError::Io(e.to_string()))?;
        f.set_len(vol_size)
            .map_err(|e| BenchError::Io(e.to_string()))?;
    }
    let generator = args.load_generator.resolve();
    let socket = c.nbd_socket(0);
    // Lay both targets out fully so neither pays for allocating blocks.
    fill(generator, &raw, &socket, vol_size).await?;
    if args.hold {
        println!(
            "holding: the primary exports nbd+unix:///?socket={} (raw file {}); Ctrl-C ends",
            socket.display(),
            raw.display()
        );
        tokio::signal::ctrl_c()
            .await
            .map_err(|e| BenchError::Io(e.to_string()))?;
        return Ok(Vec::new());
    }
    let link = measure_link(&c).await?;
    let mut rows = Vec::new();
    for w in WORKLOADS.iter().filter(|_| !args.no_workloads) {
        let (r, v) = if generator == LoadGenerator::Fio && !w.fua {
            (
                run_raw(w, &raw, vol_size, args.runtime_s)?,
                run_nbd(w, &socket, vol_size, args.runtime_s)?,
            )
        } else {
            (
                loadgen::run_raw(w, &raw, vol_size, args.runtime_s)?,
                loadgen::run_nbd(w, &socket, vol_size, args.runtime_s).await?,
            )
        };
        let floor = floor(w, r, &link);
        rows.push(BenchRow {
            name: w.name.into(),
            raw: r,
            replicated: v,
            ratio: better_ratio(w, v, r),
            floor,
            vs_floor: better_ratio(w, v, floor),
            unit: w.metric.unit().into(),
        });
    }
    let resync = if args.resync {
        Some(resync::run(&mut c, vol_size, &raw, &link, args.runtime_s).await?)
    } else {
        None
    };
    drop(c);
    let memory = if args.memory_volumes > 0 {
        Some(memory::run(&bin, args.memory_volumes, args.memory_volume_size).await?)
    } else {
        None
    };
    if args.json {
        let obj = serde_json::json!({
            "load_generator": generator.name(),
            "workloads": rows,
            "capacity_bytes_per_s": link.capacity_bytes_per_s,
            "rtt_us": link.rtt_us,
            "resync": resync,
            "memory": memory,
        });
        println!("{obj}");
    } else {
        println!(
            "both nodes on this machine: replicated writes hit the same disk twice and share its cores"
        );
        println!("workloads driven by {}", generator.name());
        println!(
            "link (QUIC, the link's settings, one connection): {:.0} MB/s, round trip {} us",
            link.capacity_bytes_per_s as f64 / 1e6,
            link.rtt_us
        );
        println!(
            "{:<30} {:>12} {:>12} {:>7} {:>12} {:>8}  unit",
            "workload", "raw", "replicated", "ratio", "floor", "vs floor"
        );
        for r in &rows {
            println!(
                "{:<30} {:>12.1} {:>12.1} {:>7.2} {:>12.1} {:>8.2}  {}",
                r.name, r.raw, r.replicated, r.ratio, r.floor, r.vs_floor, r.unit
            );
        }
        if let Some(r) = &resync {
            resync::print(r);
        }
        if let Some(m) = &memory {
            memory::print(m);
        }
    }
    Ok(rows)
}

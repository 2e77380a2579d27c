//! blkrep's own load generator, for machines where fio (or fio's NBD
//! engine) is missing: the same workloads with `iodepth` workers at queue
//! depth 1 each, against the raw file (positional O_DIRECT reads and writes,
//! fdatasync for synchronous workloads) and against the volume's NBD export
//! (one connection per worker, NBD flush for synchronous workloads); FUA
//! workloads open the raw file O_DSYNC and send every NBD write with FUA.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use super::{BenchError, Metric, Workload};
use crate::store::AlignedBuf;
use crate::testkit::nbd_client::NbdClient;
use crate::testkit::rng::SplitMix64;

/// Latency samples kept per worker (a 5 s run at QD1 needs far fewer).
const SAMPLES_PER_WORKER_MAX: usize = 1 << 20;

/// What one worker did.
#[derive(Default)]
struct Tally {
    ops: u64,
    bytes: u64,
    latencies_us: Vec<u32>,
}

impl Tally {
    fn record(&mut self, started: Instant, bytes: u64) {
        self.ops += 1;
        self.bytes += bytes;
        if self.latencies_us.len() < SAMPLES_PER_WORKER_MAX {
            let us = started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
            self.latencies_us.push(us);
        }
    }
}

/// The operation a worker does next, and where.
struct Plan {
    block_bytes: u64,
    blocks: u64,
    sequential: bool,
    read_percent: u64,
    next_block: u64,
    rng: SplitMix64,
}

impl Plan {
    fn new(w: &Workload, size: u64, worker: u64, workers: u64) -> Result<Self, BenchError> {
        let block_bytes = crate::units::parse_size_bytes(w.bs).map_err(BenchError::Io)?;
        let blocks = size / block_bytes.max(1);
        if blocks == 0 {
            return Err(BenchError::Io(format!(
                "the target is smaller than one {} block",
                w.bs
            )));
        }
        let read_percent = match w.rw {
            "randread" | "read" => 100,
            "randrw" => 70,
            _ => 0,
        };
        Ok(Plan {
            block_bytes,
            blocks,
            sequential: !w.rw.starts_with("rand"),
            read_percent,
            // Sequential workers start evenly spread over the target.
            next_block: blocks / workers.max(1) * worker,
            rng: SplitMix64(0x6c6f_6164 ^ worker.wrapping_mul(0x9e37_79b9)),
        })
    }

    /// (is_read, byte offset) of the next operation.
    fn next(&mut self) -> (bool, u64) {
        let block = if self.sequential {
            let b = self.next_block % self.blocks;
            self.next_block += 1;
            b
        } else {
            self.rng.below(self.blocks)
        };
        let is_read = self.rng.below(100) < self.read_percent;
        (is_read, block * self.block_bytes)
    }
}

/// Runs `w` against the raw file with `w.iodepth` threads.
pub(crate) fn run_raw(
    w: &Workload,
    file: &Path,
    size: u64,
    runtime_s: u64,
) -> Result<f64, BenchError> {
    let dsync = if w.fua { libc::O_DSYNC } else { 0 };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT | dsync)
        .open(file)
        .map_err(|e| BenchError::Io(format!("opening {}: {e}", file.display())))?;
    let f = std::sync::Arc::new(f);
    let deadline = Instant::now() + Duration::from_secs(runtime_s.max(1));
    let workers = u64::from(w.iodepth.max(1));
    let mut threads = Vec::new();
    for i in 0..workers {
        let mut plan = Plan::new(w, size, i, workers)?;
        let f = f.clone();
        let sync = w.sync;
        threads.push(std::thread::spawn(move || -> Result<Tally, String> {
            let mut buf = AlignedBuf::zeroed(plan.block_bytes as usize);
            SplitMix64::fill(buf.as_mut_slice(), i);
            let mut t = Tally::default();
            while Instant::now() < deadline {
                let (is_read, offset) = plan.next();
                let started = Instant::now();
                if is_read {
                    f.read_exact_at(buf.as_mut_slice(), offset)
                } else {
                    f.write_all_at(buf.as_slice(), offset)
                        .and_then(|()| if sync { f.sync_data() } else { Ok(()) })
                }
                .map_err(|e| format!("raw I/O at {offset}: {e}"))?;
                t.record(started, plan.block_bytes);
            }
            Ok(t)
        }));
    }
    let mut tallies = Vec::new();
    for t in threads {
        let t = t
            .join()
            .map_err(|_| BenchError::Io("a load thread panicked".into()))?
            .map_err(BenchError::Io)?;
        tallies.push(t);
    }
    Ok(figure(w, tallies, runtime_s))
}

/// Runs `w` against the NBD export with `w.iodepth` connections.
pub(crate) async fn run_nbd(
    w: &Workload,
    socket: &Path,
    size: u64,
    runtime_s: u64,
) -> Result<f64, BenchError> {
    let deadline = Instant::now() + Duration::from_secs(runtime_s.max(1));
    let workers = u64::from(w.iodepth.max(1));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..workers {
        let mut plan = Plan::new(w, size, i, workers)?;
        let mut client = NbdClient::connect(socket)
            .await
            .map_err(|e| BenchError::Io(e.to_string()))?;
        let (sync, fua) = (w.sync, w.fua);
        tasks.spawn(async move {
            let mut data = vec![0u8; plan.block_bytes as usize];
            SplitMix64::fill(&mut data, i);
            let mut t = Tally::default();
            while Instant::now() < deadline {
                let (is_read, offset) = plan.next();
                let started = Instant::now();
                if is_read {
                    client.read(offset, data.len() as u32).await.map(|_| ())
                } else {
                    let r = client.write(offset, &data, fua).await;
                    if r.is_ok() && sync {
                        client.flush().await
                    } else {
                        r
                    }
                }
                .map_err(|e| format!("NBD I/O at {offset}: {e}"))?;
                t.record(started, plan.block_bytes);
            }
            let _ = client.disconnect().await;
            Ok::<_, String>(t)
        });
    }
    let mut tallies = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let t = r
            .map_err(|e| BenchError::Io(format!("a load task failed: {e}")))?
            .map_err(BenchError::Io)?;
        tallies.push(t);
    }
    Ok(figure(w, tallies, runtime_s))
}

/// Bytes per write when laying a target out.
const FILL_BLOCK_BYTES: usize = 1 << 20;

/// Writes the whole raw file once, sequentially.
pub(crate) fn fill_raw(file: &Path, size: u64) -> Result<(), BenchError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(file)
        .map_err(|e| BenchError::Io(format!("opening {}: {e}", file.display())))?;
    let mut buf = AlignedBuf::zeroed(FILL_BLOCK_BYTES);
    SplitMix64::fill(buf.as_mut_slice(), 1);
    let mut at = 0;
    while at < size {
        let n = (size - at).min(FILL_BLOCK_BYTES as u64) as usize;
        f.write_all_at(&buf.as_slice()[..n], at)
            .map_err(|e| BenchError::Io(format!("filling {}: {e}", file.display())))?;
        at += n as u64;
    }
    f.sync_data()
        .map_err(|e| BenchError::Io(format!("filling {}: {e}", file.display())))
}

/// Writes the whole export once, sequentially.
pub(crate) async fn fill_nbd(socket: &Path, size: u64) -> Result<(), BenchError> {
    let io = |e: crate::testkit::nbd_client::NbdClientError| BenchError::Io(e.to_string());
    let mut client = NbdClient::connect(socket).await.map_err(io)?;
    let mut data = vec![0u8; FILL_BLOCK_BYTES];
    SplitMix64::fill(&mut data, 1);
    let mut at = 0;
    while at < size {
        let n = (size - at).min(FILL_BLOCK_BYTES as u64) as usize;
        client.write(at, &data[..n], false).await.map_err(io)?;
        at += n as u64;
    }
    client.flush().await.map_err(io)?;
    client.disconnect().await.map_err(io)
}

/// The workload's figure from all workers' tallies.
fn figure(w: &Workload, tallies: Vec<Tally>, runtime_s: u64) -> f64 {
    let secs = runtime_s.max(1) as f64;
    match w.metric {
        Metric::Iops => tallies.iter().map(|t| t.ops).sum::<u64>() as f64 / secs,
        Metric::BytesPerS => tallies.iter().map(|t| t.bytes).sum::<u64>() as f64 / secs / 1e6,
        Metric::LatencyP50Us | Metric::LatencyP99Us => {
            let mut all: Vec<u32> = tallies.into_iter().flat_map(|t| t.latencies_us).collect();
            let q = if matches!(w.metric, Metric::LatencyP50Us) {
                0.50
            } else {
                0.99
            };
            percentile(&mut all, q)
        }
    }
}

/// The `q` quantile (0..=1) of `samples` (0 when empty).
fn percentile(samples: &mut [u32], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_unstable();
    let i = ((samples.len() - 1) as f64 * q).round() as usize;
    f64::from(samples[i.min(samples.len() - 1)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_known_samples() {
        let mut s: Vec<u32> = (1..=100).rev().collect();
        assert_eq!(percentile(&mut s, 0.5), 51.0);
        assert_eq!(percentile(&mut s, 0.99), 99.0);
        assert_eq!(percentile(&mut [], 0.5), 0.0);
    }

    #[test]
    fn plans_stay_inside_the_target_and_mix_reads() {
        let w = super::super::WORKLOADS
            .iter()
            .find(|w| w.rw == "randrw")
            .expect("a mixed workload");
        let mut p = Plan::new(w, 1 << 20, 0, 1).expect("plan");
        let mut reads = 0;
        for _ in 0..1000 {
            let (r, off) = p.next();
            assert!(off + 4096 <= 1 << 20 && off % 4096 == 0);
            reads += u32::from(r);
        }
        assert!((600..800).contains(&reads), "{reads} reads of 1000");
        let seq = super::super::WORKLOADS
            .iter()
            .find(|w| w.rw == "write")
            .expect("a sequential workload");
        let mut p = Plan::new(seq, 4 << 20, 1, 2).expect("plan");
        let offs: Vec<u64> = (0..3).map(|_| p.next().1).collect();
        assert_eq!(offs, vec![2 << 20, 3 << 20, 0]);
    }
}

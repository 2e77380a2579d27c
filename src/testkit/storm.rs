//! A write storm that keeps a ledger of what was acknowledged: several
//! writers (one NBD connection or one O_DIRECT handle on a ublk device
//! each, QD1 each) write tagged 4 KiB blocks until they are stopped or
//! their node goes away. The ledger then
//! says, block by block, which contents are allowed: the last acknowledged
//! write, or the one write that writer had in flight when it ended (a
//! killed node may or may not have put that one on disk; both answers are
//! correct, anything else is a lost acknowledged write). Writers also send
//! FUA writes and flushes; the ledger knows which acknowledged writes they
//! promised durable (P1: a power cut of every node keeps them) and which
//! not (P2: only a power cut of every node that held one may lose it).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::store::AlignedBuf;
use crate::testkit::nbd_client::{NbdClient, NbdClientError};
use crate::testkit::rng::SplitMix64;

/// Where a storm writes (and a check reads).
#[derive(Clone, Debug)]
pub enum StormTarget {
    /// An NBD export (its Unix socket).
    Nbd(PathBuf),
    /// A block device (a ublk device), used with O_DIRECT.
    Device(PathBuf),
}

/// A client of a target.
pub enum BlockClient {
    /// Through NBD.
    Nbd(NbdClient),
    /// A block device opened with O_DIRECT.
    Device(File),
}

/// Errors of a [`BlockClient`].
#[derive(Debug, thiserror::Error)]
pub enum BlockClientError {
    /// NBD.
    #[error(transparent)]
    Nbd(#[from] NbdClientError),
    /// The block device.
    #[error("block device: {0}")]
    Device(#[from] std::io::Error),
}

impl BlockClient {
    /// Connects to (or opens) `target`.
    pub async fn open(target: &StormTarget) -> Result<Self, BlockClientError> {
        Ok(match target {
            StormTarget::Nbd(socket) => BlockClient::Nbd(NbdClient::connect(socket).await?),
            StormTarget::Device(path) => BlockClient::Device(
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)?,
            ),
        })
    }

    /// Reads one storm block.
    pub async fn read_block(&mut self, block: u64) -> Result<Vec<u8>, BlockClientError> {
        let at = block * STORM_BLOCK_BYTES;
        match self {
            BlockClient::Nbd(n) => Ok(n.read(at, STORM_BLOCK_BYTES as u32).await?),
            BlockClient::Device(f) => {
                let mut buf = AlignedBuf::zeroed(STORM_BLOCK_BYTES as usize);
                f.read_exact_at(buf.as_mut_slice(), at)?;
                Ok(buf.as_slice().to_vec())
            }
        }
    }

    /// Flushes: every write completed before is durable when this returns.
    pub async fn flush(&mut self) -> Result<(), BlockClientError> {
        match self {
            BlockClient::Nbd(n) => Ok(n.flush().await?),
            BlockClient::Device(f) => {
                // (Blocking: off the runtime.)
                let f = f.try_clone()?;
                tokio::task::spawn_blocking(move || f.sync_data())
                    .await
                    .map_err(std::io::Error::other)??;
                Ok(())
            }
        }
    }

    /// Writes one storm block; with `fua` it is durable when this returns.
    pub async fn write_block(
        &mut self,
        block: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), BlockClientError> {
        let at = block * STORM_BLOCK_BYTES;
        match self {
            BlockClient::Nbd(n) => Ok(n.write(at, data, fua).await?),
            BlockClient::Device(f) => Ok(write_device_block(f, block, data, fua)?),
        }
    }
}

/// One O_DIRECT block write on a device (blocking); `fua`: synced too.
fn write_device_block(f: &File, block: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
    f.write_all_at(
        AlignedBuf::copy_from(data).as_slice(),
        block * STORM_BLOCK_BYTES,
    )?;
    if fua {
        f.sync_data()?;
    }
    Ok(())
}

/// Bytes per storm write.
pub const STORM_BLOCK_BYTES: u64 = 4096;

/// Every `FUA_EVERY`-th write of a writer carries FUA.
const FUA_EVERY: u64 = 8;

/// After every `FLUSH_EVERY`-th write a writer flushes.
const FLUSH_EVERY: u64 = 16;

/// A write that does not complete in this time ends its writer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(20);

/// How long `stop` waits for a writer stuck in a device write.
const STUCK_WRITER_WAIT: Duration = Duration::from_secs(3);

/// What a storm got acknowledged.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    /// Block → tag of its last acknowledged write.
    acked: BTreeMap<u64, u64>,
    /// Per writer: the write it had sent and not seen acknowledged.
    in_flight: Vec<Option<(u64, u64)>>,
    /// Acknowledged writes in all (also those overwritten later).
    acked_writes: u64,
    /// Block → tag of its last write a FUA or a completed flush made
    /// durable (P1).
    promised: BTreeMap<u64, u64>,
    /// Flushes completed.
    flushes: u64,
}

impl Ledger {
    /// Acknowledged writes in all.
    pub fn acked_writes(&self) -> u64 {
        self.acked_writes
    }

    /// Distinct blocks whose last durable-promised write is their last
    /// acknowledged one (the rest were acknowledged but not flushed yet).
    pub fn promised_blocks(&self) -> usize {
        self.promised
            .iter()
            .filter(|(b, t)| self.acked.get(b) == Some(t))
            .count()
    }

    /// Flushes completed.
    pub fn flushes(&self) -> u64 {
        self.flushes
    }

    /// Distinct blocks with an acknowledged write.
    pub fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.acked.keys().copied()
    }

    /// Writes that were sent but never acknowledged (at most one per writer).
    pub fn unacknowledged(&self) -> usize {
        self.in_flight.iter().flatten().count()
    }

    /// True when `found` (the block's content on some copy) is allowed:
    /// the last acknowledged write or the write in flight at the end.
    pub fn holds(&self, block: u64, found: &[u8]) -> bool {
        let Some(&tag) = self.acked.get(&block) else {
            return true;
        };
        let mut want = vec![0u8; found.len()];
        SplitMix64::fill(&mut want, tag);
        if found == want {
            return true;
        }
        self.in_flight
            .iter()
            .flatten()
            .filter(|&&(b, _)| b == block)
            .any(|&(_, t)| {
                SplitMix64::fill(&mut want, t);
                found == want
            })
    }

    /// Drops the blocks in `range` from the check (a test overwrote them).
    pub fn forget(&mut self, range: std::ops::Range<u64>) {
        self.acked.retain(|b, _| !range.contains(b));
        for f in &mut self.in_flight {
            if f.is_some_and(|(b, _)| range.contains(&b)) {
                *f = None;
            }
        }
    }

    /// This ledger followed by `newer` (a later storm on the same blocks):
    /// a block the newer storm got acknowledged must hold its write; the
    /// older storm's in-flight writes still count where it did not.
    pub fn then(&self, newer: &Ledger) -> Ledger {
        let mut acked = self.acked.clone();
        acked.extend(newer.acked.iter().map(|(&b, &t)| (b, t)));
        let mut promised = self.promised.clone();
        promised.extend(newer.promised.iter().map(|(&b, &t)| (b, t)));
        let in_flight = self
            .in_flight
            .iter()
            .filter(|f| f.is_some_and(|(b, _)| !newer.acked.contains_key(&b)))
            .chain(newer.in_flight.iter())
            .copied()
            .collect();
        Ledger {
            acked,
            in_flight,
            acked_writes: self.acked_writes + newer.acked_writes,
            promised,
            flushes: self.flushes + newer.flushes,
        }
    }

    /// The acknowledged blocks a whole data area (`data`, from offset 0)
    /// does not hold.
    pub fn lost_in(&self, data: &[u8]) -> Vec<u64> {
        let len = STORM_BLOCK_BYTES as usize;
        self.blocks()
            .filter(|&b| {
                let at = b as usize * len;
                data.get(at..at + len)
                    .is_none_or(|found| !self.holds(b, found))
            })
            .collect()
    }
}

/// A running storm.
pub struct Storm {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    ledger: Arc<Mutex<Ledger>>,
}

impl Storm {
    /// Starts `writers` writers on the NBD socket `socket`; see [`Storm::start_on`].
    pub fn start(socket: PathBuf, writers: u64, blocks: u64, seed: u64) -> Self {
        Self::start_on(StormTarget::Nbd(socket), writers, blocks, seed)
    }

    /// Starts `writers` writers on `target`, writing the first `blocks`
    /// blocks (writer `w` owns the blocks `b % writers == w`, so each block
    /// has one writer), seeded with `seed`.
    pub fn start_on(target: StormTarget, writers: u64, blocks: u64, seed: u64) -> Self {
        let writers = writers.clamp(1, blocks.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let ledger = Arc::new(Mutex::new(Ledger {
            in_flight: vec![None; writers as usize],
            ..Ledger::default()
        }));
        let tasks = (0..writers)
            .map(|w| {
                let (target, stop, ledger) = (target.clone(), stop.clone(), ledger.clone());
                let rng = SplitMix64(seed ^ (w + 1).wrapping_mul(0x9e37_79b9));
                tokio::spawn(writer(target, w, writers, blocks, rng, stop, ledger))
            })
            .collect();
        Storm {
            stop,
            tasks,
            ledger,
        }
    }

    /// Acknowledged writes so far.
    pub fn acked_writes(&self) -> u64 {
        lock(&self.ledger).acked_writes
    }

    /// Stops the writers (or waits for them to fail, after their node
    /// went away) and returns the ledger. A writer stuck in a write (a ublk
    /// device whose daemon died keeps its I/O queued for a recovery) is left
    /// behind after a while; its write stays in flight in the ledger.
    pub async fn stop(self) -> Ledger {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = tokio::time::timeout(STUCK_WRITER_WAIT, t).await;
        }
        lock(&self.ledger).clone()
    }
}

fn lock(l: &Mutex<Ledger>) -> std::sync::MutexGuard<'_, Ledger> {
    l.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn writer(
    target: StormTarget,
    w: u64,
    writers: u64,
    blocks: u64,
    mut rng: SplitMix64,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
) {
    let Ok(mut client) = BlockClient::open(&target).await else {
        return;
    };
    let owned = (blocks / writers).max(1);
    let mut buf = vec![0u8; STORM_BLOCK_BYTES as usize];
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let block = rng.below(owned) * writers + w;
        let tag = rng.next_u64();
        SplitMix64::fill(&mut buf, tag);
        lock(&ledger).in_flight[w as usize] = Some((block, tag));
        let fua = n % FUA_EVERY == 0;
        let done = match &mut client {
            // A device write blocks its thread; keep it off the runtime.
            BlockClient::Device(f) => {
                let (f, data) = (f.try_clone(), buf.clone());
                let write =
                    tokio::task::spawn_blocking(move || write_device_block(&f?, block, &data, fua));
                matches!(
                    tokio::time::timeout(WRITE_TIMEOUT, write).await,
                    Ok(Ok(Ok(())))
                )
            }
            c => matches!(
                tokio::time::timeout(WRITE_TIMEOUT, c.write_block(block, &buf, fua)).await,
                Ok(Ok(()))
            ),
        };
        if !done {
            return;
        }
        {
            let mut l = lock(&ledger);
            l.acked.insert(block, tag);
            if fua {
                l.promised.insert(block, tag);
            }
            l.acked_writes += 1;
            l.in_flight[w as usize] = None;
        }
        n += 1;
        if n % FLUSH_EVERY == 0 {
            // Covers every write acknowledged until now, on every writer.
            let covered = lock(&ledger).acked.clone();
            match tokio::time::timeout(WRITE_TIMEOUT, client.flush()).await {
                Ok(Ok(())) => {
                    let mut l = lock(&ledger);
                    l.promised.extend(covered);
                    l.flushes += 1;
                }
                _ => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_allows_the_acknowledged_or_the_in_flight_write_only() {
        let mut l = Ledger {
            in_flight: vec![Some((3, 99)), None],
            ..Ledger::default()
        };
        l.acked.insert(3, 7);
        l.acked.insert(4, 8);
        let block = |tag| {
            let mut b = vec![0u8; STORM_BLOCK_BYTES as usize];
            SplitMix64::fill(&mut b, tag);
            b
        };
        assert!(l.holds(3, &block(7)));
        assert!(l.holds(3, &block(99)));
        assert!(!l.holds(3, &block(8)));
        assert!(l.holds(4, &block(8)));
        assert!(!l.holds(4, &block(99)), "another block's in-flight write");
        let mut data = vec![0u8; 5 * STORM_BLOCK_BYTES as usize];
        data[3 * 4096..4 * 4096].copy_from_slice(&block(99));
        assert_eq!(l.lost_in(&data), vec![4]);
        data[4 * 4096..5 * 4096].copy_from_slice(&block(8));
        assert!(l.lost_in(&data).is_empty());
        assert!(
            l.lost_in(&data[..4096]).len() == 2,
            "a short area loses both"
        );
    }
}

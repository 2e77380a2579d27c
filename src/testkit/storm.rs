//! A write storm through NBD that keeps a ledger of what was acknowledged:
//! several writers (one NBD connection each, QD1 each) write tagged 4 KiB
//! blocks until they are stopped or their node goes away. The ledger then
//! says, block by block, which contents are allowed: the last acknowledged
//! write, or the one write that writer had in flight when it ended (a
//! killed node may or may not have put that one on disk; both answers are
//! correct, anything else is a lost acknowledged write).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::testkit::nbd_client::NbdClient;
use crate::testkit::rng::SplitMix64;

/// Bytes per storm write.
pub const STORM_BLOCK_BYTES: u64 = 4096;

/// Every `FUA_EVERY`-th write of a writer carries FUA.
const FUA_EVERY: u64 = 8;

/// A write that does not complete in this time ends its writer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(20);

/// What a storm got acknowledged.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    /// Block → tag of its last acknowledged write.
    acked: BTreeMap<u64, u64>,
    /// Per writer: the write it had sent and not seen acknowledged.
    in_flight: Vec<Option<(u64, u64)>>,
    /// Acknowledged writes in all (also those overwritten later).
    acked_writes: u64,
}

impl Ledger {
    /// Acknowledged writes in all.
    pub fn acked_writes(&self) -> u64 {
        self.acked_writes
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
    /// Starts `writers` writers on the NBD socket `socket`, writing the
    /// first `blocks` blocks (writer `w` owns the blocks `b % writers == w`,
    /// so each block has one writer), seeded with `seed`.
    pub fn start(socket: PathBuf, writers: u64, blocks: u64, seed: u64) -> Self {
        let writers = writers.clamp(1, blocks.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let ledger = Arc::new(Mutex::new(Ledger {
            in_flight: vec![None; writers as usize],
            ..Ledger::default()
        }));
        let tasks = (0..writers)
            .map(|w| {
                let (socket, stop, ledger) = (socket.clone(), stop.clone(), ledger.clone());
                let rng = SplitMix64(seed ^ (w + 1).wrapping_mul(0x9e37_79b9));
                tokio::spawn(writer(socket, w, writers, blocks, rng, stop, ledger))
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
    /// went away) and returns the ledger.
    pub async fn stop(self) -> Ledger {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        lock(&self.ledger).clone()
    }
}

fn lock(l: &Mutex<Ledger>) -> std::sync::MutexGuard<'_, Ledger> {
    l.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn writer(
    socket: PathBuf,
    w: u64,
    writers: u64,
    blocks: u64,
    mut rng: SplitMix64,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
) {
    let Ok(mut nbd) = NbdClient::connect(&socket).await else {
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
        let write = nbd.write(block * STORM_BLOCK_BYTES, &buf, n % FUA_EVERY == 0);
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(Ok(())) => {
                let mut l = lock(&ledger);
                l.acked.insert(block, tag);
                l.acked_writes += 1;
                l.in_flight[w as usize] = None;
                n += 1;
            }
            _ => return,
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

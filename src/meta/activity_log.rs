//! The activity log (rule 6): the set of extents the primary may be writing
//! to. Before a write lands in an extent that is not in the set, the new set
//! is persisted; after a crash of the primary every extent of the persisted
//! set is treated as out of sync, so the resync covers every region where the
//! two copies may differ, without a full resync.
//!
//! On disk: two 4 KiB slots, each a full snapshot of the set; the highest
//! valid sequence number wins. Writes alternate between the slots by
//! physical write, not by sequence number (group commit skips numbers): so a
//! torn write can only damage the slot being written, and the other one
//! holds the snapshot written just before, which covers every extent a
//! write was admitted into until then. The sequence continues across
//! attaches (from the newest snapshot on disk), so an older attach's
//! snapshot never outranks a newer one:
//!
//! ```text
//! 0 magic "BLKREPAL"  8 seq u64  16 extent_bytes u32  20 count u32
//! 24 extent numbers u32 x count ... 4092 crc32 of bytes 0..4092
//! ```

use std::collections::{BTreeMap, VecDeque};

use super::MetaError;

/// Bytes of one AL slot.
pub const AL_SLOT_BYTES: usize = 4096;
/// Magic of an AL slot.
pub const AL_MAGIC: [u8; 8] = *b"BLKREPAL";
/// Most extents one slot can hold.
pub const AL_EXTENTS_MAX: usize = (AL_SLOT_BYTES - 28) / 4;
/// Default bytes covered by one extent.
pub const DEFAULT_AL_EXTENT_BYTES: u64 = 4 << 20;
/// Default number of extents kept hot (4 GiB with 4 MiB extents).
pub const DEFAULT_AL_EXTENTS: usize = 1000;

/// A persisted snapshot of the active set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlSnapshot {
    /// Sequence number (highest valid slot wins).
    pub seq: u64,
    /// Bytes per extent.
    pub extent_bytes: u32,
    /// Active extents.
    pub extents: Vec<u32>,
}

impl AlSnapshot {
    /// Encodes into one slot.
    pub fn encode(&self) -> Result<[u8; AL_SLOT_BYTES], MetaError> {
        if self.extents.len() > AL_EXTENTS_MAX {
            return Err(MetaError::Corrupt("activity log snapshot too large"));
        }
        let mut b = [0u8; AL_SLOT_BYTES];
        b[0..8].copy_from_slice(&AL_MAGIC);
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..20].copy_from_slice(&self.extent_bytes.to_le_bytes());
        b[20..24].copy_from_slice(&(self.extents.len() as u32).to_le_bytes());
        for (i, e) in self.extents.iter().enumerate() {
            b[24 + 4 * i..28 + 4 * i].copy_from_slice(&e.to_le_bytes());
        }
        let crc = crc32fast::hash(&b[..AL_SLOT_BYTES - 4]);
        b[AL_SLOT_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
        Ok(b)
    }

    /// Decodes one slot; `None` for an empty (never written) slot.
    pub fn decode(b: &[u8]) -> Result<Option<Self>, MetaError> {
        if b.len() != AL_SLOT_BYTES {
            return Err(MetaError::Corrupt("activity log slot has the wrong size"));
        }
        if b[0..8] != AL_MAGIC {
            return if b.iter().all(|&x| x == 0) {
                Ok(None)
            } else {
                Err(MetaError::Corrupt("activity log slot has a bad magic"))
            };
        }
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        if crc32fast::hash(&b[..AL_SLOT_BYTES - 4]) != u32_at(AL_SLOT_BYTES - 4) {
            return Err(MetaError::Corrupt("activity log checksum mismatch"));
        }
        let count = u32_at(20) as usize;
        if count > AL_EXTENTS_MAX {
            return Err(MetaError::Corrupt("activity log extent count out of range"));
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&b[8..16]);
        Ok(Some(AlSnapshot {
            seq: u64::from_le_bytes(seq),
            extent_bytes: u32_at(16),
            extents: (0..count).map(|i| u32_at(24 + 4 * i)).collect(),
        }))
    }
}

/// Picks the newest valid snapshot of two slots. A damaged slot next to a
/// valid one is ignored (a torn AL write); both damaged is an error, because
/// then the regions to resync are unknown.
pub fn choose(a: &[u8], b: &[u8]) -> Result<Option<AlSnapshot>, MetaError> {
    Ok(choose_slot(a, b)?.map(|(s, _)| s))
}

/// As [`choose`], with the slot (0 or 1) the newest snapshot is in.
pub fn choose_slot(a: &[u8], b: &[u8]) -> Result<Option<(AlSnapshot, usize)>, MetaError> {
    let tag = |slot: usize| move |s: Option<AlSnapshot>| s.map(|s| (s, slot));
    match (
        AlSnapshot::decode(a).map(tag(0)),
        AlSnapshot::decode(b).map(tag(1)),
    ) {
        (Ok(x), Ok(y)) => Ok(match (x, y) {
            (Some(x), Some(y)) => Some(if x.0.seq >= y.0.seq { x } else { y }),
            (x, y) => x.or(y),
        }),
        (Ok(x), Err(_)) | (Err(_), Ok(x)) => Ok(x),
        (Err(e), Err(_)) => Err(e),
    }
}

/// Which of the two slots the next snapshot goes to: the one after the
/// slot written last, whatever the sequence numbers (group commit skips
/// numbers), so that two consecutive writes never share a slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AlSlots {
    next: usize,
}

impl AlSlots {
    /// After reading the slots: the newest snapshot was in `newest` (None:
    /// no valid snapshot), so the next write goes to the other slot.
    pub fn after(newest: Option<usize>) -> Self {
        AlSlots {
            next: newest.map_or(0, |slot| 1 - slot.min(1)),
        }
    }

    /// The slot to write now; the one after goes to the other slot.
    pub fn take(&mut self) -> usize {
        let slot = self.next;
        assert!(slot < 2, "two activity-log slots");
        self.next = 1 - slot;
        slot
    }
}

/// Fewest extents a volume's activity log may be configured to hold.
pub const AL_EXTENTS_MIN: usize = 16;

/// Every extent of the activity log has writes in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("every activity-log extent is busy")]
pub struct AlFull;

/// The in-memory active set with LRU eviction of idle extents.
#[derive(Clone, Debug)]
pub struct ActivityLog {
    extent_bytes: u64,
    capacity: usize,
    /// Extents in the persisted set, least recently used first.
    lru: VecDeque<u32>,
    /// Writes in flight per active extent.
    inflight: BTreeMap<u32, u32>,
    seq: u64,
    /// Snapshots written (for the metadata-cost report).
    pub updates: u64,
}

impl ActivityLog {
    /// An empty log.
    pub fn new(extent_bytes: u64, capacity: usize) -> Self {
        ActivityLog {
            extent_bytes,
            capacity: capacity.clamp(1, AL_EXTENTS_MAX),
            lru: VecDeque::new(),
            inflight: BTreeMap::new(),
            seq: 0,
            updates: 0,
        }
    }

    /// Bytes per extent.
    pub fn extent_bytes(&self) -> u64 {
        self.extent_bytes
    }

    /// Whether a write to `[offset, offset+len)` can ever be admitted: it
    /// spans no more extents than the log holds. `begin` on a range that
    /// does not fit would return `AlFull` forever.
    pub fn can_hold(&self, offset: u64, len: u64) -> bool {
        self.extents_of(offset, len).count() <= self.capacity
    }

    fn extents_of(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u32> {
        let first = (offset / self.extent_bytes) as u32;
        let last = ((offset + len.max(1) - 1) / self.extent_bytes) as u32;
        first..=last
    }

    /// A write to `[offset, offset+len)` starts. Returns the snapshot to
    /// persist before the write may be issued, when the set had to change.
    /// Returns `Err(AlFull)` when the set is full of busy extents (the caller
    /// retries after some write finished).
    pub fn begin(&mut self, offset: u64, len: u64) -> Result<Option<AlSnapshot>, AlFull> {
        let wanted: Vec<u32> = self.extents_of(offset, len).collect();
        let missing: Vec<u32> = wanted
            .iter()
            .copied()
            .filter(|e| !self.lru.contains(e))
            .collect();
        let evictable = self
            .lru
            .iter()
            .filter(|e| self.inflight.get(e).copied().unwrap_or(0) == 0 && !wanted.contains(e))
            .count();
        if self.lru.len() + missing.len() > self.capacity + evictable {
            return Err(AlFull);
        }
        for e in &wanted {
            *self.inflight.entry(*e).or_insert(0) += 1;
            if let Some(pos) = self.lru.iter().position(|x| x == e) {
                self.lru.remove(pos);
            }
            self.lru.push_back(*e);
        }
        if missing.is_empty() {
            return Ok(None);
        }
        while self.lru.len() > self.capacity {
            let Some(pos) = self
                .lru
                .iter()
                .position(|e| self.inflight.get(e).copied().unwrap_or(0) == 0)
            else {
                break;
            };
            self.lru.remove(pos);
        }
        self.seq += 1;
        self.updates += 1;
        Ok(Some(self.snapshot()))
    }

    /// A write that `begin` admitted finished (either way).
    pub fn end(&mut self, offset: u64, len: u64) {
        for e in self.extents_of(offset, len) {
            if let Some(n) = self.inflight.get_mut(&e) {
                *n -= 1;
                if *n == 0 {
                    self.inflight.remove(&e);
                }
            }
        }
    }

    /// Whether at least three quarters of the extents are pinned (by writes
    /// in flight or not yet flushed): time to flush before writes wait.
    pub fn mostly_busy(&self) -> bool {
        self.inflight.len() * 4 >= self.capacity * 3
    }

    /// The current set.
    pub fn snapshot(&self) -> AlSnapshot {
        AlSnapshot {
            seq: self.seq,
            extent_bytes: self.extent_bytes as u32,
            extents: self.lru.iter().copied().collect(),
        }
    }

    /// Continues numbering after a persisted snapshot.
    pub fn set_seq(&mut self, seq: u64) {
        self.seq = seq;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_round_trip_and_damage() {
        let s = AlSnapshot {
            seq: 5,
            extent_bytes: 4 << 20,
            extents: vec![1, 9, 300],
        };
        let b = s.encode().unwrap();
        assert_eq!(AlSnapshot::decode(&b).unwrap(), Some(s.clone()));
        let mut t = b;
        t[30] ^= 1;
        assert!(AlSnapshot::decode(&t).is_err());
        assert_eq!(AlSnapshot::decode(&[0u8; AL_SLOT_BYTES]).unwrap(), None);
        let older = AlSnapshot {
            seq: 4,
            ..s.clone()
        }
        .encode()
        .unwrap();
        assert_eq!(choose(&older, &b).unwrap().unwrap().seq, 5);
        assert_eq!(
            choose(&older, &t).unwrap().unwrap().seq,
            4,
            "torn newest slot: older one wins"
        );
        assert!(choose(&t, &t).is_err());
    }

    #[test]
    fn only_new_extents_cost_a_persist_and_busy_extents_stay() {
        let mut al = ActivityLog::new(4096, 2);
        assert!(al.begin(0, 4096).unwrap().is_some());
        assert!(
            al.begin(0, 4096).unwrap().is_none(),
            "same extent: no metadata write"
        );
        assert!(al.begin(4096, 4096).unwrap().is_some());
        // Both extents busy: a third cannot enter.
        assert!(al.begin(8192, 4096).is_err());
        al.end(0, 4096);
        al.end(0, 4096);
        let snap = al.begin(8192, 4096).unwrap().unwrap();
        assert_eq!(
            snap.extents,
            vec![1, 2],
            "idle extent 0 was evicted, busy extent 1 kept"
        );
        // A write spanning two extents pins both.
        let mut al = ActivityLog::new(4096, 4);
        let s = al.begin(4096 - 512, 1024).unwrap().unwrap();
        assert_eq!(s.extents, vec![0, 1]);
    }
}

//! The checksummed, versioned superblock: one 4 KiB block, stored twice.
//!
//! Both copies carry a sequence number; writers alternate between the two
//! slots, so a torn write can damage at most the copy being written and the
//! other copy (one sequence number older) is still valid.

use super::MetaError;
use super::generation::Generations;

/// Size of one superblock copy on disk.
pub const SUPERBLOCK_BYTES: usize = 4096;
/// Magic at the start of every superblock copy.
pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"BLKREPMD";
/// On-disk format version written by this build (2: bitmap pages carry a
/// magic and a CRC32).
pub const FORMAT_VERSION: u32 = 2;
/// Longest volume name that fits the superblock.
pub const VOLUME_NAME_MAX_BYTES: usize = 64;

const CRC_OFFSET: usize = SUPERBLOCK_BYTES - 4;

/// The state of this node's copy of the data, as persisted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub enum DiskState {
    /// Holds every write of its data generation.
    UpToDate,
    /// Consistent, but missing writes the peer has (the peer wrote without it).
    Outdated,
    /// Partly synced or never initialised: not usable as a source.
    Inconsistent,
    /// No local disk (failed or detached); runtime only, never persisted.
    Diskless,
}

impl DiskState {
    fn to_u8(self) -> u8 {
        match self {
            DiskState::UpToDate => 1,
            DiskState::Outdated => 2,
            DiskState::Inconsistent => 3,
            DiskState::Diskless => 4,
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(DiskState::UpToDate),
            2 => Some(DiskState::Outdated),
            3 => Some(DiskState::Inconsistent),
            4 => Some(DiskState::Diskless),
            _ => None,
        }
    }
}

/// Everything the superblock records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Incremented on every write; the valid copy with the highest wins.
    pub seq: u64,
    /// Name of the volume this metadata belongs to.
    pub volume_name: String,
    /// Usable data size of the volume.
    pub data_bytes: u64,
    /// Bytes covered by one dirty-bitmap bit.
    pub chunk_bytes: u32,
    /// State of the local copy.
    pub disk_state: DiskState,
    /// Data generation identifiers (rule 4).
    pub generations: Generations,
    /// Set while the volume is attached; a set flag at attach time means the
    /// node crashed (used by the activity log in recovery).
    pub attached: bool,
    /// This node was primary when the superblock was written.
    pub primary: bool,
    /// The last witness record this node saw (epoch 0: none).
    pub record: crate::quorum::RecordView,
    /// The kernel's boot id when the volume was attached (meaningful while
    /// `attached`; zero in superblocks written before it existed). At the
    /// next attach after an unclean stop, the same id means only the
    /// process died (the disk's cache survived: a flush makes it durable);
    /// another means the machine went down, maybe by a power cut.
    pub boot_id: [u8; 16],
    /// This copy lost power with writes no flush covered and has not
    /// synced with its peer since (see `Engine::power_lost`).
    pub cache_lost: bool,
}

impl Superblock {
    /// Serialises into one on-disk block with its CRC.
    pub fn encode(&self) -> Result<[u8; SUPERBLOCK_BYTES], MetaError> {
        let name = self.volume_name.as_bytes();
        if name.is_empty() || name.len() > VOLUME_NAME_MAX_BYTES {
            return Err(MetaError::BadVolumeName(self.volume_name.clone()));
        }
        let mut b = [0u8; SUPERBLOCK_BYTES];
        b[0..8].copy_from_slice(&SUPERBLOCK_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..20].copy_from_slice(&self.seq.to_le_bytes());
        b[20..28].copy_from_slice(&self.data_bytes.to_le_bytes());
        b[28..32].copy_from_slice(&self.chunk_bytes.to_le_bytes());
        b[32] = self.disk_state.to_u8();
        b[33] = u8::from(self.attached);
        b[34] = name.len() as u8;
        b[35] = u8::from(self.primary);
        b[36] = u8::from(self.cache_lost);
        b[40..40 + name.len()].copy_from_slice(name);
        let g = &self.generations;
        b[104..112].copy_from_slice(&g.current.to_le_bytes());
        b[112..120].copy_from_slice(&g.bitmap.to_le_bytes());
        for (i, h) in g.history.iter().enumerate() {
            let at = 120 + 8 * i;
            b[at..at + 8].copy_from_slice(&h.to_le_bytes());
        }
        b[152..160].copy_from_slice(&g.forced.to_le_bytes());
        b[160..168].copy_from_slice(&self.record.epoch.to_le_bytes());
        b[168] = self.record.flags();
        b[176..192].copy_from_slice(&self.boot_id);
        let crc = crc32fast::hash(&b[..CRC_OFFSET]);
        b[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        Ok(b)
    }

    /// Parses one on-disk block; any damage is an error, never a guess.
    pub fn decode(b: &[u8]) -> Result<Self, MetaError> {
        if b.len() != SUPERBLOCK_BYTES {
            return Err(MetaError::Corrupt("superblock has the wrong size"));
        }
        if b[0..8] != SUPERBLOCK_MAGIC {
            return Err(MetaError::NoMetadata);
        }
        let stored_crc = u32_at(b, CRC_OFFSET);
        if crc32fast::hash(&b[..CRC_OFFSET]) != stored_crc {
            return Err(MetaError::Corrupt("superblock checksum mismatch"));
        }
        let version = u32_at(b, 8);
        if version != FORMAT_VERSION {
            return Err(MetaError::UnsupportedVersion(version));
        }
        let chunk_bytes = u32_at(b, 28);
        if !chunk_bytes.is_power_of_two() || chunk_bytes < 4096 {
            return Err(MetaError::Corrupt(
                "bitmap chunk size is not a power of two >= 4096",
            ));
        }
        let disk_state =
            DiskState::from_u8(b[32]).ok_or(MetaError::Corrupt("unknown disk state"))?;
        let attached = match b[33] {
            0 => false,
            1 => true,
            _ => return Err(MetaError::Corrupt("bad attached flag")),
        };
        let primary = match b[35] {
            0 => false,
            1 => true,
            _ => return Err(MetaError::Corrupt("bad primary flag")),
        };
        let cache_lost = match b[36] {
            0 => false,
            1 => true,
            _ => return Err(MetaError::Corrupt("bad cache-lost flag")),
        };
        let mut boot_id = [0u8; 16];
        boot_id.copy_from_slice(&b[176..192]);
        let name_len = usize::from(b[34]);
        if name_len == 0 || name_len > VOLUME_NAME_MAX_BYTES {
            return Err(MetaError::Corrupt("bad volume name length"));
        }
        let volume_name = std::str::from_utf8(&b[40..40 + name_len])
            .map_err(|_| MetaError::Corrupt("volume name is not UTF-8"))?
            .to_string();
        let mut history = [0u64; super::generation::HISTORY_LEN];
        for (i, h) in history.iter_mut().enumerate() {
            *h = u64_at(b, 120 + 8 * i);
        }
        let record = crate::quorum::RecordView::from_parts(u64_at(b, 160), b[168])
            .ok_or(MetaError::Corrupt("bad witness record flags"))?;
        Ok(Superblock {
            record,
            seq: u64_at(b, 12),
            volume_name,
            data_bytes: u64_at(b, 20),
            chunk_bytes,
            disk_state,
            generations: Generations {
                current: u64_at(b, 104),
                bitmap: u64_at(b, 112),
                history,
                // (Zero in superblocks written before this field existed.)
                forced: u64_at(b, 152),
            },
            attached,
            primary,
            boot_id,
            cache_lost,
        })
    }

    /// Which of the two slots this superblock's sequence number is written to.
    pub fn slot(&self) -> usize {
        (self.seq % 2) as usize
    }
}

/// Picks the newest valid copy of two; an error only when neither is usable.
pub fn choose(a: &[u8], b: &[u8]) -> Result<(Superblock, SlotHealth), MetaError> {
    match (Superblock::decode(a), Superblock::decode(b)) {
        (Ok(x), Ok(y)) => Ok((if x.seq >= y.seq { x } else { y }, SlotHealth::Both)),
        (Ok(x), Err(e)) | (Err(e), Ok(x)) => Ok((x, SlotHealth::OneDamaged(e.to_string()))),
        (Err(MetaError::NoMetadata), Err(MetaError::NoMetadata)) => Err(MetaError::NoMetadata),
        (Err(e1), Err(e2)) => Err(MetaError::BothCopiesBad(format!("{e1}; {e2}"))),
    }
}

/// How many superblock copies were usable when reading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotHealth {
    /// Both copies decoded.
    Both,
    /// One copy was damaged (reason given); the other was used.
    OneDamaged(String),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            seq: 7,
            volume_name: "vm-101-disk-0".into(),
            data_bytes: 1 << 30,
            chunk_bytes: 65536,
            disk_state: DiskState::Outdated,
            generations: Generations {
                current: 11,
                bitmap: 9,
                history: [5, 3, 0, 0],
                forced: 5,
            },
            attached: true,
            primary: false,
            record: crate::quorum::RecordView::default(),
            boot_id: [7; 16],
            cache_lost: true,
        }
    }

    #[test]
    fn round_trip() {
        let sb = sample();
        let b = sb.encode().unwrap();
        assert_eq!(Superblock::decode(&b).unwrap(), sb);
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let b = sample().encode().unwrap();
        for byte in (0..SUPERBLOCK_BYTES).step_by(7) {
            let mut c = b;
            c[byte] ^= 0x10;
            assert!(
                Superblock::decode(&c).is_err(),
                "flip at {byte} not detected"
            );
        }
    }

    #[test]
    fn zeroed_block_is_no_metadata() {
        assert!(matches!(
            Superblock::decode(&[0u8; SUPERBLOCK_BYTES]),
            Err(MetaError::NoMetadata)
        ));
    }

    #[test]
    fn choose_prefers_newest_valid_copy() {
        let mut a = sample();
        let mut b = sample();
        a.seq = 8;
        b.seq = 9;
        b.disk_state = DiskState::UpToDate;
        let (ea, eb) = (a.encode().unwrap(), b.encode().unwrap());
        assert_eq!(choose(&ea, &eb).unwrap().0.seq, 9);
        let mut torn = eb;
        torn[100] ^= 1;
        let (sb, health) = choose(&ea, &torn).unwrap();
        assert_eq!(sb.seq, 8);
        assert!(matches!(health, SlotHealth::OneDamaged(_)));
        let mut torn_a = ea;
        torn_a[50] ^= 1;
        assert!(matches!(
            choose(&torn_a, &torn),
            Err(MetaError::BothCopiesBad(_))
        ));
    }

    #[test]
    fn truncated_input_is_rejected() {
        let b = sample().encode().unwrap();
        assert!(Superblock::decode(&b[..100]).is_err());
    }

    #[test]
    fn overlong_name_is_refused() {
        let mut sb = sample();
        sb.volume_name = "x".repeat(65);
        assert!(sb.encode().is_err());
    }
}

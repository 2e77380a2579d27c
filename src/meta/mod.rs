//! Per-node, per-volume metadata: superblock (two copies), generation
//! identifiers, disk state, the dirty bitmap and room for the activity log.
//!
//! On-disk layout of the metadata area (at the end of the backing device for
//! `internal`, at offset 0 of a separate file otherwise):
//!
//! ```text
//! +0        superblock copy 0 (4 KiB)
//! +4 KiB    superblock copy 1 (4 KiB)
//! +8 KiB    activity log area (120 KiB, reserved)
//! +128 KiB  dirty bitmap, 4 KiB pages, one bit per chunk
//! ```

pub mod activity_log;
pub mod bitmap;
pub mod device;
pub mod generation;
pub mod superblock;

pub use bitmap::Bitmap;
pub use device::MetaDevice;
pub use generation::{Generations, SyncDecision};
pub use superblock::{DiskState, Superblock};

use bitmap::{BITMAP_PAGE_BYTES, CHUNKS_PER_PAGE};

/// Bytes reserved for the activity log.
pub const ACTIVITY_LOG_BYTES: u64 = 120 * 1024;
/// Offset of the bitmap inside the metadata area.
pub const BITMAP_OFFSET_BYTES: u64 = 8 * 1024 + ACTIVITY_LOG_BYTES;
/// Default bytes per bitmap bit.
pub const DEFAULT_CHUNK_BYTES: u32 = 64 * 1024;
/// Data and metadata are kept aligned to this.
pub const BLOCK_BYTES: u64 = 4096;

/// Errors reading or writing metadata.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The area holds no blkrep metadata at all.
    #[error("no blkrep metadata found (run `blkrep create-md`)")]
    NoMetadata,
    /// A structure failed validation.
    #[error("metadata is corrupt: {0}")]
    Corrupt(&'static str),
    /// Both superblock copies are damaged.
    #[error(
        "both superblock copies are damaged ({0}); refusing to use this metadata. If the peer is up to date, run `blkrep create-md VOL --force` here and attach: a full sync from the peer restores this copy"
    )]
    BothCopiesBad(String),
    /// Written by a newer or unknown format.
    #[error(
        "metadata format version {0} is not supported by this build (it writes version 2); recreate it with `blkrep create-md VOL --force` and attach for a full sync from the peer"
    )]
    UnsupportedVersion(u32),
    /// The volume name cannot be stored.
    #[error("volume name {0:?} must be 1-64 bytes")]
    BadVolumeName(String),
    /// Metadata belongs to another volume.
    #[error("metadata belongs to volume {found:?}, not {expected:?}")]
    WrongVolume {
        /// Name in the metadata.
        found: String,
        /// Name asked for.
        expected: String,
    },
    /// The backing device no longer matches the recorded size.
    #[error(
        "backing device size changed: metadata records {recorded} data bytes, device now gives {now}"
    )]
    SizeChanged {
        /// Size in the superblock.
        recorded: u64,
        /// Size computed from the device now.
        now: u64,
    },
    /// The device is too small to hold data and metadata.
    #[error(
        "backing device of {device_bytes} bytes is too small for blkrep: it needs at least {min_bytes} bytes with this metadata placement"
    )]
    TooSmall {
        /// The device's size.
        device_bytes: u64,
        /// The smallest size that works (one 4 KiB data block).
        min_bytes: u64,
    },
    /// Existing metadata or data would be overwritten.
    #[error("{0}; use --force to overwrite")]
    WouldOverwrite(String),
    /// An I/O error on the metadata area.
    #[error("metadata I/O on {path}: {source}")]
    Io {
        /// The file or device.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Where things are inside the metadata area and how large the data area is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaLayout {
    /// Offset of the metadata area in its file or device.
    pub meta_offset_bytes: u64,
    /// Usable data bytes of the volume.
    pub data_bytes: u64,
    /// Bytes per bitmap bit.
    pub chunk_bytes: u32,
    /// Number of bitmap pages.
    pub bitmap_pages: u32,
}

impl MetaLayout {
    /// Layout for metadata stored at the end of a `device_bytes` backing device.
    pub fn internal(device_bytes: u64, chunk_bytes: u32) -> Result<Self, MetaError> {
        let aligned = device_bytes / BLOCK_BYTES * BLOCK_BYTES;
        let pages = bitmap_pages_for(aligned, chunk_bytes);
        let meta_bytes = BITMAP_OFFSET_BYTES + u64::from(pages) * BITMAP_PAGE_BYTES as u64;
        if aligned <= meta_bytes + BLOCK_BYTES {
            return Err(MetaError::TooSmall {
                device_bytes,
                min_bytes: meta_bytes + 2 * BLOCK_BYTES,
            });
        }
        let meta_offset_bytes = aligned - meta_bytes;
        Ok(MetaLayout {
            meta_offset_bytes,
            data_bytes: meta_offset_bytes,
            chunk_bytes,
            bitmap_pages: pages,
        })
    }

    /// Layout for metadata in a separate file; the whole backing device is data.
    pub fn external(device_bytes: u64, chunk_bytes: u32) -> Result<Self, MetaError> {
        let data_bytes = device_bytes / BLOCK_BYTES * BLOCK_BYTES;
        if data_bytes == 0 {
            return Err(MetaError::TooSmall {
                device_bytes,
                min_bytes: BLOCK_BYTES,
            });
        }
        Ok(MetaLayout {
            meta_offset_bytes: 0,
            data_bytes,
            chunk_bytes,
            bitmap_pages: bitmap_pages_for(data_bytes, chunk_bytes),
        })
    }

    /// Total bytes of the metadata area.
    pub fn meta_bytes(&self) -> u64 {
        BITMAP_OFFSET_BYTES + u64::from(self.bitmap_pages) * BITMAP_PAGE_BYTES as u64
    }

    /// Offset of superblock copy `slot` (0 or 1).
    pub fn superblock_offset(&self, slot: usize) -> u64 {
        self.meta_offset_bytes + slot as u64 * superblock::SUPERBLOCK_BYTES as u64
    }

    /// Offset of bitmap page `page`.
    pub fn bitmap_page_offset(&self, page: u32) -> u64 {
        self.meta_offset_bytes + BITMAP_OFFSET_BYTES + u64::from(page) * BITMAP_PAGE_BYTES as u64
    }
}

fn bitmap_pages_for(data_bytes: u64, chunk_bytes: u32) -> u32 {
    let chunks = data_bytes.div_ceil(u64::from(chunk_bytes));
    chunks.div_ceil(CHUNKS_PER_PAGE).max(1) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_layout_fits_and_is_aligned() {
        let l = MetaLayout::internal(10 << 30, DEFAULT_CHUNK_BYTES).unwrap();
        assert_eq!(l.data_bytes % BLOCK_BYTES, 0);
        assert!(l.data_bytes + l.meta_bytes() <= 10 << 30);
        // 10 GiB / 64 KiB = 163840 bits = 6 pages of 32704 bits.
        assert_eq!(l.bitmap_pages, 6);
        assert!(MetaLayout::internal(64 * 1024, DEFAULT_CHUNK_BYTES).is_err());
    }

    #[test]
    fn external_layout_uses_whole_device() {
        let l = MetaLayout::external((1 << 20) + 100, 4096).unwrap();
        assert_eq!(l.data_bytes, 1 << 20);
        assert_eq!(l.meta_offset_bytes, 0);
    }
}

//! Reading and writing the metadata area (synchronous O_DIRECT + O_DSYNC I/O;
//! metadata writes are rare and must be durable before anything depends on
//! them).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::activity_log::{self, AL_SLOT_BYTES, AlSnapshot};
use super::bitmap::{BITMAP_PAGE_BYTES, Bitmap};
use super::superblock::{self, SUPERBLOCK_BYTES, SlotHealth, Superblock};
use super::{MetaError, MetaLayout};
use crate::store::aligned::AlignedBuf;
use crate::store::backing;

/// An open metadata area.
pub struct MetaDevice {
    file: File,
    path: PathBuf,
    layout: MetaLayout,
}

impl MetaDevice {
    /// Opens the metadata area at `path` with the given layout.
    pub fn open(path: &Path, layout: MetaLayout) -> Result<Self, MetaError> {
        let file = backing::open_direct_dsync(path).map_err(|source| MetaError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Ok(MetaDevice {
            file,
            path: path.to_path_buf(),
            layout,
        })
    }

    /// The layout in use.
    pub fn layout(&self) -> &MetaLayout {
        &self.layout
    }

    fn io_err(&self, source: std::io::Error) -> MetaError {
        MetaError::Io {
            path: self.path.display().to_string(),
            source,
        }
    }

    fn read_block(&self, offset: u64, len: usize) -> Result<AlignedBuf, MetaError> {
        let mut buf = AlignedBuf::zeroed(len);
        self.file
            .read_exact_at(buf.as_mut_slice(), offset)
            .map_err(|e| self.io_err(e))?;
        Ok(buf)
    }

    fn write_block(&self, offset: u64, data: &[u8]) -> Result<(), MetaError> {
        let buf = AlignedBuf::copy_from(data);
        self.file
            .write_all_at(buf.as_slice(), offset)
            .map_err(|e| self.io_err(e))
    }

    /// Reads both superblock copies and returns the newest valid one.
    pub fn read_superblock(&self) -> Result<(Superblock, SlotHealth), MetaError> {
        let a = self.read_block(self.layout.superblock_offset(0), SUPERBLOCK_BYTES)?;
        let b = self.read_block(self.layout.superblock_offset(1), SUPERBLOCK_BYTES)?;
        superblock::choose(a.as_slice(), b.as_slice())
    }

    /// Durably writes `sb` into the slot its sequence number selects.
    pub fn write_superblock(&self, sb: &Superblock) -> Result<(), MetaError> {
        let bytes = sb.encode()?;
        self.write_block(self.layout.superblock_offset(sb.slot()), &bytes)
    }

    /// Reads the activity log (newest valid snapshot; None if never written).
    pub fn read_activity_log(&self) -> Result<Option<AlSnapshot>, MetaError> {
        let base = self.layout.meta_offset_bytes + 2 * SUPERBLOCK_BYTES as u64;
        let a = self.read_block(base, AL_SLOT_BYTES)?;
        let b = self.read_block(base + AL_SLOT_BYTES as u64, AL_SLOT_BYTES)?;
        activity_log::choose(a.as_slice(), b.as_slice())
    }

    /// Durably writes an activity-log snapshot into its slot.
    pub fn write_activity_log(&self, snap: &AlSnapshot) -> Result<(), MetaError> {
        let base = self.layout.meta_offset_bytes + 2 * SUPERBLOCK_BYTES as u64;
        self.write_block(base + (snap.slot() * AL_SLOT_BYTES) as u64, &snap.encode()?)
    }

    /// Loads the persisted bitmap; returns the pages that failed their
    /// checksum (their chunks are set: see [`Bitmap::load`]).
    pub fn read_bitmap(&self, bitmap: &mut Bitmap) -> Result<Vec<u32>, MetaError> {
        let len = self.layout.bitmap_pages as usize * BITMAP_PAGE_BYTES;
        let buf = self.read_block(self.layout.bitmap_page_offset(0), len)?;
        Ok(bitmap.load(buf.as_slice()))
    }

    /// Durably writes one bitmap page.
    pub fn write_bitmap_page(&self, bitmap: &Bitmap, page: u32) -> Result<(), MetaError> {
        self.write_block(
            self.layout.bitmap_page_offset(page),
            &bitmap.page_bytes(page),
        )
    }

    /// Durably writes one bitmap page from its encoded bytes.
    pub fn write_page_bytes(&self, page: u32, bytes: &[u8]) -> Result<(), MetaError> {
        if page >= self.layout.bitmap_pages || bytes.len() != BITMAP_PAGE_BYTES {
            return Err(MetaError::Corrupt("bitmap page out of range"));
        }
        self.write_block(self.layout.bitmap_page_offset(page), bytes)
    }

    /// Writes a whole fresh metadata area: both superblock copies and a bitmap
    /// with every bit as in `bitmap`.
    pub fn format(&self, sb: &Superblock, bitmap: &Bitmap) -> Result<(), MetaError> {
        let mut first = sb.clone();
        for seq in [sb.seq, sb.seq + 1] {
            first.seq = seq;
            self.write_superblock(&first)?;
        }
        for page in 0..self.layout.bitmap_pages {
            self.write_bitmap_page(bitmap, page)?;
        }
        let base = self.layout.meta_offset_bytes + 2 * SUPERBLOCK_BYTES as u64;
        for slot in 0..2u64 {
            self.write_block(base + slot * AL_SLOT_BYTES as u64, &[0u8; AL_SLOT_BYTES])?;
        }
        Ok(())
    }

    /// Names a filesystem or volume signature at the start of the data area,
    /// if any (used to refuse formatting a disk that is in use).
    pub fn data_signature(data_path: &Path) -> Result<Option<&'static str>, MetaError> {
        let file = backing::open_direct(data_path, false).map_err(|source| MetaError::Io {
            path: data_path.display().to_string(),
            source,
        })?;
        let mut buf = AlignedBuf::zeroed(8192);
        let n = read_up_to(&file, buf.as_mut_slice()).map_err(|source| MetaError::Io {
            path: data_path.display().to_string(),
            source,
        })?;
        Ok(signature(&buf.as_slice()[..n]))
    }
}

fn read_up_to(file: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

/// Recognises common on-disk signatures.
pub fn signature(b: &[u8]) -> Option<&'static str> {
    let at = |off: usize, magic: &[u8]| b.get(off..off + magic.len()) == Some(magic);
    if at(0x438, &[0x53, 0xEF]) {
        Some("an ext2/3/4 filesystem")
    } else if at(0, b"XFSB") {
        Some("an XFS filesystem")
    } else if at(512, b"LABELONE") {
        Some("an LVM physical volume")
    } else if at(512, b"EFI PART") {
        Some("a GPT partition table")
    } else if at(4086, b"SWAPSPACE2") {
        Some("a swap area")
    } else if at(65536 + 64, b"_BHRfS_M") {
        Some("a btrfs filesystem")
    } else if at(510, &[0x55, 0xAA]) {
        Some("an MBR partition table")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures() {
        let mut b = vec![0u8; 8192];
        assert_eq!(signature(&b), None);
        b[0x438] = 0x53;
        b[0x439] = 0xEF;
        assert_eq!(signature(&b), Some("an ext2/3/4 filesystem"));
        assert_eq!(signature(&b[..10]), None);
    }
}

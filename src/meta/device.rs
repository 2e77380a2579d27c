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
    /// The activity-log slot the next snapshot goes to: the one not holding
    /// the newest snapshot (set when the log is read; writes alternate).
    al_slots: std::sync::Mutex<activity_log::AlSlots>,
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
            al_slots: std::sync::Mutex::new(activity_log::AlSlots::default()),
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

    /// Reads the activity log (newest valid snapshot; None if never
    /// written). The next snapshot written goes to the other slot. (Read it
    /// once when attaching, before any write.)
    pub fn read_activity_log(&self) -> Result<Option<AlSnapshot>, MetaError> {
        let base = self.layout.meta_offset_bytes + 2 * SUPERBLOCK_BYTES as u64;
        let a = self.read_block(base, AL_SLOT_BYTES)?;
        let b = self.read_block(base + AL_SLOT_BYTES as u64, AL_SLOT_BYTES)?;
        let newest = activity_log::choose_slot(a.as_slice(), b.as_slice())?;
        *self.lock_slots() = activity_log::AlSlots::after(newest.as_ref().map(|(_, slot)| *slot));
        Ok(newest.map(|(s, _)| s))
    }

    /// Durably writes an activity-log snapshot into the slot after the one
    /// written last (see [`activity_log`]); its sequence number must be
    /// higher than every snapshot written before.
    pub fn write_activity_log(&self, snap: &AlSnapshot) -> Result<(), MetaError> {
        let base = self.layout.meta_offset_bytes + 2 * SUPERBLOCK_BYTES as u64;
        let slot = self.lock_slots().take();
        self.write_block(base + (slot * AL_SLOT_BYTES) as u64, &snap.encode()?)?;
        Ok(())
    }

    fn lock_slots(&self) -> std::sync::MutexGuard<'_, activity_log::AlSlots> {
        self.al_slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
pub(crate) mod tests {
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

    /// A zeroed metadata file with external layout (empty AL slots).
    pub(crate) fn scratch_meta(tag: &str) -> (MetaDevice, PathBuf) {
        let dir = crate::testkit::cluster::scratch_dir(tag);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("meta");
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(1 << 20))
            .expect("meta file");
        let layout = MetaLayout::external(16 << 20, 65536).expect("layout");
        (MetaDevice::open(&path, layout).expect("open"), path)
    }

    fn snap(seq: u64) -> AlSnapshot {
        AlSnapshot {
            seq,
            extent_bytes: 4 << 20,
            extents: vec![seq as u32],
        }
    }

    /// Issue 13, hole 2b: group commit skips sequence numbers, so slots
    /// chosen by `seq % 2` could take two consecutive writes in the same
    /// slot and a torn third write there would leave no recent snapshot.
    /// Slots alternate by write: the last two writes are always both there.
    #[test]
    fn the_last_two_activity_log_writes_are_in_different_slots() {
        let (dev, path) = scratch_meta("al-slots");
        assert_eq!(dev.read_activity_log().unwrap(), None);
        for seq in [1, 3, 5, 7] {
            dev.write_activity_log(&snap(seq)).unwrap();
        }
        let base = dev.layout.meta_offset_bytes + 2 * SUPERBLOCK_BYTES as u64;
        let slot = |i: u64| {
            let b = dev
                .read_block(base + i * AL_SLOT_BYTES as u64, AL_SLOT_BYTES)
                .unwrap();
            AlSnapshot::decode(b.as_slice()).unwrap().map(|s| s.seq)
        };
        let mut seqs = [slot(0), slot(1)];
        seqs.sort();
        assert_eq!(seqs, [Some(5), Some(7)]);
        // Reopened (an attach): the next write goes to the slot of the older.
        let dev = MetaDevice::open(&path, dev.layout).unwrap();
        assert_eq!(dev.read_activity_log().unwrap().map(|s| s.seq), Some(7));
        dev.write_activity_log(&snap(8)).unwrap();
        let mut seqs = [slot(0), slot(1)];
        seqs.sort();
        assert_eq!(seqs, [Some(7), Some(8)]);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}

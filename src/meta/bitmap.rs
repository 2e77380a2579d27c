//! The dirty bitmap: one bit per chunk of the volume, set while the peer may
//! lack that chunk's data. Persisted in 4 KiB pages; a bit is persisted set
//! before the write it covers is completed without the peer.
//!
//! Each page carries a magic and a CRC32 in its last 8 bytes. A page that
//! fails them on load (a damaged sector, a torn write) is not trusted: all
//! of its chunks count as out of sync, which can only make a resync copy
//! more, never less.

/// Bytes in one persisted bitmap page.
pub const BITMAP_PAGE_BYTES: usize = 4096;
/// 64-bit words of bits in one page (the rest is the trailer).
const PAGE_WORDS: usize = (BITMAP_PAGE_BYTES - 8) / 8;
/// Chunks (bits) covered by one bitmap page.
pub const CHUNKS_PER_PAGE: u64 = (PAGE_WORDS * 64) as u64;
/// Marks a written bitmap page ("BMPG").
const PAGE_MAGIC: u32 = 0x4750_4d42;

/// In-memory dirty bitmap.
#[derive(Clone, Debug)]
pub struct Bitmap {
    words: Vec<u64>,
    chunks: u64,
    chunk_bytes: u64,
    set_count: u64,
}

impl Bitmap {
    /// An all-clear bitmap covering `data_bytes` in chunks of `chunk_bytes`.
    pub fn new(data_bytes: u64, chunk_bytes: u64) -> Self {
        let chunks = data_bytes.div_ceil(chunk_bytes);
        let pages = chunks.div_ceil(CHUNKS_PER_PAGE).max(1);
        let words = (pages * CHUNKS_PER_PAGE / 64) as usize;
        Bitmap {
            words: vec![0; words],
            chunks,
            chunk_bytes,
            set_count: 0,
        }
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Bytes per chunk.
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_bytes
    }

    /// Number of persisted pages.
    pub fn pages(&self) -> u32 {
        (self.words.len() as u64 * 64 / CHUNKS_PER_PAGE) as u32
    }

    /// Number of set bits.
    pub fn set_count(&self) -> u64 {
        self.set_count
    }

    /// Bytes covered by set bits (the last chunk may be short).
    pub fn dirty_bytes(&self, data_bytes: u64) -> u64 {
        let mut total = self.set_count * self.chunk_bytes;
        if self.chunks > 0 && self.get(self.chunks - 1) {
            total -= self.chunks * self.chunk_bytes - data_bytes;
        }
        total
    }

    /// Whether chunk `c` is set.
    pub fn get(&self, c: u64) -> bool {
        c < self.chunks && self.words[(c / 64) as usize] & (1 << (c % 64)) != 0
    }

    /// Sets the chunks overlapping `[offset, offset+len)`; returns the pages
    /// that changed (and so must be persisted), ascending.
    pub fn set_range(&mut self, offset: u64, len: u64) -> Vec<u32> {
        let mut changed = Vec::new();
        if len == 0 {
            return changed;
        }
        let first = offset / self.chunk_bytes;
        let last = ((offset + len - 1) / self.chunk_bytes).min(self.chunks.saturating_sub(1));
        for c in first..=last {
            if self.set(c) {
                let page = (c / CHUNKS_PER_PAGE) as u32;
                if changed.last() != Some(&page) {
                    changed.push(page);
                }
            }
        }
        changed
    }

    /// Sets one chunk; true when it was clear.
    pub fn set(&mut self, c: u64) -> bool {
        if c >= self.chunks {
            return false;
        }
        let w = &mut self.words[(c / 64) as usize];
        let bit = 1u64 << (c % 64);
        if *w & bit != 0 {
            return false;
        }
        *w |= bit;
        self.set_count += 1;
        true
    }

    /// Clears one chunk; returns its page when it was set.
    pub fn clear(&mut self, c: u64) -> Option<u32> {
        if c >= self.chunks {
            return None;
        }
        let w = &mut self.words[(c / 64) as usize];
        let bit = 1u64 << (c % 64);
        if *w & bit == 0 {
            return None;
        }
        *w &= !bit;
        self.set_count -= 1;
        Some((c / CHUNKS_PER_PAGE) as u32)
    }

    /// Sets every chunk (full resync); returns all pages.
    pub fn set_all(&mut self) -> Vec<u32> {
        for c in 0..self.chunks {
            self.set(c);
        }
        (0..self.pages()).collect()
    }

    /// Clears every chunk; returns the pages that changed.
    pub fn clear_all(&mut self) -> Vec<u32> {
        let per_page = (CHUNKS_PER_PAGE / 64) as usize;
        let changed = self
            .words
            .chunks(per_page)
            .enumerate()
            .filter(|(_, ws)| ws.iter().any(|w| *w != 0))
            .map(|(i, _)| i as u32)
            .collect();
        self.words.iter_mut().for_each(|w| *w = 0);
        self.set_count = 0;
        changed
    }

    /// The first set chunk at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        let mut c = from;
        while c < self.chunks {
            let w = self.words[(c / 64) as usize] >> (c % 64);
            if w != 0 {
                let found = c + u64::from(w.trailing_zeros());
                return (found < self.chunks).then_some(found);
            }
            c = (c / 64 + 1) * 64;
        }
        None
    }

    /// The on-disk bytes of one page: its bits, the magic, the CRC32.
    pub fn page_bytes(&self, page: u32) -> [u8; BITMAP_PAGE_BYTES] {
        let mut out = [0u8; BITMAP_PAGE_BYTES];
        let words = &self.words[page as usize * PAGE_WORDS..][..PAGE_WORDS];
        for (chunk, w) in out.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        let trailer = PAGE_WORDS * 8;
        out[trailer..trailer + 4].copy_from_slice(&PAGE_MAGIC.to_le_bytes());
        let crc = crc32fast::hash(&out[..trailer + 4]);
        out[trailer + 4..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Loads the whole bitmap from its persisted bytes (pages back to back).
    /// Returns the pages that failed their checksum (or are missing): all
    /// of their chunks are set. Bits beyond the last chunk are ignored.
    pub fn load(&mut self, bytes: &[u8]) -> Vec<u32> {
        let mut damaged = Vec::new();
        for (page, words) in self.words.chunks_mut(PAGE_WORDS).enumerate() {
            let stored = bytes
                .get(page * BITMAP_PAGE_BYTES..(page + 1) * BITMAP_PAGE_BYTES)
                .filter(|b| page_is_intact(b));
            match stored {
                Some(b) => {
                    for (w, x) in words.iter_mut().zip(b.chunks_exact(8)) {
                        let mut le = [0u8; 8];
                        le.copy_from_slice(x);
                        *w = u64::from_le_bytes(le);
                    }
                }
                None => {
                    words.iter_mut().for_each(|w| *w = u64::MAX);
                    damaged.push(page as u32);
                }
            }
        }
        let tail = self.chunks % 64;
        let last_word = (self.chunks / 64) as usize;
        if tail != 0 {
            self.words[last_word] &= (1u64 << tail) - 1;
        }
        for w in self
            .words
            .iter_mut()
            .skip(last_word + usize::from(tail != 0))
        {
            *w = 0;
        }
        self.set_count = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
        damaged
    }
}

/// Whether a persisted page carries its magic and a matching CRC32.
fn page_is_intact(b: &[u8]) -> bool {
    let trailer = PAGE_WORDS * 8;
    let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    b.len() == BITMAP_PAGE_BYTES
        && u32_at(trailer) == PAGE_MAGIC
        && crc32fast::hash(&b[..trailer + 4]) == u32_at(trailer + 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_range_reports_changed_pages_once() {
        let mut b = Bitmap::new(10 << 30, 65536);
        assert_eq!(b.set_range(0, 4096), vec![0]);
        assert_eq!(b.set_range(0, 4096), Vec::<u32>::new());
        assert_eq!(b.set_range(65536 - 1, 2), vec![0]);
        assert_eq!(b.set_count(), 2);
        let far = CHUNKS_PER_PAGE * 65536 + 5;
        assert_eq!(b.set_range(far, 1), vec![1]);
    }

    #[test]
    fn next_set_walks_all_bits() {
        let mut b = Bitmap::new(1 << 30, 4096);
        for c in [0u64, 63, 64, 1000, b.chunks() - 1] {
            b.set(c);
        }
        let mut seen = vec![];
        let mut at = 0;
        while let Some(c) = b.next_set(at) {
            seen.push(c);
            at = c + 1;
        }
        assert_eq!(seen, vec![0, 63, 64, 1000, b.chunks() - 1]);
    }

    #[test]
    fn page_round_trip_and_tail_masking() {
        let mut b = Bitmap::new(100 * 65536 + 10, 65536);
        b.set_range(0, 101 * 65536);
        assert_eq!(b.set_count(), 101);
        assert_eq!(b.dirty_bytes(100 * 65536 + 10), 100 * 65536 + 10);
        // A page written by a bigger bitmap: bits beyond the last chunk.
        let mut big = Bitmap::new(1000 * 65536, 65536);
        big.set_range(0, 1000 * 65536);
        let mut c = Bitmap::new(100 * 65536 + 10, 65536);
        assert!(c.load(&big.page_bytes(0)).is_empty());
        assert_eq!(c.set_count(), 101);
        assert_eq!(c.clear(5), Some(0));
        assert_eq!(c.clear(5), None);
        assert_eq!(c.set_count(), 100);
        let mut d = Bitmap::new(100 * 65536 + 10, 65536);
        assert!(d.load(&c.page_bytes(0)).is_empty());
        assert!(!d.get(5) && d.get(6) && d.set_count() == 100);
    }

    #[test]
    fn a_damaged_page_counts_all_its_chunks_out_of_sync() {
        let chunks = 3 * CHUNKS_PER_PAGE;
        let mut b = Bitmap::new(chunks * 4096, 4096);
        b.set(7);
        b.set(CHUNKS_PER_PAGE + 9);
        let mut bytes: Vec<u8> = (0..b.pages()).flat_map(|p| b.page_bytes(p)).collect();
        let mut clean = Bitmap::new(chunks * 4096, 4096);
        assert!(clean.load(&bytes).is_empty());
        assert_eq!(clean.set_count(), 2);
        // One flipped bit in page 1, page 2 never written (zeros).
        bytes[BITMAP_PAGE_BYTES + 100] ^= 4;
        bytes[2 * BITMAP_PAGE_BYTES..].fill(0);
        let mut hurt = Bitmap::new(chunks * 4096, 4096);
        assert_eq!(hurt.load(&bytes), vec![1, 2]);
        assert!(hurt.get(7) && !hurt.get(8), "the intact page is as written");
        assert_eq!(hurt.set_count(), 1 + 2 * CHUNKS_PER_PAGE);
        // Too short: the missing pages are damaged as well.
        let mut short = Bitmap::new(chunks * 4096, 4096);
        assert_eq!(short.load(&bytes[..BITMAP_PAGE_BYTES]), vec![1, 2]);
    }
}

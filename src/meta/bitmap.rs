//! The dirty bitmap: one bit per chunk of the volume, set while the peer may
//! lack that chunk's data. Persisted in 4 KiB pages; a bit is persisted set
//! before the write it covers is completed without the peer.

/// Bytes in one persisted bitmap page.
pub const BITMAP_PAGE_BYTES: usize = 4096;
/// Chunks (bits) covered by one bitmap page.
pub const CHUNKS_PER_PAGE: u64 = (BITMAP_PAGE_BYTES * 8) as u64;

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

    /// The on-disk bytes of one page.
    pub fn page_bytes(&self, page: u32) -> [u8; BITMAP_PAGE_BYTES] {
        let mut out = [0u8; BITMAP_PAGE_BYTES];
        let first_word = page as usize * BITMAP_PAGE_BYTES / 8;
        for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&self.words[first_word + i].to_le_bytes());
        }
        out
    }

    /// Loads the whole bitmap from its persisted bytes (pages back to back).
    /// Bits beyond the last chunk are ignored.
    pub fn load(&mut self, bytes: &[u8]) {
        self.set_count = 0;
        for (i, w) in self.words.iter_mut().enumerate() {
            let at = i * 8;
            *w = match bytes.get(at..at + 8) {
                Some(b) => {
                    let mut x = [0u8; 8];
                    x.copy_from_slice(b);
                    u64::from_le_bytes(x)
                }
                None => 0,
            };
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
    }
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
        let mut bytes = b.page_bytes(0).to_vec();
        bytes[20] = 0xff; // garbage beyond the last chunk
        let mut c = Bitmap::new(100 * 65536 + 10, 65536);
        c.load(&bytes);
        assert_eq!(c.set_count(), 101);
        assert_eq!(c.clear(5), Some(0));
        assert_eq!(c.clear(5), None);
        assert_eq!(c.set_count(), 100);
    }
}

//! The simulated disks: each node's data with a volatile cache (completed
//! writes no flush covered are lost or kept at random in a power cut, in
//! flight ones may tear) and its metadata writes, durable in order.

use super::*;

impl Sim {
    /// A write (or flush) of the peer lands on node `n`: on its disk, off
    /// the engine's count, acknowledged on the link if `ack`.
    pub(super) fn land_replica(
        &mut self,
        n: usize,
        id: u64,
        data: &[(u64, u64)],
        flush: Option<Vec<u64>>,
        fua: bool,
        ack: bool,
    ) {
        self.check_replica_lands(n, data);
        self.complete_on_disk(n, data, fua, flush);
        self.nodes[n].eng.replica_finished();
        if ack {
            self.send(1 - n, Msg::Ack { id, ok: true });
        }
    }

    pub(super) fn complete_local(&mut self, n: usize) {
        if self.nodes[n].pending.is_empty() {
            return;
        }
        let i = self.rng.below(self.nodes[n].pending.len() as u64) as usize;
        let p = self.nodes[n].pending.swap_remove(i);
        match p {
            Pending::Local {
                id,
                data,
                flush,
                fua,
                ..
            } => {
                self.complete_on_disk(n, &data, fua, flush);
                self.nodes[n].eng.local_done(id, true);
            }
            Pending::Replica {
                id,
                data,
                flush,
                fua,
            } => self.land_replica(n, id, &data, flush, fua, true),
        }
        self.drain(n);
    }

    /// An I/O completed on node `n`'s disk: its data lands, and a flush
    /// makes what it covers durable.
    pub(super) fn complete_on_disk(
        &mut self,
        n: usize,
        data: &[(u64, u64)],
        fua: bool,
        flush: Option<Vec<u64>>,
    ) {
        self.land(n, data, fua);
        if let Some(blocks) = flush {
            self.flushed(n, &blocks);
        }
    }

    /// A write completed on node `n`'s disk: in its cache, and on the
    /// media too with FUA.
    pub(super) fn land(&mut self, n: usize, data: &[(u64, u64)], fua: bool) {
        let node = &mut self.nodes[n];
        for &(b, v) in data {
            node.disk.insert(b, v);
            if fua || !node.eng.cfg.volatile_cache {
                node.durable.insert(b, v);
                node.unflushed.remove(&b);
            } else {
                node.unflushed.entry(b).or_default().push(v);
            }
        }
    }

    /// A flush finished on node `n`: every block that was unflushed when
    /// it was issued is on the media, at least at the version it had then
    /// (the newest the cache holds now, which is one legal outcome).
    pub(super) fn flushed(&mut self, n: usize, blocks: &[u64]) {
        let node = &mut self.nodes[n];
        for b in blocks {
            if node.unflushed.remove(b).is_some()
                && let Some(v) = node.disk.get(b)
            {
                node.durable.insert(*b, *v);
            }
        }
    }

    pub(super) fn persist_meta(&mut self, n: usize) {
        // Group commit (as the shell's meta writer does): sometimes the
        // next two writes go out as one, with the newer of everything.
        let fold = self.nodes[n].meta.len() >= 2 && self.rng2.below(4) == 0;
        let first = self.nodes[n].meta.pop_front();
        let first = match (first, fold) {
            (Some(older), true) => self.nodes[n]
                .meta
                .pop_front()
                .map(|newer| older.then(newer)),
            (w, _) => w,
        };
        if let Some(w) = first {
            if w.flush_data {
                let blocks: Vec<u64> = self.nodes[n].unflushed.keys().copied().collect();
                self.flushed(n, &blocks);
            }
            let p = &mut self.nodes[n].persisted;
            p.disk = w.disk;
            p.gens = w.gens;
            p.primary = w.primary;
            p.record = w.record;
            for (page, bytes) in w.pages {
                p.bitmap_pages.insert(page, bytes);
            }
            if let Some(al) = &w.al {
                let slot = self.nodes[n].al_next.take();
                self.nodes[n].persisted.al_slots[slot] =
                    al.encode().expect("snapshot fits").to_vec();
            }
            let p = &mut self.nodes[n].persisted;
            p.cache_lost = w.cache_lost;
            self.nodes[n].eng.meta_persisted(w.token);
            self.drain(n);
        }
    }
}

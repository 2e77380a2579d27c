//! The fault model: process crashes, power cuts (of one node or both),
//! clean restarts, a replaced drive; each restart rebuilds the engine from
//! what the node's disks hold.

use super::*;

impl Sim {
    pub(super) fn restart_entropy(&mut self, n: usize) -> u64 {
        self.restarts += 1;
        Rng(self.seed ^ self.restarts.rotate_left(32) ^ n as u64).next_u64()
    }

    /// Node `n` crashes (kill -9 / power loss) and restarts from what it
    /// persisted: unpersisted metadata is lost, each in-flight write may have
    /// landed completely, partly or not at all.
    pub(super) fn crash(&mut self, n: usize) {
        self.restart(n, false, true)
    }

    /// Node `n` loses power: besides what a crash loses, its disks drop
    /// any subset of the writes no flush or FUA covered (a block keeps its
    /// durable version or any unflushed one), writes in flight are torn,
    /// and the metadata write in flight may have landed in part.
    pub(super) fn power_cut(&mut self, n: usize) {
        self.restart(n, true, true)
    }

    /// An operator restarts node `n` cleanly (`detach`, `attach`): what is
    /// in flight settles, a primary demotes (flushing first) and is
    /// promoted again afterwards. The restarted engine continues the
    /// activity log's numbering from the newest slot on disk.
    pub(super) fn clean_restart(&mut self, n: usize) {
        self.run_until_quiet();
        let was_primary = self.nodes[n].eng.role == Role::Primary;
        if was_primary && self.demote(n).is_err() {
            return;
        }
        self.run_until_quiet();
        self.log.push(format!("clean restart {n}"));
        self.restart(n, false, false);
        self.heal();
        self.run_until_quiet();
        if was_primary && self.nodes[n].eng.promote(false).is_ok() {
            self.log.push(format!("promote {n} after its restart"));
            self.drain(n);
            self.check_promoted(n);
        }
    }

    /// Both nodes lose power at the same instant: neither takes over
    /// before the other is down too.
    pub(super) fn double_power_cut(&mut self) {
        self.restart(0, true, false);
        self.restart(1, true, false);
    }

    /// Node `n` stops (killed, or by a power cut with `power`) and restarts
    /// from what survived; with `takeover` a cluster manager then promotes
    /// a node.
    pub(super) fn restart(&mut self, n: usize, power: bool, takeover: bool) {
        let what = if power { "power cut" } else { "crash" };
        self.log.push(format!("{what} {n}"));
        self.trace(&format!("before {what} {n}"));
        // The survivor holds every acknowledged write only if it was
        // receiving the primary's writes when the primary died.
        let was_connected = self.nodes[n].eng.replicating()
            && self.nodes[1 - n].eng.status().relation == Some(Relation::InSync);
        // The node dies as the link drops: it completes nothing after it
        // (completing a flush on its own first, then dying, is another
        // schedule: a cut, then a crash).
        self.cut_dead(Some(n));
        let pending = std::mem::take(&mut self.nodes[n].pending);
        for p in pending {
            let data = match p {
                Pending::Local { data, .. } | Pending::Replica { data, .. } => data,
            };
            let mut landed = 0;
            for &(b, v) in &data {
                if self.rng.below(2) == 0 {
                    landed += 1;
                    let node = &mut self.nodes[n];
                    node.disk.insert(b, v);
                    if power {
                        node.durable.insert(b, v);
                        node.unflushed.remove(&b);
                    } else {
                        node.unflushed.entry(b).or_default().push(v);
                    }
                }
            }
            if power && landed > 0 && landed < data.len() {
                self.cov.torn_writes += 1;
            }
        }
        if power {
            self.cov.power_cuts += 1;
            let node = &mut self.nodes[n];
            for (b, versions) in std::mem::take(&mut node.unflushed) {
                // Keep the durable version or any of the unflushed ones.
                let pick = if self.cut_drops_everything {
                    versions.len()
                } else {
                    self.rng.below(versions.len() as u64 + 1) as usize
                };
                if pick < versions.len() {
                    node.durable.insert(b, versions[pick]);
                }
                if pick + 1 != versions.len() {
                    self.cov.dropped_writes += 1;
                }
            }
            node.disk = node.durable.clone();
            // The metadata write in flight: some of its bitmap pages, and
            // its activity-log slot torn.
            if let Some(w) = node.meta.pop_front() {
                for (page, bytes) in w.pages {
                    if self.rng.below(2) == 0 {
                        node.persisted.bitmap_pages.insert(page, bytes);
                    }
                }
                if let Some(al) = &w.al {
                    let slot = node.al_next.take();
                    let mut torn = al.encode().expect("snapshot fits").to_vec();
                    torn[8] ^= 0xff;
                    node.persisted.al_slots[slot] = torn;
                    self.cov.torn_writes += 1;
                }
            }
        } else {
            // Same boot: the cache survived, and the restarted daemon
            // flushes it before anything else.
            let node = &mut self.nodes[n];
            node.unflushed.clear();
            node.durable = node.disk.clone();
        }
        let seed = self.restart_entropy(n);
        let node = &mut self.nodes[n];
        node.meta.clear();
        node.payload.clear();
        node.inbox.clear();
        node.forwards.clear();
        node.reads.clear();
        node.read_values.clear();
        let p = node.persisted.clone();
        let mut bitmap = Bitmap::new(DATA_BYTES, CHUNK);
        // Pages never written are as formatted (all clear).
        let bytes: Vec<u8> = (0..bitmap.pages())
            .flat_map(|page| match p.bitmap_pages.get(&page) {
                Some(b) => **b,
                None => bitmap.page_bytes(page),
            })
            .collect();
        assert!(bitmap.load(&bytes).is_empty(), "persisted pages are intact");
        let quorum = self.witness.is_some();
        node.eng = Engine::new(config(n == 0, quorum), p.disk, p.gens, bitmap, seed);
        node.eng.set_record(p.record);
        node.eng.set_cache_lost(p.cache_lost);
        if let Some(f) = &self.forced
            && n != f.complete
            && p.gens.forced != f.forced_id
        {
            // The forced promotion never became durable: it did not happen
            // (nothing was acknowledged on it: the volume is exported only
            // once the primary state is on disk).
            self.log.push("forced promotion lost in the crash".into());
            self.forced = None;
        }
        let node = &mut self.nodes[n];
        if power {
            // The shell sees another boot id: the engine is told first
            // (every metadata write from here on carries the mark), and
            // the mark is on disk before the new boot id (one superblock
            // write at attach).
            node.eng.power_lost();
            node.persisted.cache_lost = node.eng.status().cache_lost;
        }
        // As the shell's attach: the newest valid slot; the next write goes
        // to the other one. A crashed primary marks its extents; otherwise
        // the numbering continues after it.
        let newest = crate::meta::activity_log::choose_slot(&p.al_slots[0], &p.al_slots[1]);
        node.al_next = AlSlots::after(
            newest
                .as_ref()
                .ok()
                .and_then(|o| o.as_ref())
                .map(|(_, s)| *s),
        );
        match newest {
            Ok(Some((al, _))) if p.primary => {
                node.eng
                    .recover_activity_log(&al.extents, u64::from(al.extent_bytes), al.seq);
            }
            Ok(Some((al, _))) => node.eng.continue_activity_log(al.seq),
            Ok(None) => {}
            Err(_) if p.primary => {
                node.eng.mark_all_out_of_sync();
            }
            Err(_) => {}
        }
        self.drain(n);
        if power {
            self.account_power_loss(n);
        }
        if !takeover {
            return;
        }
        if let Some(w) = &mut self.witness {
            // The node is down for 10 s and was restarted 5 s ago: a
            // restarted process counts its grants from its start.
            w.now_ms += 10_000;
            w.granted[n] = w.now_ms - 5_000;
            w.peer_until[n] = 0;
            w.witness_until[n] = 0;
        }
        if self.witness.is_some() {
            // Leases run out; whoever the witness lets promote takes over:
            // first the survivor, else the restarted node.
            if self.nodes[1 - n].eng.role != Role::Primary && !self.witness_promote(1 - n) {
                self.witness_promote(n);
            }
            return;
        }
        // Someone takes over: the survivor if it was connected (then it holds
        // every acknowledged write), else the restarted node. Promoting a
        // survivor that was already cut off is a split brain the witness
        // exists to prevent; with quorum off the engine detects it instead.
        if self.nodes[1 - n].eng.role != Role::Primary {
            // The shell lets in-flight replica writes land before promoting
            // when the engine says so.
            self.land_replicas_before_promoting(1 - n);
            self.land_replicas_before_promoting(n);
            // (Without a connected survivor, a cluster manager puts back the
            // node that was primary last: the other one may have missed
            // its writes. A copy that lost power refuses until it synced.)
            let last = self.last_primary;
            let who = if was_connected && self.nodes[1 - n].eng.promote(false).is_ok() {
                1 - n
            } else if (!self.power_cuts || last == n) && self.nodes[n].eng.promote(false).is_ok() {
                n
            } else if self.power_cuts
                && last == 1 - n
                && self.nodes[1 - n].eng.promote(false).is_ok()
            {
                1 - n
            } else {
                return;
            };
            self.log.push(format!("promote {who}"));
            self.drain(who);
            self.check_promoted(who);
        }
    }

    /// The secondary's drive is replaced by a blank one with fresh metadata
    /// (`create-md`), while the primary holds every write (in sync): the
    /// next connection must copy everything, and interruptions of that full
    /// sync (cuts, crashes of either node) must still end with equal copies.
    pub(super) fn swap_drive(&mut self) {
        let Some(p) = (0..2).find(|&i| self.nodes[i].eng.role == Role::Primary) else {
            return;
        };
        let n = 1 - p;
        // The operator stops the node first: what is in flight settles.
        // (A write the old drive acknowledged must not complete after the
        // drive is gone: the rule 1 check at completion reads the peer.)
        self.run_until_quiet();
        let st = self.nodes[p].eng.status();
        if self.nodes[p].eng.disk != DiskState::UpToDate
            || st.relation != Some(Relation::InSync)
            || st.inflight_requests > 0
        {
            return;
        }
        self.log.push(format!("swap drive {n}"));
        if self.forced.as_ref().is_some_and(|f| n != f.complete) {
            // The operator replaced the forced copy's drive: its lineage
            // is discarded as by a resolve.
            self.forced = None;
        }
        self.cut();
        let seed = self.restart_entropy(n);
        let node = &mut self.nodes[n];
        node.pending.clear();
        node.meta.clear();
        node.payload.clear();
        node.inbox.clear();
        node.forwards.clear();
        node.reads.clear();
        node.read_values.clear();
        node.disk = Disk::new();
        node.durable = Disk::new();
        node.unflushed.clear();
        node.persisted = Persisted {
            disk: DiskState::Inconsistent,
            gens: Generations::default(),
            primary: false,
            bitmap_pages: BTreeMap::new(),
            al_slots: empty_al_slots(),
            record: RecordView::default(),
            cache_lost: false,
        };
        node.al_next = AlSlots::default();
        node.eng = Engine::new(
            config(n == 0, self.witness.is_some()),
            DiskState::Inconsistent,
            Generations::default(),
            Bitmap::new(DATA_BYTES, CHUNK),
            seed,
        );
        self.drain(n);
    }
}

//! The simulated link: messages between the nodes (data, replies, state),
//! delivered one at a time in random order; cuts and heals; the replica
//! writes of an old connection landing before a reconnect or promotion.

use super::*;

impl Sim {
    pub(super) fn heal(&mut self) {
        if self.connected {
            return;
        }
        // A node finishes applying the replica writes of the old connection
        // before it talks on the new one, when the engine says so (the
        // shell waits for them), so none of them can land after a resync of
        // the same chunk. (Their acks went with the old connection.)
        for n in 0..2 {
            if self.nodes[n].eng.new_link_waits_for_replicas() {
                self.land_replicas(n, false);
            }
        }
        self.connected = true;
        self.log.push("heal".into());
        self.trace("heal");
        for n in 0..2 {
            let v = self.nodes[n].eng.announced_view();
            let runs = self.nodes[n].eng.dirty_runs(DIRTY_RUNS_MAX);
            self.nodes[1 - n].inbox.push_back(Msg::State(v, runs));
        }
    }

    pub(super) fn cut(&mut self) {
        self.cut_dead(None)
    }

    /// The link drops; node `dead` (if any) died at that instant and does
    /// not see it.
    pub(super) fn cut_dead(&mut self, dead: Option<usize>) {
        if !self.connected {
            return;
        }
        self.connected = false;
        self.log.push("cut".into());
        for n in 0..2 {
            self.nodes[n].inbox.clear();
            if dead == Some(n) {
                continue;
            }
            // Replica writes already handed to the disk still land, but their
            // acks are lost with the connection.
            self.nodes[n].eng.peer_disconnected();
            self.drain(n);
        }
    }

    pub(super) fn send(&mut self, to: usize, m: Msg) {
        if self.connected {
            self.nodes[to].inbox.push_back(m);
        }
    }

    /// Executes every action node `n` has queued.
    pub(super) fn drain(&mut self, n: usize) {
        while let Some(a) = self.nodes[n].eng.poll_action() {
            match a {
                Action::LocalIo {
                    id,
                    op: Op::Read,
                    range,
                } => {
                    // Reads complete at once, from what the disk holds now.
                    let node = &mut self.nodes[n];
                    let v = node.disk.get(&(range.offset / BLOCK)).copied();
                    node.read_values.insert(id, v.unwrap_or(0));
                    node.eng.local_done(id, true);
                }
                Action::LocalIo { id, op, range } => {
                    let node = &mut self.nodes[n];
                    let data = match op {
                        Op::Write { .. } => node.payload.get(&id).cloned().unwrap_or_default(),
                        Op::Zeroes { .. } => node.payload.get(&id).cloned().unwrap_or_default(),
                        _ => vec![],
                    };
                    assert_no_overlap(&node.pending, range, op, &self.log);
                    let flush = (op == Op::Flush).then(|| node.unflushed.keys().copied().collect());
                    node.pending.push(Pending::Local {
                        id,
                        data,
                        range,
                        flush,
                        fua: matches!(op, Op::Write { fua: true } | Op::Zeroes { fua: true }),
                    });
                }
                Action::PeerIo {
                    id,
                    op,
                    range,
                    forward,
                } => {
                    let data = match op {
                        Op::Write { .. } => {
                            self.nodes[n].payload.get(&id).cloned().unwrap_or_default()
                        }
                        Op::Zeroes { .. } => {
                            self.nodes[n].payload.get(&id).cloned().unwrap_or_default()
                        }
                        _ => vec![],
                    };
                    let m = if op == Op::Flush {
                        Msg::Flush { id }
                    } else if op == Op::Read {
                        Msg::Read { id, range }
                    } else if forward {
                        Msg::Forward {
                            id,
                            op,
                            range,
                            data,
                        }
                    } else {
                        Msg::Write {
                            id,
                            data,
                            fua: !op.volatile_write(),
                            resync: false,
                        }
                    };
                    if self.connected {
                        self.send(1 - n, m);
                    } else {
                        self.nodes[n].eng.peer_done(id, false);
                    }
                }
                Action::ResyncChunk { id, range } => {
                    let data: Vec<(u64, u64)> = blocks(range)
                        .map(|b| (b, self.nodes[n].disk.get(&b).copied().unwrap_or(0)))
                        .collect();
                    if self.connected {
                        self.send(
                            1 - n,
                            Msg::Write {
                                id,
                                data,
                                fua: false,
                                resync: true,
                            },
                        );
                    } else {
                        self.nodes[n].eng.peer_done(id, false);
                    }
                }
                Action::Complete { id, result } => {
                    if let Some(peer_id) = self.nodes[n].forwards.remove(&id) {
                        self.nodes[n].payload.remove(&id);
                        let ok = result.is_ok();
                        self.cov.forwarded_writes += u64::from(ok);
                        self.send(1 - n, Msg::Ack { id: peer_id, ok });
                        continue;
                    }
                    if let Some((block, acked)) = self.nodes[n].reads.remove(&id) {
                        let got = self.nodes[n].read_values.remove(&id);
                        if result.is_ok() && self.forced.is_none() {
                            self.cov.reads += 1;
                            let have = got.expect("a completed read has data") & !ZERO_FLAG;
                            assert!(
                                have >= acked,
                                "rule 7: node {n} read block {block} at v{have} through its sync source or after the hand-over, older than acknowledged v{acked}; log {:?}",
                                self.log
                            );
                        }
                        continue;
                    }
                    if let Some(snapshot) = self.flushes.remove(&id)
                        && result.is_ok()
                    {
                        // P1: every write acknowledged before this flush
                        // was submitted is promised durable now.
                        for (b, v) in snapshot {
                            let e = self.promised.entry(b).or_insert(0);
                            *e = (*e).max(v);
                        }
                        continue;
                    }
                    let fua = self.fua_writes.remove(&id);
                    let peer_acked = self.peer_acked.remove(&id);
                    if let Some(data) = self.nodes[n].payload.remove(&id)
                        && result.is_ok()
                    {
                        let cuts = self.write_cuts.remove(&id).unwrap_or(0);
                        // The peer held it when it acknowledged it, and an
                        // operator forced the peer since: the forced history
                        // may have overwritten it there.
                        let forced_since_ack =
                            peer_acked && self.forced.as_ref().is_some_and(|f| f.complete == n);
                        self.check_rule1(n, &data, cuts != self.cov.power_cuts, forced_since_ack);
                        self.completed_writes += 1;
                        for &(b, v) in &data {
                            let e = self.acked.entry(b).or_insert(0);
                            *e = (*e).max(v & !ZERO_FLAG);
                            if fua {
                                let e = self.promised.entry(b).or_insert(0);
                                *e = (*e).max(v & !ZERO_FLAG);
                            }
                        }
                    }
                }
                Action::PersistMeta {
                    token,
                    disk,
                    generations,
                    primary,
                    pages,
                    activity_log,
                    record,
                    cache_lost,
                    flush_data,
                } => self.nodes[n].meta.push_back(MetaWrite {
                    record,
                    token,
                    disk,
                    gens: generations,
                    primary,
                    pages,
                    al: activity_log,
                    cache_lost,
                    flush_data,
                }),
                Action::AnnounceState => {
                    let v = self.nodes[n].eng.announced_view();
                    let runs = self.nodes[n].eng.dirty_runs(DIRTY_RUNS_MAX);
                    self.send(1 - n, Msg::State(v, runs));
                }
                Action::SendSyncDone { generations } => {
                    self.send(1 - n, Msg::SyncDone(generations))
                }
                Action::VerifyChunk { id, range } => {
                    let equal = self.connected.then(|| {
                        blocks(range).all(|b| {
                            self.nodes[n].disk.get(&b).copied().unwrap_or(0)
                                == self.nodes[1 - n].disk.get(&b).copied().unwrap_or(0)
                        })
                    });
                    // Inside a locked range the copies differ only where a
                    // bitmap says so (P3). A verify started while in sync
                    // may meet a chunk marked since: a write the peer
                    // refused once it saw itself as sync source again
                    // (seed 73143).
                    let marked =
                        |b: u64| (0..2).any(|m| self.nodes[m].eng.bitmap.get(b * BLOCK / CHUNK));
                    let differ: Vec<(u64, u64, u64)> = blocks(range)
                        .map(|b| {
                            let v = |m: usize| self.nodes[m].disk.get(&b).copied().unwrap_or(0);
                            (b, v(n), v(1 - n))
                        })
                        .filter(|(b, here, peer)| here != peer && !marked(*b))
                        .collect();
                    if equal == Some(false) && !differ.is_empty() {
                        panic!(
                            "verify on node {n} found in-sync copies differing (block, here, peer): {differ:?}; log {:?}",
                            self.log
                        );
                    }
                    self.nodes[n].eng.verify_done(id, equal);
                }
                Action::WitnessChange { op, expected_epoch } => match &mut self.witness {
                    Some(w) => w.queue.push_back((n, op, expected_epoch)),
                    None => self.nodes[n].eng.witness_change_done(None),
                },
                Action::Export(_) | Action::Notify(_) => {}
            }
        }
    }

    pub(super) fn deliver(&mut self, to: usize) {
        let Some(m) = self.nodes[to].inbox.pop_front() else {
            return;
        };
        match m {
            Msg::State(v, runs) => {
                if tracing() {
                    self.trace(&format!(
                        "{to} gets the state {:?} {:?} gens {:x}/{:x} dirty {} (runs {runs:?}){} rec {:?}",
                        v.role,
                        v.disk,
                        v.generations.current,
                        v.generations.bitmap,
                        v.dirty_chunks,
                        if v.cache_lost { " (cache lost)" } else { "" },
                        v.record
                    ));
                }
                let before = self.nodes[to].eng.status().relation;
                self.nodes[to].eng.peer_dirty_runs(runs);
                self.nodes[to].eng.peer_state(v);
                let after = self.nodes[to].eng.status().relation;
                if before != after {
                    self.trace(&format!("{to}: {after:?}"));
                    let d = [
                        self.nodes[0].eng.bitmap.set_count(),
                        self.nodes[1].eng.bitmap.set_count(),
                    ];
                    self.log.push(format!("{to}: {after:?} dirty {d:?}"));
                }
            }
            Msg::SyncDone(g) => {
                self.cov.hand_overs += u64::from(self.nodes[to].eng.role == Role::Primary);
                self.nodes[to].eng.peer_sync_done(g)
            }
            Msg::Ack { id, ok } => {
                if ok && id < INTERNAL_ID_BASE {
                    self.peer_acked.insert(id);
                }
                self.nodes[to].eng.peer_done(id, ok)
            }
            Msg::Flush { id } => {
                if self.nodes[to].eng.accepts_peer_request(PeerRequest::Flush) {
                    let blocks = self.nodes[to].unflushed.keys().copied().collect();
                    self.start_replica(to, id, vec![], Some(blocks), false);
                } else {
                    self.send(1 - to, Msg::Ack { id, ok: false });
                }
            }
            Msg::Write {
                id,
                data,
                fua,
                resync,
            } => {
                if self.nodes[to]
                    .eng
                    .accepts_peer_request(PeerRequest::Write { resync })
                {
                    self.start_replica(to, id, data, None, fua);
                } else {
                    self.send(1 - to, Msg::Ack { id, ok: false });
                }
            }
            Msg::Forward {
                id,
                op,
                range,
                data,
            } => match self.nodes[to].eng.submit_forwarded(op, range) {
                Some(fid) => {
                    self.nodes[to].payload.insert(fid, data);
                    self.nodes[to].forwards.insert(fid, id);
                }
                None => self.send(1 - to, Msg::Ack { id, ok: false }),
            },
            Msg::Read { id, range } => {
                let serves = self.nodes[to].eng.accepts_peer_request(PeerRequest::Read);
                let data = serves.then(|| {
                    blocks(range)
                        .map(|b| (b, self.nodes[to].disk.get(&b).copied().unwrap_or(0)))
                        .collect()
                });
                self.send(1 - to, Msg::ReadReply { id, data });
            }
            Msg::ReadReply { id, data } => {
                let ok = data.is_some();
                if let Some(d) = data.and_then(|d| d.first().copied()) {
                    self.nodes[to].read_values.insert(id, d.1);
                }
                self.nodes[to].eng.peer_done(id, ok);
            }
        }
        self.drain(to);
    }

    /// Node `n` starts applying a request of its peer (the engine counts
    /// it until it lands).
    fn start_replica(
        &mut self,
        n: usize,
        id: u64,
        data: Vec<(u64, u64)>,
        flush: Option<Vec<u64>>,
        fua: bool,
    ) {
        self.nodes[n].eng.replica_started();
        self.nodes[n].pending.push(Pending::Replica {
            id,
            data,
            flush,
            fua,
        });
    }

    /// Replica writes still in flight on node `n` land, acknowledged on
    /// the link if `ack` (what the shell does when the engine says a
    /// promotion or a new connection waits for them).
    pub(super) fn land_replicas(&mut self, n: usize, ack: bool) {
        let pending = std::mem::take(&mut self.nodes[n].pending);
        for p in pending {
            match p {
                Pending::Replica {
                    id,
                    data,
                    flush,
                    fua,
                } => self.land_replica(n, id, &data, flush, fua, ack),
                local => self.nodes[n].pending.push(local),
            }
        }
        self.drain(n);
    }

    /// Lands node `n`'s replica writes if a promotion must wait for them.
    pub(super) fn land_replicas_before_promoting(&mut self, n: usize) {
        if self.nodes[n].eng.promote_waits_for_replicas() {
            self.cov.promotions_after_landing += 1;
            self.land_replicas(n, true);
        }
    }
}

//! Carrying out the engine's actions: local and peer I/O (client writes,
//! resync chunks, verify digests), completions, metadata jobs, state
//! announcements, and notices (events, logs, the export hook).

use std::sync::Arc;

use super::Shell;
use super::meta_writer::{MetaJob, MetaWrite};
use crate::engine::{Action, Notice, Op, Range};
use crate::link::wire::{FLAG_FORWARD, FLAG_FUA, FLAG_RESYNC, Kind};
use crate::link::{bytes_of, data_header};
use crate::volume::{Input, VolumeError};

impl Shell {
    pub(super) fn drain_actions(&mut self) {
        while let Some(a) = self.engine.poll_action() {
            self.execute(a);
        }
    }

    pub(super) fn execute(&mut self, a: Action) {
        match a {
            Action::LocalIo { id, op, range } => self.local_io(id, op, range),
            Action::PeerIo {
                id,
                op,
                range,
                forward,
            } => self.peer_io(id, op, range, forward),
            Action::ResyncChunk { id, range } => self.resync_chunk(id, range),
            Action::VerifyChunk { id, range } => self.verify_chunk(id, range),
            Action::Complete { id, result } => {
                self.bufs.remove(&id);
                // Application writes, ours or forwarded by a primary whose
                // copy we resync, steer the resync rate (see RateController).
                if let Some((t, bytes)) = self.write_started.remove(&id) {
                    self.rate_controller.app_write_done(
                        t.elapsed(),
                        bytes,
                        self.resync_started.is_some(),
                    );
                }
                if let Some((conn, request)) = self.forwarded_replies.remove(&id) {
                    return self.reply_forwarded(conn, request, result.is_ok());
                }
                if let Err(e) = &result {
                    tracing::debug!("volume {}: request {id} failed: {e}", self.name);
                }
                let data = self.read_results.remove(&id);
                if let Some(w) = self.waiters.remove(&id) {
                    let _ = w.send(result.map(|_| data).map_err(VolumeError::from));
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
            } => {
                let _ = self.meta_tx.send(MetaJob {
                    write: MetaWrite::Engine(token),
                    activity_log,
                    disk,
                    generations,
                    primary,
                    attached: true,
                    pages,
                    record,
                    cache_lost,
                    flush_data,
                });
            }
            Action::WitnessChange { op, expected_epoch } => match self.lease.clone() {
                Some(l) => {
                    tokio::spawn(crate::volume::quorum::change(
                        l,
                        self.name.clone(),
                        self.peer_name.clone(),
                        expected_epoch,
                        op,
                        self.tx.clone(),
                    ));
                }
                None => self.engine.witness_change_done(None),
            },
            Action::AnnounceState => self.announce(None),
            Action::SendSyncDone { generations } => self.announce(Some(generations)),
            Action::Export(on) => {
                if on != self.exported {
                    self.exported = on;
                    (self.export)(&self.handle, on);
                }
            }
            Action::Notify(n) => self.notify(n),
        }
    }

    pub(super) fn notify(&mut self, n: Notice) {
        let event = match n {
            Notice::LocalDiskFailed => Some("local-disk-failed"),
            Notice::PeerOutdated => Some("peer-outdated"),
            Notice::SplitBrain => Some("split-brain"),
            Notice::ResyncStarted => Some("resync-started"),
            Notice::ResyncDone => Some("resync-done"),
            Notice::QuorumLost => Some("quorum-lost"),
            Notice::QuorumRegained => Some("quorum-regained"),
            Notice::Fenced => Some("demoted"),
            Notice::PeerRefused(_) | Notice::VerifyDone | Notice::Outdated => None,
        };
        if let Some(e) = event {
            (self.events)(&self.name, e);
        }
        match n {
            Notice::LocalDiskFailed => tracing::error!(
                "volume {}: local disk failed; detached it, serving through the peer",
                self.name
            ),
            Notice::PeerOutdated => tracing::warn!(
                "volume {}: peer {} is outdated; writes continue on this node and are tracked in the bitmap",
                self.name,
                self.peer_name
            ),
            Notice::SplitBrain => tracing::error!(
                "volume {}: split brain: this node and {} wrote independently; not syncing",
                self.name,
                self.peer_name
            ),
            Notice::ResyncStarted => {
                tracing::info!("volume {}: resync to {} started", self.name, self.peer_name)
            }
            Notice::ResyncDone => tracing::info!("volume {}: resync finished", self.name),
            Notice::VerifyDone => {
                let s = self.engine.status();
                if let Some(v) = s.last_verify {
                    tracing::info!(
                        "volume {}: verify done: {} of {} chunks differ{}",
                        self.name,
                        v.mismatched_chunks,
                        v.checked_chunks,
                        if v.mismatched_chunks > 0 {
                            " (marked out of sync; run `blkrep resync`)"
                        } else {
                            ""
                        }
                    );
                }
            }
            Notice::PeerRefused(why) => {
                tracing::warn!("volume {}: peer refused: {why}", self.name)
            }
            Notice::QuorumLost => tracing::error!(
                "volume {}: quorum lost: neither {} nor the witness confirms; writes {}",
                self.name,
                self.peer_name,
                if self.engine.status().quorum_lost {
                    "wait"
                } else {
                    "fail"
                }
            ),
            Notice::QuorumRegained => {
                tracing::info!("volume {}: quorum regained", self.name)
            }
            Notice::Fenced => tracing::error!(
                "volume {}: the witness made {} primary; this node stopped serving",
                self.name,
                self.peer_name
            ),
            Notice::Outdated => tracing::warn!(
                "volume {}: the witness lists this copy as outdated ({} wrote without it)",
                self.name,
                self.peer_name
            ),
        }
    }

    pub(super) fn local_io(&mut self, id: u64, op: Op, range: Range) {
        let store = self.store.clone();
        let tx = self.tx.clone();
        let buf = self.bufs.get(&id).cloned();
        tokio::spawn(async move {
            if op == Op::Read {
                // A read held back while this copy was being resynced.
                let data = store.read(range.offset, range.len as usize).await.ok();
                let _ = tx.send(Input::LocalRead { id, data });
                return;
            }
            let res = match (op, buf) {
                (Op::Write { fua }, Some(b)) => store.write(range.offset, b, fua).await,
                (Op::Zeroes { fua }, _) => {
                    let r = store.write_zeroes(range.offset, range.len).await;
                    if r.is_ok() && fua {
                        store.flush().await
                    } else {
                        r
                    }
                }
                (Op::Flush, _) => store.flush().await,
                _ => Err(crate::store::StoreError::Stopped),
            };
            if let Err(e) = &res {
                tracing::error!("local I/O failed: {e}");
            }
            let _ = tx.send(Input::LocalDone {
                id,
                ok: res.is_ok(),
            });
        });
    }

    pub(super) fn peer_io(&mut self, id: u64, op: Op, range: Range, forward: bool) {
        let tx = self.tx.clone();
        let Some(conn) = self.conn.clone() else {
            let _ = tx.send(Input::PeerDone {
                id,
                ok: false,
                data: None,
            });
            return;
        };
        let buf = self.bufs.get(&id).cloned();
        let index = self.index;
        let flags = move |fua: bool| {
            (if fua { FLAG_FUA } else { 0 }) | if forward { FLAG_FORWARD } else { 0 }
        };
        tokio::spawn(async move {
            let (h, payload) = match (op, buf) {
                (Op::Write { fua }, Some(b)) => (
                    data_header(Kind::Write, index, range.offset, 0, flags(fua)),
                    bytes_of(b),
                ),
                (Op::Zeroes { fua }, _) => (
                    data_header(
                        Kind::Zeroes,
                        index,
                        range.offset,
                        range.len as u32,
                        flags(fua),
                    ),
                    bytes::Bytes::new(),
                ),
                (Op::Flush, _) => (
                    data_header(Kind::Flush, index, 0, 0, 0),
                    bytes::Bytes::new(),
                ),
                (Op::Read, _) => (
                    data_header(Kind::ReadRequest, index, range.offset, range.len as u32, 0),
                    bytes::Bytes::new(),
                ),
                _ => {
                    let _ = tx.send(Input::PeerDone {
                        id,
                        ok: false,
                        data: None,
                    });
                    return;
                }
            };
            let r = conn.request(h, payload).await;
            let (ok, data) = match r {
                Ok(reply) => {
                    if reply.status != 0 {
                        tracing::debug!("peer refused {op:?} {range:?}: errno {}", reply.status);
                    }
                    (reply.status == 0, reply.data)
                }
                Err(e) => {
                    tracing::debug!("peer request {op:?} {range:?} lost: {e}");
                    (false, None)
                }
            };
            let _ = tx.send(Input::PeerDone { id, ok, data });
        });
    }

    pub(super) fn resync_chunk(&mut self, id: u64, range: Range) {
        let tx = self.tx.clone();
        let Some(conn) = self.conn.clone() else {
            let _ = tx.send(Input::PeerDone {
                id,
                ok: false,
                data: None,
            });
            return;
        };
        let store = self.store.clone();
        let index = self.index;
        let start_at = self.resync_pacer.reserve(range.len);
        self.rate_controller.resync_started(range.len);
        let checksum = self.checksum_resync;
        tokio::spawn(async move {
            if let Some(at) = start_at {
                tokio::time::sleep_until(at.into()).await;
            }
            let data = match store.read(range.offset, range.len as usize).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!("resync read failed: {e}");
                    let _ = tx.send(Input::DiskFailed);
                    let _ = tx.send(Input::PeerDone {
                        id,
                        ok: false,
                        data: None,
                    });
                    return;
                }
            };
            if checksum {
                // Checksum-based resync: send the chunk only if it differs.
                let h = data_header(Kind::HashRequest, index, range.offset, range.len as u32, 0);
                let mine = digest(data.as_slice());
                if let Ok(r) = conn.request(h, bytes::Bytes::new()).await
                    && r.status == 0
                    && r.digest.as_deref() == Some(&mine[..])
                {
                    let _ = tx.send(Input::PeerDone {
                        id,
                        ok: true,
                        data: None,
                    });
                    return;
                }
            }
            // A chunk of zeros (never written, or trimmed) travels as a zeroing
            // request: nothing crosses the link and the target punches a hole.
            let reply = if data.as_slice().iter().all(|&b| b == 0) {
                let h = data_header(
                    Kind::Zeroes,
                    index,
                    range.offset,
                    range.len as u32,
                    FLAG_RESYNC,
                );
                conn.request(h, bytes::Bytes::new()).await
            } else {
                let h = data_header(Kind::Write, index, range.offset, 0, FLAG_RESYNC);
                conn.request(h, bytes_of(Arc::new(data))).await
            };
            let ok = matches!(reply, Ok(r) if r.status == 0);
            let _ = tx.send(Input::PeerDone { id, ok, data: None });
        });
    }

    pub(super) fn verify_chunk(&mut self, id: u64, range: Range) {
        let tx = self.tx.clone();
        let Some(conn) = self.conn.clone() else {
            let _ = tx.send(Input::VerifyDone { id, equal: None });
            return;
        };
        let store = self.store.clone();
        let index = self.index;
        let start_at = self.resync_pacer.reserve(range.len);
        self.rate_controller.resync_started(range.len);
        tokio::spawn(async move {
            if let Some(at) = start_at {
                tokio::time::sleep_until(at.into()).await;
            }
            let h = data_header(Kind::HashRequest, index, range.offset, range.len as u32, 0);
            let (local, remote) = tokio::join!(
                store.read(range.offset, range.len as usize),
                conn.request(h, bytes::Bytes::new())
            );
            let equal = match (local, remote) {
                (Ok(d), Ok(r)) if r.status == 0 => {
                    r.digest.map(|p| p[..] == digest(d.as_slice())[..])
                }
                _ => None,
            };
            let _ = tx.send(Input::VerifyDone { id, equal });
        });
    }
}

/// SHA-256 of a chunk (verify and checksum-based resync).
pub(super) fn digest(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

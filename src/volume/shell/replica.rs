//! The replica side: writes, flushes and resync data the peer sends
//! (applied to this copy when the engine accepts them), writes the peer
//! forwards to this node as its sync source, and what waits for the
//! replica writes of an old connection to land (a new connection, a
//! promotion).

use std::sync::Arc;
use std::time::Instant;

use super::Shell;
use super::execute::digest;
use crate::engine::{Op, PeerRequest, Range};
use crate::link::wire::{FLAG_FORWARD, FLAG_FUA, FLAG_RESYNC, Kind};
use crate::link::{InboundRequest, PeerConnection, bytes_of};
use crate::volume::Input;

impl Shell {
    /// A replica write finished: once none is left, a promotion or a new
    /// connection that waited for them goes on.
    pub(super) fn replica_done(&mut self) {
        self.engine.replica_finished();
        if !self.engine.promote_waits_for_replicas()
            && let Some((force, reply)) = self.promote_after_replicas.take()
        {
            self.promote_now(force, reply);
        }
        if !self.engine.new_link_waits_for_replicas()
            && let Some(conn) = self.readying.take()
        {
            self.connection_ready(conn);
        }
    }

    /// Applies a request from the peer (this node is its replica).
    pub(super) fn replica(&mut self, conn: Arc<PeerConnection>, req: InboundRequest) {
        let store = self.store.clone();
        let current = self.current_conn_id() == Some(conn.id);
        let resync = req.flags & FLAG_RESYNC != 0;
        let asked = match req.kind {
            Kind::Write | Kind::Zeroes => Some(PeerRequest::Write { resync }),
            Kind::Flush => Some(PeerRequest::Flush),
            Kind::HashRequest => Some(PeerRequest::Digest { resync }),
            Kind::ReadRequest => Some(PeerRequest::Read),
            _ => None,
        };
        // Only the current connection's requests, and only what the engine
        // says this copy applies now.
        let accepted = current && asked.is_some_and(|a| self.engine.accepts_peer_request(a));
        let range_ok = crate::store::check_range(req.offset, req.len, self.data_bytes).is_ok()
            || req.kind == Kind::Flush;
        if accepted
            && range_ok
            && matches!(req.kind, Kind::Write | Kind::Zeroes)
            && resync
            && let Some(t) = &mut self.target_sync
        {
            t.received_bytes = t.received_bytes.saturating_add(req.len);
        }
        if range_ok
            && current
            && req.flags & FLAG_FORWARD != 0
            && matches!(req.kind, Kind::Write | Kind::Zeroes)
        {
            return self.forwarded(conn, req);
        }
        self.engine.replica_started();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let fua = req.flags & FLAG_FUA != 0;
            let errno = |r: Result<(), crate::store::StoreError>| match r {
                Ok(()) => 0u32,
                Err(e) => {
                    tracing::error!("replica I/O failed: {e}; detaching the local disk");
                    let _ = tx.send(Input::DiskFailed);
                    libc::EIO as u32
                }
            };
            if !range_ok {
                conn.reply(req.request, libc::EINVAL as u32, None).await;
            } else {
                match req.kind {
                    Kind::Write if accepted => {
                        let status = match req.data {
                            Some(d) => errno(store.write(req.offset, Arc::new(d), fua).await),
                            None => libc::EINVAL as u32,
                        };
                        conn.reply(req.request, status, None).await;
                    }
                    Kind::Zeroes if accepted => {
                        let mut r = store.write_zeroes(req.offset, req.len).await;
                        if r.is_ok() && fua {
                            r = store.flush().await;
                        }
                        conn.reply(req.request, errno(r), None).await;
                    }
                    Kind::Flush if accepted => {
                        conn.reply(req.request, errno(store.flush().await), None)
                            .await;
                    }
                    Kind::HashRequest if accepted => {
                        match store.read(req.offset, req.len as usize).await {
                            Ok(d) => {
                                let dg = digest(d.as_slice()).to_vec();
                                conn.reply_digest(req.request, 0, Some(dg)).await
                            }
                            Err(_) => conn.reply_digest(req.request, libc::EIO as u32, None).await,
                        }
                    }
                    Kind::ReadRequest if accepted => {
                        match store.read(req.offset, req.len as usize).await {
                            Ok(d) => {
                                conn.reply(req.request, 0, Some(bytes_of(Arc::new(d))))
                                    .await
                            }
                            Err(_) => conn.reply(req.request, libc::EIO as u32, None).await,
                        }
                    }
                    _ => conn.reply(req.request, libc::EPERM as u32, None).await,
                }
            }
            let _ = tx.send(Input::ReplicaDone);
        });
    }

    /// A write the peer forwarded: it is primary on a copy this node is
    /// resyncing. The engine applies it in order with the resync chunks;
    /// the reply goes out when it completes (`reply_forwarded`). Refused
    /// with EAGAIN when this node is not the peer's sync source (the peer
    /// holds the write back and sends it again).
    pub(super) fn forwarded(&mut self, conn: Arc<PeerConnection>, req: InboundRequest) {
        let fua = req.flags & FLAG_FUA != 0;
        let op = if req.kind == Kind::Write {
            Op::Write { fua }
        } else {
            Op::Zeroes { fua }
        };
        let submitted = if req.kind == Kind::Write && req.data.is_none() {
            Err(libc::EINVAL)
        } else {
            self.engine
                .submit_forwarded(op, Range::new(req.offset, req.len))
                .ok_or(libc::EAGAIN)
        };
        let id = match submitted {
            Ok(id) => id,
            Err(status) => {
                tokio::spawn(async move { conn.reply(req.request, status as u32, None).await });
                return;
            }
        };
        if let Some(d) = req.data {
            self.bufs.insert(id, Arc::new(d));
        }
        self.engine.replica_started();
        self.write_started.insert(id, (Instant::now(), req.len));
        self.forwarded_replies.insert(id, (conn, req.request));
    }

    /// A forwarded write completed: answer the peer.
    pub(super) fn reply_forwarded(&mut self, conn: Arc<PeerConnection>, request: u64, ok: bool) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let status = if ok { 0 } else { libc::EIO as u32 };
            conn.reply(request, status, None).await;
            let _ = tx.send(Input::ReplicaDone);
        });
    }
}

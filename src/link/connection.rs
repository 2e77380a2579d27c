//! One established, authenticated connection to a peer node: a single
//! bidirectional QUIC stream carrying framed messages for every volume the
//! two nodes share. Requests are matched to replies by request id; the
//! number in flight is bounded (backpressure); every frame is checked before
//! anything acts on it, and a bad frame drops the whole connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::LinkError;
use super::wire::{self, Header, Kind, OutFrame, WireError};
use crate::store::AlignedBuf;

/// QUIC application close code for a protocol violation.
pub const CLOSE_PROTOCOL_ERROR: u32 = 1;
/// QUIC application close code when a newer connection replaces this one.
pub const CLOSE_REPLACED: u32 = 2;
/// QUIC application close code for an orderly shutdown.
pub const CLOSE_SHUTDOWN: u32 = 3;

/// A reply to a request.
#[derive(Debug)]
pub struct Reply {
    /// 0 or an errno from the peer.
    pub status: u32,
    /// Data of a ReadReply.
    pub data: Option<AlignedBuf>,
    /// Digest of a HashReply.
    pub digest: Option<Vec<u8>>,
}

/// A request from the peer for one of our volumes.
#[derive(Debug)]
pub struct InboundRequest {
    /// Frame kind (Write, Flush, Zeroes, ReadRequest).
    pub kind: Kind,
    /// FLAG_* bits.
    pub flags: u16,
    /// Request id to reply to.
    pub request: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length for Zeroes/ReadRequest; payload length for Write.
    pub len: u64,
    /// Write payload.
    pub data: Option<AlignedBuf>,
}

/// A control message about one volume.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VolumeStateMsg {
    /// Volume name.
    pub volume: String,
    /// The sender's index for this volume (used in its data frames).
    pub index: u32,
    /// The sender's state; None when it detached the volume.
    pub view: Option<crate::engine::NodeView>,
    /// Sent once when a resync finished: the source's generations.
    pub sync_done: Option<crate::meta::Generations>,
    /// The sender's dirty chunks as `(first, count)` runs, so that a resync
    /// source can copy the union of both bitmaps; absent when too many.
    #[serde(default)]
    pub dirty_runs: Option<Vec<(u64, u64)>>,
}

/// The first message each side sends.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HelloMsg {
    /// Sender's node name.
    pub node: String,
    /// Sender's protocol version.
    pub protocol: u8,
    /// The primary lease the sender grants (its `link.lease_ms`): the
    /// receiver, as the holder, counts its lease with this length, so the
    /// grantor's bound (rule 7) holds whatever the two configs say.
    #[serde(default)]
    pub lease_ms: Option<u64>,
    /// Requests in flight the sender accepts from the receiver (its
    /// `link.inflight_requests_max`): the receiver sends no more.
    #[serde(default)]
    pub inflight_requests_max: Option<u64>,
}

/// Receives what arrives on connections.
pub trait InboundHandler: Send + Sync + 'static {
    /// A connection to `peer` came up (Some) or went down (None).
    fn connection_changed(&self, peer: &str, conn: Option<Arc<PeerConnection>>);
    /// A volume state message arrived.
    fn volume_state(&self, conn: &Arc<PeerConnection>, msg: VolumeStateMsg);
    /// A data request for `volume` arrived; reply with `conn.reply`.
    fn request(&self, conn: &Arc<PeerConnection>, volume: &str, req: InboundRequest);
}

/// An established connection.
pub struct PeerConnection {
    /// Peer node name (authenticated by its certificate).
    pub peer: String,
    /// Unique id of this connection within the process.
    pub id: u64,
    quic: quinn::Connection,
    out: mpsc::Sender<OutFrame>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    next_request: AtomicU64,
    permits: Semaphore,
    inbound_inflight: AtomicUsize,
    inbound_max: usize,
    remote_volumes: Mutex<HashMap<u32, String>>,
    request_timeout: Duration,
    lease: Arc<PeerLease>,
}

/// Lease bookkeeping with one peer node (rule 7), kept across connections.
#[derive(Debug, Default)]
pub struct PeerLease {
    /// This node holds a lease from the peer until this instant (monotonic
    /// ms, `quorum::clock`); 0 = never.
    pub held_until_ms: AtomicU64,
    /// The last time this node granted the peer a lease (answered its
    /// LeasePing); 0 = never since this process started.
    pub granted_ms: AtomicU64,
}

static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

impl PeerConnection {
    /// Wraps an authenticated connection and its stream; spawns the writer.
    /// The caller runs `read_loop` on `recv`.
    /// `inflight_max` bounds the requests this side sends; the peer may
    /// have `inbound_max` of its own in flight here before the link drops.
    pub fn start(
        peer: String,
        quic: quinn::Connection,
        mut send: quinn::SendStream,
        inflight_max: usize,
        inbound_max: usize,
        request_timeout: Duration,
        lease: Arc<PeerLease>,
    ) -> Arc<Self> {
        let (out, mut rx) = mpsc::channel::<OutFrame>(inflight_max.max(16) * 2);
        let conn = Arc::new(PeerConnection {
            peer,
            id: NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed),
            quic: quic.clone(),
            out,
            pending: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            permits: Semaphore::new(inflight_max),
            inbound_inflight: AtomicUsize::new(0),
            inbound_max,
            remote_volumes: Mutex::new(HashMap::new()),
            request_timeout,
            lease,
        });
        tokio::spawn(async move {
            while let Some(f) = rx.recv().await {
                let mut chunks = [f.header, f.payload];
                if let Err(e) = send.write_all_chunks(&mut chunks).await {
                    tracing::debug!("link writer stopped: {e}");
                    break;
                }
            }
            let _ = send.finish();
        });
        conn
    }

    /// Whether the connection is still open.
    pub fn is_open(&self) -> bool {
        self.quic.close_reason().is_none()
    }

    /// Closes the connection with an application code and reason.
    pub fn close(&self, code: u32, reason: &str) {
        self.quic.close(code.into(), reason.as_bytes());
    }

    /// Renews the lease this node holds from the peer: one LeasePing round
    /// trip; the lease counts from the send time.
    pub async fn renew_lease(&self, lease_ms: u64) -> Result<(), LinkError> {
        let sent = crate::quorum::clock::now_ms();
        let reply = self
            .request(Header::new(Kind::LeasePing), Bytes::new())
            .await?;
        if reply.status == 0 {
            self.lease
                .held_until_ms
                .fetch_max(sent.saturating_add(lease_ms), Ordering::AcqRel);
        }
        Ok(())
    }

    /// Round-trip time estimate of the QUIC path.
    pub fn rtt(&self) -> Duration {
        self.quic.rtt()
    }

    fn fail_pending(&self) {
        if let Ok(mut p) = self.pending.lock() {
            p.clear();
        }
    }

    /// Sends a request and waits for its reply.
    pub async fn request(&self, mut h: Header, payload: Bytes) -> Result<Reply, LinkError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| LinkError::Closed)?;
        if !self.is_open() {
            return Err(LinkError::Closed);
        }
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        h.request = id;
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| LinkError::Closed)?
            .insert(id, tx);
        if self.out.send(OutFrame::new(h, payload)).await.is_err() {
            return Err(LinkError::Closed);
        }
        match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(r)) => match reply_mismatch(&h, &r) {
                None => Ok(r),
                Some(what) => {
                    // A peer answering with data of another length is
                    // broken or hostile: nothing of it is used.
                    let e = self.protocol_error(&what);
                    self.fail_pending();
                    Err(e)
                }
            },
            Ok(Err(_)) => Err(LinkError::Closed),
            Err(_) => {
                // A peer that keeps the connection alive but never answers is
                // as good as dead: drop the connection so every waiter learns it.
                self.close(CLOSE_PROTOCOL_ERROR, "request timed out");
                self.fail_pending();
                Err(LinkError::Timeout)
            }
        }
    }

    /// Sends a message that has no reply.
    pub async fn send(&self, h: Header, payload: Bytes) -> Result<(), LinkError> {
        self.out
            .send(OutFrame::new(h, payload))
            .await
            .map_err(|_| LinkError::Closed)
    }

    /// Sends a volume state message.
    pub async fn send_volume_state(&self, msg: &VolumeStateMsg) -> Result<(), LinkError> {
        let json = serde_json::to_vec(msg).map_err(|e| LinkError::Encode(e.to_string()))?;
        self.send(Header::new(Kind::VolumeState), Bytes::from(json))
            .await
    }

    /// Replies to an inbound request.
    pub async fn reply(&self, request: u64, status: u32, data: Option<Bytes>) {
        let kind = if data.is_some() {
            Kind::ReadReply
        } else {
            Kind::Ack
        };
        self.reply_kind(request, status, kind, data).await
    }

    /// Replies to a HashRequest with a digest (or an errno and no digest).
    pub async fn reply_digest(&self, request: u64, status: u32, digest: Option<Vec<u8>>) {
        let kind = if digest.is_some() {
            Kind::HashReply
        } else {
            Kind::Ack
        };
        self.reply_kind(request, status, kind, digest.map(Bytes::from))
            .await
    }

    async fn reply_kind(&self, request: u64, status: u32, kind: Kind, data: Option<Bytes>) {
        let mut h = Header::new(kind);
        h.request = request;
        h.status = status;
        self.inbound_inflight.fetch_sub(1, Ordering::Relaxed);
        let _ = self.send(h, data.unwrap_or_default()).await;
    }

    fn protocol_error(&self, what: &str) -> LinkError {
        tracing::warn!(
            "link to {}: protocol error: {what}; dropping the connection",
            self.peer
        );
        self.close(CLOSE_PROTOCOL_ERROR, what);
        LinkError::Protocol(what.to_string())
    }

    /// Reads and dispatches frames until the connection ends or a frame is bad.
    pub async fn read_loop(
        self: &Arc<Self>,
        mut recv: quinn::RecvStream,
        handler: &Arc<dyn InboundHandler>,
    ) -> LinkError {
        let err = loop {
            match self.read_one(&mut recv, handler).await {
                Ok(()) => continue,
                Err(e) => break e,
            }
        };
        self.fail_pending();
        err
    }

    async fn read_one(
        self: &Arc<Self>,
        recv: &mut quinn::RecvStream,
        handler: &Arc<dyn InboundHandler>,
    ) -> Result<(), LinkError> {
        let h = read_header(recv).await.map_err(|e| match e {
            LinkError::Wire(w) => self.protocol_error(&w.to_string()),
            other => other,
        })?;
        match h.kind {
            Kind::Write | Kind::ReadReply => {
                if h.payload_len as usize % crate::store::aligned::BUF_ALIGN_BYTES != 0 {
                    return Err(self.protocol_error("data payload is not a multiple of 4096 bytes"));
                }
                let mut buf = AlignedBuf::zeroed(h.payload_len as usize);
                recv.read_exact(buf.as_mut_slice())
                    .await
                    .map_err(|_| LinkError::Closed)?;
                h.verify_payload(buf.as_slice())
                    .map_err(|e| self.protocol_error(&e.to_string()))?;
                if h.kind == Kind::ReadReply {
                    self.complete(h, Some(buf), None);
                    return Ok(());
                }
                self.inbound(h, Some(buf), handler)
            }
            Kind::Ack | Kind::LeasePong => {
                self.complete(h, None, None);
                Ok(())
            }
            Kind::LeasePing => {
                // Record the grant before answering: the holder counts from
                // its send time, which is earlier.
                self.lease
                    .granted_ms
                    .store(crate::quorum::clock::now_ms(), Ordering::Release);
                let mut pong = Header::new(Kind::LeasePong);
                pong.request = h.request;
                self.out
                    .send(OutFrame::new(pong, Bytes::new()))
                    .await
                    .map_err(|_| LinkError::Closed)
            }
            Kind::HashReply => {
                let digest = self.read_checked_payload(recv, &h).await?;
                self.complete(h, None, Some(digest));
                Ok(())
            }
            Kind::Flush | Kind::Zeroes | Kind::ReadRequest | Kind::HashRequest => {
                self.inbound(h, None, handler)
            }
            Kind::Hello | Kind::VolumeState => {
                let buf = self.read_checked_payload(recv, &h).await?;
                if h.kind == Kind::Hello {
                    return Err(self.protocol_error("unexpected second hello"));
                }
                let msg: VolumeStateMsg = serde_json::from_slice(&buf)
                    .map_err(|e| self.protocol_error(&format!("bad volume state message: {e}")))?;
                if let Ok(mut m) = self.remote_volumes.lock() {
                    if msg.view.is_some() {
                        m.insert(msg.index, msg.volume.clone());
                    } else {
                        m.remove(&msg.index);
                    }
                }
                handler.volume_state(self, msg);
                Ok(())
            }
        }
    }

    /// Reads a small payload and checks it against the header's CRC.
    async fn read_checked_payload(
        &self,
        recv: &mut quinn::RecvStream,
        h: &Header,
    ) -> Result<Vec<u8>, LinkError> {
        let mut buf = vec![0u8; h.payload_len as usize];
        recv.read_exact(&mut buf)
            .await
            .map_err(|_| LinkError::Closed)?;
        h.verify_payload(&buf)
            .map_err(|e| self.protocol_error(&e.to_string()))?;
        Ok(buf)
    }

    fn complete(&self, h: Header, data: Option<AlignedBuf>, digest: Option<Vec<u8>>) {
        let waiter = self
            .pending
            .lock()
            .ok()
            .and_then(|mut p| p.remove(&h.request));
        if let Some(tx) = waiter {
            let _ = tx.send(Reply {
                status: h.status,
                data,
                digest,
            });
        }
    }

    fn inbound(
        self: &Arc<Self>,
        h: Header,
        data: Option<AlignedBuf>,
        handler: &Arc<dyn InboundHandler>,
    ) -> Result<(), LinkError> {
        let volume = self
            .remote_volumes
            .lock()
            .ok()
            .and_then(|m| m.get(&h.volume).cloned())
            .ok_or_else(|| self.protocol_error("request for a volume the peer never announced"))?;
        if self.inbound_inflight.fetch_add(1, Ordering::Relaxed) >= self.inbound_max {
            return Err(self.protocol_error("peer exceeded the in-flight request limit"));
        }
        let len = match h.kind {
            Kind::Write => u64::from(h.payload_len),
            _ => u64::from(h.op_len),
        };
        let req = InboundRequest {
            kind: h.kind,
            flags: h.flags,
            request: h.request,
            offset: h.offset,
            len,
            data,
        };
        handler.request(self, &volume, req);
        Ok(())
    }
}

/// Reads one header from the stream.
pub async fn read_header(recv: &mut quinn::RecvStream) -> Result<Header, LinkError> {
    let mut hb = [0u8; wire::HEADER_BYTES];
    recv.read_exact(&mut hb)
        .await
        .map_err(|_| LinkError::Closed)?;
    Header::decode(&hb).map_err(LinkError::Wire)
}

/// Reads a whole control frame (Hello) with its payload.
pub async fn read_control(
    recv: &mut quinn::RecvStream,
    expect: Kind,
) -> Result<Vec<u8>, LinkError> {
    let h = read_header(recv).await?;
    if h.kind != expect {
        return Err(LinkError::Protocol(format!(
            "expected {expect:?}, got {:?}",
            h.kind
        )));
    }
    let mut buf = vec![0u8; h.payload_len as usize];
    recv.read_exact(&mut buf)
        .await
        .map_err(|_| LinkError::Closed)?;
    h.verify_payload(&buf)
        .map_err(|e: WireError| LinkError::Wire(e))?;
    Ok(buf)
}

/// What is wrong with `reply` as the answer to request `h`, if anything: a
/// successful read must bring exactly the bytes asked for, a successful
/// digest request one digest, and nothing else may carry data.
fn reply_mismatch(h: &Header, reply: &Reply) -> Option<String> {
    if reply.status != 0 {
        return None;
    }
    let data_len = reply.data.as_ref().map(AlignedBuf::len);
    let digest_len = reply.digest.as_ref().map(Vec::len);
    let ok = match h.kind {
        Kind::ReadRequest => data_len == Some(h.op_len as usize) && digest_len.is_none(),
        Kind::HashRequest => {
            digest_len == Some(crate::link::wire::DIGEST_BYTES as usize) && data_len.is_none()
        }
        _ => data_len.is_none() && digest_len.is_none(),
    };
    (!ok).then(|| {
        format!(
            "the answer to a {:?} of {} bytes carried {} data bytes and {} digest bytes",
            h.kind,
            h.op_len,
            data_len.unwrap_or(0),
            digest_len.unwrap_or(0)
        )
    })
}

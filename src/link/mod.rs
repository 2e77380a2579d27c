//! The replication link: one QUIC endpoint per node and one connection per
//! peer node, carrying every volume the two share. Mutual TLS with the
//! cluster CA; the node with the lexicographically smaller name dials, the
//! other accepts; reconnects with capped exponential backoff; every transport
//! option is set explicitly for a dedicated replication link.

pub mod admission;
pub mod capacity;
pub mod connection;
pub mod tls;
pub mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::cert::validity::Validity;
pub use connection::{
    HelloMsg, InboundHandler, InboundRequest, PeerConnection, PeerLease, Reply, VolumeStateMsg,
};
use wire::{Header, Kind};

/// Link errors.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// No connection, or it closed.
    #[error("peer connection closed")]
    Closed,
    /// The peer did not answer in time; the connection was dropped.
    #[error("peer did not answer in time")]
    Timeout,
    /// A frame failed validation.
    #[error("bad frame from peer: {0}")]
    Wire(#[from] wire::WireError),
    /// The peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A message could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// Endpoint setup failed.
    #[error("cannot set up the replication endpoint on {addr}: {message}")]
    Setup {
        /// Address.
        addr: SocketAddr,
        /// Problem.
        message: String,
    },
}

/// Link tunables (see `config::LinkConfig`).
#[derive(Clone, Debug)]
pub struct LinkSettings {
    /// A silent peer is declared dead after this long.
    pub peer_timeout_ms: u64,
    /// QUIC keepalive interval.
    pub keepalive_interval_ms: u64,
    /// Largest reconnect backoff.
    pub reconnect_backoff_max_ms: u64,
    /// Requests in flight per connection.
    pub inflight_requests_max: usize,
    /// MTU discovery upper bound.
    pub mtu_max_bytes: u16,
    /// Length of the primary lease each node grants its peer (rule 7).
    pub lease_ms: u64,
}

impl From<&crate::config::LinkConfig> for LinkSettings {
    fn from(c: &crate::config::LinkConfig) -> Self {
        LinkSettings {
            peer_timeout_ms: c.peer_timeout_ms,
            keepalive_interval_ms: c.keepalive_interval_ms,
            reconnect_backoff_max_ms: c.reconnect_backoff_max_ms,
            inflight_requests_max: c.inflight_requests_max,
            mtu_max_bytes: c.mtu_max_bytes,
            lease_ms: c.lease_ms,
        }
    }
}

/// Ack-eliciting packets received before an ACK must go out on its own.
const ACK_ELICITING_THRESHOLD: u32 = 8;
/// Longest the receiver may hold back an ACK.
const MAX_ACK_DELAY_MS: u64 = 1;

/// QUIC transport settings for a dedicated replication link.
pub fn transport_config(s: &LinkSettings) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    let idle = Duration::from_millis(s.peer_timeout_ms);
    if let Ok(idle) = quinn::IdleTimeout::try_from(idle) {
        t.max_idle_timeout(Some(idle));
    }
    t.keep_alive_interval(Some(Duration::from_millis(s.keepalive_interval_ms)));
    // Windows sized for a fast LAN with ~1 ms RTT and 1 MiB writes in flight.
    t.stream_receive_window(quinn::VarInt::from_u32(64 << 20));
    t.receive_window(quinn::VarInt::from_u32(128 << 20));
    t.send_window(128 << 20);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(2));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t.datagram_receive_buffer_size(None);
    t.initial_mtu(1200);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(s.mtu_max_bytes);
    t.mtu_discovery_config(Some(mtu));
    t.initial_rtt(Duration::from_millis(1));
    // Acknowledge every ninth packet or after 1 ms instead of every second
    // one: a request and its reply carry each other's ACKs, so a replicated
    // write costs one datagram each way instead of two from the secondary
    // (measured: 1.8 -> 0.9 sendmsg per write on the secondary, 3.6 -> 1.9
    // recvmmsg on the primary). Gaps still trigger an immediate ACK.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(quinn::VarInt::from_u32(ACK_ELICITING_THRESHOLD))
        .max_ack_delay(Some(Duration::from_millis(MAX_ACK_DELAY_MS)));
    t.ack_frequency_config(Some(ack));
    t
}

struct PeerSlot {
    address: SocketAddr,
    current: Mutex<Option<Arc<PeerConnection>>>,
    lease: Arc<PeerLease>,
    /// Why the last attempt to connect with this peer failed; cleared
    /// when a connection comes up.
    problem: Mutex<Option<ConnectionProblem>>,
    /// The certificate the peer presented on the last connection that came
    /// up (`None` until one did).
    certificate: Arc<Mutex<Option<Validity>>>,
}

/// Why the link to a peer is not up, for `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionProblem {
    /// What went wrong and what to check.
    pub message: String,
    /// When (seconds since the Unix epoch).
    pub at_unix_s: u64,
}

impl ConnectionProblem {
    fn now(message: String) -> Self {
        let at_unix_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        ConnectionProblem { message, at_unix_s }
    }
}

/// A dial error in words that say which side to fix.
fn explain_dial_error(me: &str, peer: &str, addr: SocketAddr, e: &LinkError) -> String {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    if let Some(expired) = explain_expired_certificate(me, Some(peer), &lower) {
        format!("{expired} ({text})")
    } else if lower.contains("invalid peer certificate") {
        format!(
            "{peer}'s certificate is not accepted here ({text}): it must be issued for the name {peer:?} by the CA in this node's [tls] ca"
        )
    } else if lower.contains("alert") || lower.contains("handshake failed") {
        format!(
            "{peer} refused the TLS handshake ({text}): most often {peer} does not accept this node's certificate; this node's [tls] cert must be issued by the cluster CA {peer} trusts, for this node's name"
        )
    } else if lower.contains("timed out") || matches!(e, LinkError::Timeout) {
        format!(
            "no answer from {peer} at {addr} ({text}): check [nodes.{peer}] address in this node's config, that {peer}'s daemon runs, and firewalls (UDP)"
        )
    } else {
        format!("connecting to {peer} at {addr}: {text}")
    }
}

/// TLS alert `certificate_expired` (RFC 8446, 6.2), as QUIC reports it.
const ALERT_CERTIFICATE_EXPIRED: &str = "handshake failed: error 45";

/// A handshake error (lowercased) that says a certificate expired, in
/// words that say whose and how to renew it. `peer` is `None` on the
/// accepting side, before the certificate named the node.
fn explain_expired_certificate(me: &str, peer: Option<&str>, lower: &str) -> Option<String> {
    use crate::cert::validity::CertificateKind;
    if !lower.contains("certificate expired") && !lower.contains(ALERT_CERTIFICATE_EXPIRED) {
        return None;
    }
    // quinn: "aborted by peer: ..." when the other side closed, with its
    // reason (rustls's words for *our* certificate) after it.
    if lower.contains("by peer:") {
        Some(format!(
            "{} refused this node's certificate as expired (see `blkrep status`): {}",
            peer.unwrap_or("the peer"),
            CertificateKind::Own.renewal(me)
        ))
    } else {
        Some(format!(
            "{}'s certificate has expired, so this node refuses it: {}",
            peer.unwrap_or("the connecting node"),
            CertificateKind::Peer.renewal(peer.unwrap_or("NODE"))
        ))
    }
}

/// The node's replication endpoint and its peer connections.
pub struct Link {
    me: String,
    endpoint: quinn::Endpoint,
    peers: HashMap<String, PeerSlot>,
    handler: Arc<dyn InboundHandler>,
    settings: LinkSettings,
    client: quinn::ClientConfig,
    closed: std::sync::atomic::AtomicBool,
}

impl Link {
    /// Binds the endpoint on `bind` and starts dialing/accepting `peers`.
    pub fn start(
        me: &str,
        bind: SocketAddr,
        peers: &[(String, SocketAddr)],
        tls: &tls::TlsMaterial,
        settings: LinkSettings,
        handler: Arc<dyn InboundHandler>,
    ) -> Result<Arc<Self>, LinkError> {
        let setup = |message: String| LinkError::Setup {
            addr: bind,
            message,
        };
        let transport = Arc::new(transport_config(&settings));
        let server_crypto = tls
            .quic_server(tls::ALPN)
            .map_err(|e| setup(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport.clone());
        admission::bound_incoming(&mut server);
        let client_crypto = tls
            .quic_client(tls::ALPN)
            .map_err(|e| setup(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport);
        let endpoint = quinn::Endpoint::server(server, bind).map_err(|e| setup(e.to_string()))?;
        let link = Arc::new(Link {
            me: me.to_string(),
            endpoint,
            peers: peers
                .iter()
                .filter(|(n, _)| n != me)
                .map(|(n, a)| {
                    (
                        n.clone(),
                        PeerSlot {
                            address: *a,
                            current: Mutex::new(None),
                            lease: Arc::new(PeerLease::default()),
                            problem: Mutex::new(None),
                            certificate: Arc::new(Mutex::new(None)),
                        },
                    )
                })
                .collect(),
            handler,
            settings,
            client,
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        tokio::spawn(link.clone().accept_loop());
        for name in link.peers.keys() {
            if link.me.as_str() < name.as_str() {
                tokio::spawn(link.clone().dial_loop(name.clone()));
            }
        }
        Ok(link)
    }

    /// The address the endpoint is bound to (the port, when bound to 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The current connection to `peer`, if up.
    pub fn connection(&self, peer: &str) -> Option<Arc<PeerConnection>> {
        let slot = self.peers.get(peer)?;
        let c = slot.current.lock().ok()?.clone()?;
        c.is_open().then_some(c)
    }

    /// When the certificate `peer` presented on its last connection
    /// expires (`None` until a connection came up).
    pub fn peer_certificate(&self, peer: &str) -> Option<Validity> {
        self.peers.get(peer)?.certificate.lock().ok()?.clone()
    }

    /// Why the link to `peer` is not up, when it is not: the last failure,
    /// or, on the side that waits to be dialed, that nothing arrived.
    pub fn connection_problem(&self, peer: &str) -> Option<ConnectionProblem> {
        let slot = self.peers.get(peer)?;
        if self.connection(peer).is_some() {
            return None;
        }
        if let Some(p) = slot.problem.lock().ok().and_then(|p| p.clone()) {
            return Some(p);
        }
        (peer < self.me.as_str()).then(|| {
            let here = self
                .endpoint
                .local_addr()
                .map_or_else(|_| "its replication address".to_string(), |a| a.to_string());
            ConnectionProblem::now(format!(
                "no connection from {peer} yet: {peer} dials this node at {here}; check [nodes.{}] address in {peer}'s config and that its daemon runs",
                self.me
            ))
        })
    }

    fn note_problem(&self, peer: &str, message: String) {
        if let Some(slot) = self.peers.get(peer)
            && let Ok(mut p) = slot.problem.lock()
        {
            *p = Some(ConnectionProblem::now(message));
        }
    }

    /// The lease bookkeeping with `peer` (rule 7).
    pub fn peer_lease(&self, peer: &str) -> Option<Arc<PeerLease>> {
        self.peers.get(peer).map(|s| s.lease.clone())
    }

    /// Closes every connection and the endpoint.
    pub fn shutdown(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.endpoint
            .close(connection::CLOSE_SHUTDOWN.into(), b"shutdown");
    }

    fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.settings.peer_timeout_ms * 4)
    }

    async fn dial_loop(self: Arc<Self>, peer: String) {
        let min_backoff = Duration::from_millis(50);
        let max_backoff = Duration::from_millis(self.settings.reconnect_backoff_max_ms);
        let mut backoff = min_backoff;
        let Some(addr) = self.peers.get(&peer).map(|s| s.address) else {
            return;
        };
        let mut failures = 0u64;
        loop {
            match self.dial(&peer, addr).await {
                Ok((quic, send, recv, terms)) => {
                    backoff = min_backoff;
                    failures = 0;
                    self.run(peer.clone(), quic, send, recv, terms).await;
                }
                Err(e) => {
                    let why = explain_dial_error(&self.me, &peer, addr, &e);
                    // Say it once per outage, then keep trying quietly.
                    if failures == 0 {
                        tracing::warn!("{why}; retrying");
                    } else {
                        tracing::debug!("{why}");
                    }
                    self.note_problem(&peer, why);
                    failures += 1;
                }
            }
            if self.closed.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(max_backoff);
        }
    }

    async fn dial(
        &self,
        peer: &str,
        addr: SocketAddr,
    ) -> Result<
        (
            quinn::Connection,
            quinn::SendStream,
            quinn::RecvStream,
            PeerTerms,
        ),
        LinkError,
    > {
        let connecting = self
            .endpoint
            .connect_with(self.client.clone(), addr, peer)
            .map_err(|e| LinkError::Protocol(e.to_string()))?;
        let quic = connecting
            .await
            .map_err(|e| LinkError::Protocol(e.to_string()))?;
        let (mut send, mut recv) = quic
            .open_bi()
            .await
            .map_err(|e| LinkError::Protocol(e.to_string()))?;
        send_hello(&mut send, &self.me, &self.settings).await?;
        let terms = expect_hello(&quic, &mut recv, peer).await?;
        Ok((quic, send, recv, terms))
    }

    async fn accept_loop(self: Arc<Self>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let Some(incoming) = admission::validated(incoming) else {
                continue;
            };
            let link = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                if let Err(e) = link.accept_one(incoming).await {
                    let text = e.to_string();
                    let lower = text.to_ascii_lowercase();
                    let why = match explain_expired_certificate(&link.me, None, &lower) {
                        Some(expired) => format!("{expired} ({text})"),
                        None => text,
                    };
                    let why = format!("refused a replication connection from {remote}: {why}");
                    admission::log_refused(&why);
                    // (The peer may not be known from a refused handshake:
                    // every peer that dials this node hears of it.)
                    let dialers: Vec<String> = link
                        .peers
                        .keys()
                        .filter(|n| n.as_str() < link.me.as_str())
                        .cloned()
                        .collect();
                    for peer in dialers {
                        link.note_problem(&peer, why.clone());
                    }
                }
            });
        }
    }

    async fn accept_one(self: &Arc<Self>, incoming: quinn::Incoming) -> Result<(), LinkError> {
        let quic = incoming
            .await
            .map_err(|e| LinkError::Protocol(e.to_string()))?;
        let candidates: Vec<&str> = self
            .peers
            .keys()
            .map(String::as_str)
            .filter(|n| *n < self.me.as_str())
            .collect();
        let Some(peer) = tls::identify_peer(&quic, &candidates).map(str::to_string) else {
            quic.close(connection::CLOSE_PROTOCOL_ERROR.into(), b"unknown node");
            return Err(LinkError::Protocol(
                "certificate names no node that should connect to this one".into(),
            ));
        };
        let (mut send, mut recv) = tokio::time::timeout(self.request_timeout(), quic.accept_bi())
            .await
            .map_err(|_| LinkError::Timeout)?
            .map_err(|e| LinkError::Protocol(e.to_string()))?;
        let terms = expect_hello(&quic, &mut recv, &peer).await?;
        send_hello(&mut send, &self.me, &self.settings).await?;
        self.run(peer, quic, send, recv, terms).await;
        Ok(())
    }

    async fn run(
        &self,
        peer: String,
        quic: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        terms: PeerTerms,
    ) {
        let Some(slot) = self.peers.get(&peer) else {
            return;
        };
        if let Ok(mut p) = slot.problem.lock() {
            *p = None;
        }
        if terms.lease_ms != self.settings.lease_ms {
            tracing::info!(
                "link to {peer}: it grants leases of {} ms, this node {} ms; each side counts the lease it holds with the length its grantor stated",
                terms.lease_ms,
                self.settings.lease_ms
            );
        }
        let own = self.settings.inflight_requests_max;
        let presented = quic.clone();
        let conn = PeerConnection::start(
            peer.clone(),
            quic,
            send,
            own.min(terms.inflight_requests_max),
            own.saturating_mul(2),
            self.request_timeout(),
            slot.lease.clone(),
        );
        tokio::spawn(renew_peer_lease(conn.clone(), terms.lease_ms));
        let old = slot
            .current
            .lock()
            .ok()
            .and_then(|mut c| c.replace(conn.clone()));
        if let Some(old) = old {
            old.close(connection::CLOSE_REPLACED, "replaced by a newer connection");
        }
        tracing::info!("replication link to {peer} is up (connection {})", conn.id);
        self.handler.connection_changed(&peer, Some(conn.clone()));
        // For status and the expiry warning, off the link's path: parsing
        // it here would delay the read loop.
        let seen = slot.certificate.clone();
        tokio::task::spawn_blocking(move || {
            crate::cert::watch::note_presented(
                crate::cert::validity::CertificateKind::Peer,
                &seen,
                tls::peer_validity(&presented),
            )
        });
        let err = conn.read_loop(recv, &self.handler).await;
        tracing::info!("replication link to {peer} is down: {err}");
        let was_current = slot
            .current
            .lock()
            .ok()
            .map(|mut c| {
                let same = c.as_ref().is_some_and(|x| x.id == conn.id);
                if same {
                    *c = None;
                }
                same
            })
            .unwrap_or(false);
        conn.close(connection::CLOSE_SHUTDOWN, "reader stopped");
        if was_current {
            self.handler.connection_changed(&peer, None);
        }
    }
}

/// Keeps renewing the lease this node holds from the peer while the
/// connection is open (every quarter lease, so one lost round trip does not
/// lapse it).
async fn renew_peer_lease(conn: Arc<PeerConnection>, lease_ms: u64) {
    let every = crate::quorum::LeaseSettings {
        lease_ms,
        ..Default::default()
    }
    .renew_interval_ms();
    while conn.is_open() {
        let _ =
            tokio::time::timeout(Duration::from_millis(lease_ms), conn.renew_lease(lease_ms)).await;
        tokio::time::sleep(Duration::from_millis(every)).await;
    }
}

/// What the peer's hello binds this side to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerTerms {
    /// The lease the peer grants: this side counts the lease it holds
    /// from the peer with this length.
    pub lease_ms: u64,
    /// Requests the peer accepts in flight from this side.
    pub inflight_requests_max: usize,
}

/// Lease lengths a peer may state (the config's range).
const PEER_LEASE_MS: std::ops::RangeInclusive<u64> = 200..=600_000;
/// In-flight limits a peer may state (the config's range).
const PEER_INFLIGHT: std::ops::RangeInclusive<u64> = 1..=65_536;

impl PeerTerms {
    /// The terms a hello states, or why the link cannot be made safe with
    /// that peer (an older blkrep states no lease: its lease would be
    /// counted with its own length, which this node cannot bound).
    pub fn of(hello: &HelloMsg) -> Result<Self, String> {
        let lease_ms = stated(hello, "a lease length (ms)", hello.lease_ms, PEER_LEASE_MS)?;
        let inflight = stated(
            hello,
            "an in-flight limit",
            hello.inflight_requests_max,
            PEER_INFLIGHT,
        )?;
        Ok(PeerTerms {
            lease_ms,
            inflight_requests_max: usize::try_from(inflight).unwrap_or(usize::MAX),
        })
    }
}

/// A setting a hello must state, within `range`.
fn stated(
    hello: &HelloMsg,
    what: &str,
    value: Option<u64>,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, String> {
    let node = &hello.node;
    match value {
        None => Err(format!(
            "{node} states no {what} (an older blkrep?): upgrade both nodes to the same version"
        )),
        Some(v) if !range.contains(&v) => {
            Err(format!("{node} states {what} of {v}, outside {range:?}"))
        }
        Some(v) => Ok(v),
    }
}

async fn send_hello(
    send: &mut quinn::SendStream,
    me: &str,
    settings: &LinkSettings,
) -> Result<(), LinkError> {
    let msg = HelloMsg {
        node: me.to_string(),
        protocol: wire::PROTOCOL_VERSION,
        lease_ms: Some(settings.lease_ms),
        inflight_requests_max: Some(settings.inflight_requests_max as u64),
    };
    let json = serde_json::to_vec(&msg).map_err(|e| LinkError::Encode(e.to_string()))?;
    let h = Header::new(Kind::Hello).encode(&json);
    send.write_all(&h).await.map_err(|_| LinkError::Closed)?;
    send.write_all(&json).await.map_err(|_| LinkError::Closed)?;
    Ok(())
}

/// Reads the peer's hello and checks it names the node its certificate names.
async fn expect_hello(
    quic: &quinn::Connection,
    recv: &mut quinn::RecvStream,
    peer: &str,
) -> Result<PeerTerms, LinkError> {
    let hello = read_hello(recv).await?;
    if hello.node != peer {
        quic.close(
            connection::CLOSE_PROTOCOL_ERROR.into(),
            b"hello names another node",
        );
        return Err(LinkError::Protocol(format!(
            "certificate is for {peer:?} but hello says {:?}",
            hello.node
        )));
    }
    PeerTerms::of(&hello).map_err(|why| {
        quic.close(
            connection::CLOSE_PROTOCOL_ERROR.into(),
            b"unsafe link settings",
        );
        LinkError::Protocol(format!("refusing the link: {why}"))
    })
}

async fn read_hello(recv: &mut quinn::RecvStream) -> Result<HelloMsg, LinkError> {
    let buf = connection::read_control(recv, Kind::Hello).await?;
    serde_json::from_slice(&buf).map_err(|e| LinkError::Protocol(format!("bad hello: {e}")))
}

/// Builds a data request header.
pub fn data_header(kind: Kind, volume: u32, offset: u64, op_len: u32, flags: u16) -> Header {
    let mut h = Header::new(kind);
    h.volume = volume;
    h.offset = offset;
    h.op_len = op_len;
    h.flags = flags;
    h
}

/// Wraps an aligned buffer as `Bytes` without copying.
pub fn bytes_of(buf: Arc<crate::store::AlignedBuf>) -> Bytes {
    Bytes::from_owner(ArcBuf(buf))
}

struct ArcBuf(Arc<crate::store::AlignedBuf>);
impl AsRef<[u8]> for ArcBuf {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(lease_ms: Option<u64>, inflight: Option<u64>) -> HelloMsg {
        HelloMsg {
            node: "beta".into(),
            protocol: wire::PROTOCOL_VERSION,
            lease_ms,
            inflight_requests_max: inflight,
        }
    }

    /// A hello that states no lease or no in-flight limit (an older
    /// blkrep), or values outside the config's ranges, is refused.
    #[test]
    fn a_hello_must_state_the_terms_the_peer_can_honour() {
        assert_eq!(
            PeerTerms::of(&hello(Some(2000), Some(8))),
            Ok(PeerTerms {
                lease_ms: 2000,
                inflight_requests_max: 8
            })
        );
        for bad in [
            hello(None, Some(8)),
            hello(Some(2000), None),
            hello(Some(0), Some(8)),
            hello(Some(600_001), Some(8)),
            hello(Some(2000), Some(0)),
            hello(Some(2000), Some(1 << 20)),
        ] {
            assert!(PeerTerms::of(&bad).is_err(), "{bad:?}");
        }
        let old: HelloMsg = serde_json::from_str(r#"{"node":"beta","protocol":1}"#).unwrap();
        assert!(PeerTerms::of(&old).unwrap_err().contains("upgrade"));
    }
}

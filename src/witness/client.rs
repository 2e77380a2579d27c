//! A data node's session with the witness: one QUIC connection (re-dialed
//! on demand), one stream per request, every request bounded by a timeout.
//! The daemon drives heartbeats through it; volumes ask for changes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::protocol::{
    self, ChangeOutcome, Claim, VolumeAnswer, WitnessOp, WitnessRequest, WitnessResponse,
};
use super::{WitnessError, read_frame, transport_config};
use crate::link::tls::TlsMaterial;

/// The answer to a heartbeat.
#[derive(Debug)]
pub struct HeartbeatReply {
    /// When the heartbeat was sent (monotonic ms): leases count from here.
    pub sent_ms: u64,
    /// Lease length granted.
    pub lease_ms: u64,
    /// One per claim.
    pub volumes: Vec<VolumeAnswer>,
}

/// The session.
pub struct WitnessClient {
    name: String,
    addr: SocketAddr,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    conn: tokio::sync::Mutex<Option<quinn::Connection>>,
    timeout: Duration,
    reachable: AtomicBool,
    lease_ms: AtomicU64,
    /// The certificate the witness presented on the last connection
    /// (`None` until one came up).
    certificate: std::sync::Mutex<Option<crate::cert::validity::Validity>>,
}

impl WitnessClient {
    /// A session with witness `name` at `addr`.
    pub fn new(
        name: &str,
        addr: SocketAddr,
        tls: &TlsMaterial,
        request_timeout_ms: u64,
    ) -> Result<Arc<Self>, WitnessError> {
        let setup = |message: String| WitnessError::Setup { addr, message };
        let crypto = tls.quic_client(protocol::ALPN)?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(Arc::new(transport_config(request_timeout_ms.max(500) * 2)));
        let bind: SocketAddr = if addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = quinn::Endpoint::client(bind).map_err(|e| setup(e.to_string()))?;
        Ok(Arc::new(WitnessClient {
            name: name.to_string(),
            addr,
            endpoint,
            client,
            conn: tokio::sync::Mutex::new(None),
            timeout: Duration::from_millis(request_timeout_ms),
            reachable: AtomicBool::new(false),
            lease_ms: AtomicU64::new(0),
            certificate: std::sync::Mutex::new(None),
        }))
    }

    /// The witness's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// When the certificate the witness presented expires (`None` until a
    /// connection came up).
    pub fn certificate(&self) -> Option<crate::cert::validity::Validity> {
        self.certificate.lock().ok()?.clone()
    }

    /// The lease length the witness grants (known after a heartbeat).
    pub fn lease_ms(&self) -> Option<u64> {
        match self.lease_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(ms),
        }
    }

    /// Whether the last request got an answer.
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    async fn connection(&self) -> Result<quinn::Connection, WitnessError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref()
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let connecting = self
            .endpoint
            .connect_with(self.client.clone(), self.addr, &self.name)
            .map_err(|e| WitnessError::Unreachable(e.to_string()))?;
        let c = connecting
            .await
            .map_err(|e| WitnessError::Unreachable(e.to_string()))?;
        crate::cert::watch::note_presented(
            crate::cert::validity::CertificateKind::Witness,
            &self.certificate,
            crate::link::tls::peer_validity(&c),
        );
        *guard = Some(c.clone());
        Ok(c)
    }

    async fn call_inner(&self, req: &WitnessRequest) -> Result<WitnessResponse, WitnessError> {
        let frame = protocol::encode(req)?;
        let conn = self.connection().await?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| WitnessError::Unreachable(e.to_string()))?;
        send.write_all(&frame)
            .await
            .map_err(|e| WitnessError::Unreachable(e.to_string()))?;
        let _ = send.finish();
        let answer = read_frame(&mut recv).await?;
        Ok(protocol::decode(&answer)?)
    }

    /// Sends one request and waits (bounded) for its answer.
    pub async fn call(&self, req: &WitnessRequest) -> Result<WitnessResponse, WitnessError> {
        let res = match tokio::time::timeout(self.timeout, self.call_inner(req)).await {
            Ok(r) => r,
            Err(_) => {
                // A silent path: start from a fresh connection next time.
                if let Some(c) = self.conn.lock().await.take() {
                    c.close(0u32.into(), b"timeout");
                }
                Err(WitnessError::Unreachable(format!(
                    "no answer from {} within {} ms",
                    self.addr,
                    self.timeout.as_millis()
                )))
            }
        };
        let ok = res.is_ok();
        if ok != self.reachable.swap(ok, Ordering::Relaxed) {
            match &res {
                Ok(_) => tracing::info!("witness {} at {} reachable", self.name, self.addr),
                Err(e) => tracing::warn!("witness {} at {}: {e}", self.name, self.addr),
            }
        }
        res
    }

    /// Renews this node's leases and learns its volumes' records.
    pub async fn heartbeat(&self, claims: Vec<Claim>) -> Result<HeartbeatReply, WitnessError> {
        let sent_ms = crate::quorum::clock::now_ms();
        match self.call(&WitnessRequest::Heartbeat { claims }).await? {
            WitnessResponse::Heartbeat { lease_ms, volumes } => {
                self.lease_ms.store(lease_ms, Ordering::Relaxed);
                Ok(HeartbeatReply {
                    sent_ms,
                    lease_ms,
                    volumes,
                })
            }
            WitnessResponse::Error(e) => Err(WitnessError::Protocol(e)),
            other => Err(WitnessError::Protocol(format!(
                "unexpected answer to a heartbeat: {other:?}"
            ))),
        }
    }

    /// Asks for a change of `volume`'s record.
    pub async fn change(
        &self,
        volume: &str,
        peer: &str,
        expected_epoch: u64,
        op: WitnessOp,
    ) -> Result<ChangeOutcome, WitnessError> {
        let req = WitnessRequest::Change {
            volume: volume.to_string(),
            peer: peer.to_string(),
            expected_epoch,
            op,
        };
        match self.call(&req).await? {
            WitnessResponse::Change(o) => Ok(o),
            WitnessResponse::Error(e) => Err(WitnessError::Protocol(e)),
            other => Err(WitnessError::Protocol(format!(
                "unexpected answer to a change: {other:?}"
            ))),
        }
    }
}

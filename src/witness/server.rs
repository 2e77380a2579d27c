//! The witness service: a QUIC endpoint whose clients are the data nodes
//! listed in its config (mutual TLS, cluster CA). Each request travels on its
//! own stream; the arbiter decides, changed records are fsynced, and only
//! then is the answer sent.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::arbiter::Arbiter;
use super::protocol::{self, WitnessRequest, WitnessResponse};
use super::store::RecordStore;
use super::{WitnessError, read_frame, transport_config};
use crate::config::WitnessConfig;
use crate::link::tls::{TlsMaterial, identify_peer};
use crate::quorum::{LeaseSettings, clock};

/// A running witness.
pub struct WitnessServer {
    endpoint: quinn::Endpoint,
    state: Arc<State>,
}

struct State {
    arbiter: Mutex<Arbiter>,
    store: RecordStore,
    nodes: Vec<String>,
}

impl WitnessServer {
    /// Loads the records and starts serving.
    pub fn start(cfg: &WitnessConfig) -> Result<Self, WitnessError> {
        clock::start();
        let store = RecordStore::open(&cfg.state_dir)?;
        let records = store.load()?;
        tracing::info!(
            "witness {} serving {} record(s) from {} for nodes {:?}",
            cfg.node,
            records.len(),
            cfg.state_dir.display(),
            cfg.nodes
        );
        let settings = LeaseSettings {
            lease_ms: cfg.lease_ms,
            ..Default::default()
        };
        let arbiter = Arbiter::new(settings, &cfg.nodes, clock::now_ms(), records);
        let tls = TlsMaterial::load(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)?;
        tokio::spawn(crate::cert::watch::watch(crate::cert::watch::loaded(
            &cfg.tls.ca,
            &cfg.tls.cert,
        )));
        let setup = |message: String| WitnessError::Setup {
            addr: cfg.listen,
            message,
        };
        let crypto = tls
            .quic_server(protocol::ALPN)
            .map_err(|e| setup(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::new(transport_config(cfg.lease_ms)));
        crate::link::admission::bound_incoming(&mut server);
        let endpoint =
            quinn::Endpoint::server(server, cfg.listen).map_err(|e| setup(e.to_string()))?;
        let state = Arc::new(State {
            arbiter: Mutex::new(arbiter),
            store,
            nodes: cfg.nodes.clone(),
        });
        tokio::spawn(accept_loop(endpoint.clone(), state.clone()));
        Ok(WitnessServer { endpoint, state })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// Number of records held.
    pub fn record_count(&self) -> usize {
        self.state
            .arbiter
            .lock()
            .map(|a| a.records().len())
            .unwrap_or(0)
    }

    /// Stops serving.
    pub fn shutdown(&self) {
        self.endpoint.close(0u32.into(), b"shutdown");
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, state: Arc<State>) {
    while let Some(incoming) = endpoint.accept().await {
        let Some(incoming) = crate::link::admission::validated(incoming) else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let quic = match incoming.await {
                Ok(q) => q,
                Err(e) => {
                    crate::link::admission::log_refused(&format!(
                        "witness: refused connection from {remote}: {e}"
                    ));
                    return;
                }
            };
            let candidates: Vec<&str> = state.nodes.iter().map(String::as_str).collect();
            let Some(node) = identify_peer(&quic, &candidates).map(str::to_string) else {
                crate::link::admission::log_refused(&format!(
                    "witness: refused {remote}: its certificate names none of the nodes {:?}",
                    state.nodes
                ));
                quic.close(1u32.into(), b"unknown node");
                return;
            };
            tracing::info!("witness: node {node} connected from {remote}");
            while let Ok((send, recv)) = quic.accept_bi().await {
                tokio::spawn(serve_stream(state.clone(), node.clone(), send, recv));
            }
            tracing::info!("witness: node {node} disconnected");
        });
    }
}

async fn serve_stream(
    state: Arc<State>,
    node: String,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let frame = match tokio::time::timeout(Duration::from_secs(10), read_frame(&mut recv)).await {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => {
            tracing::warn!("witness: bad request from {node}: {e}");
            respond(&mut send, &WitnessResponse::Error(e.to_string())).await;
            return;
        }
        Err(_) => return,
    };
    let response = match protocol::decode::<WitnessRequest>(&frame) {
        Ok(req) => {
            let st = state.clone();
            let n = node.clone();
            match tokio::task::spawn_blocking(move || st.handle(&n, req)).await {
                Ok(r) => r,
                Err(e) => WitnessResponse::Error(format!("internal error: {e}")),
            }
        }
        Err(e) => {
            tracing::warn!("witness: bad request from {node}: {e}");
            WitnessResponse::Error(e.to_string())
        }
    };
    respond(&mut send, &response).await;
}

async fn respond(send: &mut quinn::SendStream, response: &WitnessResponse) {
    let bytes = match protocol::encode(response) {
        Ok(bytes) => bytes,
        Err(e) => {
            // Not silence: the node would wait out its timeout and lose
            // every lease of the request without knowing why.
            tracing::error!("witness: cannot send an answer: {e}");
            let refusal =
                WitnessResponse::Error(format!("the witness cannot send its answer: {e}"));
            protocol::encode(&refusal).unwrap_or_default()
        }
    };
    let _ = send.write_all(&bytes).await;
    let _ = send.finish();
}

impl State {
    /// Decides, persists what changed, and only then answers. A record
    /// that cannot be persisted is reverted and the request fails.
    fn handle(&self, node: &str, req: WitnessRequest) -> WitnessResponse {
        let Ok(mut arbiter) = self.arbiter.lock() else {
            return WitnessResponse::Error("witness state is poisoned".into());
        };
        let (response, changed) = arbiter.handle(node, clock::now_ms(), req);
        for (key, record) in &changed {
            if let Err(e) = self.store.save(key, record) {
                tracing::error!("witness: {e}; refusing to answer");
                // Back to what the disk holds (or unknown: then nothing is
                // decided for it until both nodes teach it again).
                arbiter.replace(key, self.store.load_one(key).ok().flatten());
                return WitnessResponse::Error(format!("witness cannot persist its state: {e}"));
            }
        }
        response
    }
}

//! What the replication link itself can carry: a bulk transfer and small
//! round trips over QUIC with the link's own transport settings and mutual
//! TLS, between two endpoints on loopback (the physical floor that
//! `blkrep bench` prints next to the replicated figures).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::tls::TlsMaterial;
use super::{LinkError, LinkSettings, transport_config};

/// ALPN of the capacity probe (never accepted by a node's link).
const PROBE_ALPN: &[u8] = b"blkrep-probe/1";
/// Round trips measured for the RTT.
const PING_COUNT: usize = 200;
/// Bytes per write of the bulk transfer.
const CHUNK_BYTES: usize = 1 << 20;

/// The measured link.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct LinkCapacity {
    /// Bulk transfer rate, one connection.
    pub capacity_bytes_per_s: u64,
    /// Median round trip of an 8-byte message and its echo.
    pub rtt_us: u64,
}

/// Transfers `bulk_bytes` from a client endpoint on `client_ip` to a
/// server endpoint on `server_ip` (both on this machine), then measures
/// small round trips. `server` presents the certificate of `server_name`.
pub async fn measure(
    client: &TlsMaterial,
    server: &TlsMaterial,
    server_name: &str,
    addrs: (SocketAddr, SocketAddr),
    settings: &LinkSettings,
    bulk_bytes: u64,
) -> Result<LinkCapacity, LinkError> {
    let (client_bind, server_bind) = addrs;
    let setup = |addr, e: String| LinkError::Setup { addr, message: e };
    let transport = Arc::new(transport_config(settings));
    let crypto = server
        .quic_server(PROBE_ALPN)
        .map_err(|e| setup(server_bind, e.to_string()))?;
    let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server_cfg.transport_config(transport.clone());
    let listener = quinn::Endpoint::server(server_cfg, server_bind)
        .map_err(|e| setup(server_bind, e.to_string()))?;
    let listen = listener
        .local_addr()
        .map_err(|e| setup(server_bind, e.to_string()))?;
    let crypto = client
        .quic_client(PROBE_ALPN)
        .map_err(|e| setup(client_bind, e.to_string()))?;
    let mut client_cfg = quinn::ClientConfig::new(Arc::new(crypto));
    client_cfg.transport_config(transport);
    let mut dialer =
        quinn::Endpoint::client(client_bind).map_err(|e| setup(client_bind, e.to_string()))?;
    dialer.set_default_client_config(client_cfg);

    let serve = tokio::spawn(async move {
        let conn = listener.accept().await?.await.ok()?;
        let (mut send, mut recv) = conn.accept_bi().await.ok()?;
        // Bulk: count until the sender finishes, then answer one byte.
        let mut got = 0u64;
        while let Some(chunk) = recv.read_chunk(CHUNK_BYTES, true).await.ok()? {
            got += chunk.bytes.len() as u64;
        }
        send.write_all(&got.to_le_bytes()).await.ok()?;
        send.finish().ok()?;
        // Pings: echo 8 bytes at a time.
        let (mut send, mut recv) = conn.accept_bi().await.ok()?;
        let mut b = [0u8; 8];
        while recv.read_exact(&mut b).await.is_ok() {
            send.write_all(&b).await.ok()?;
        }
        conn.closed().await;
        Some(())
    });

    let proto = |e: String| LinkError::Protocol(format!("capacity probe: {e}"));
    let conn = dialer
        .connect(listen, server_name)
        .map_err(|e| proto(e.to_string()))?
        .await
        .map_err(|e| proto(e.to_string()))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| proto(e.to_string()))?;
    let chunk = Bytes::from(vec![0x5au8; CHUNK_BYTES]);
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < bulk_bytes {
        send.write_chunk(chunk.clone())
            .await
            .map_err(|e| proto(e.to_string()))?;
        sent += CHUNK_BYTES as u64;
    }
    send.finish().map_err(|e| proto(e.to_string()))?;
    let mut got = [0u8; 8];
    recv.read_exact(&mut got)
        .await
        .map_err(|e| proto(e.to_string()))?;
    let elapsed = start.elapsed().max(Duration::from_micros(1));
    if u64::from_le_bytes(got) != sent {
        return Err(proto("the receiver counted another byte total".into()));
    }
    let capacity_bytes_per_s = (sent as f64 / elapsed.as_secs_f64()) as u64;

    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| proto(e.to_string()))?;
    let mut rtts = Vec::with_capacity(PING_COUNT);
    let mut b = [0u8; 8];
    for i in 0..PING_COUNT as u64 {
        let t = Instant::now();
        send.write_all(&i.to_le_bytes())
            .await
            .map_err(|e| proto(e.to_string()))?;
        recv.read_exact(&mut b)
            .await
            .map_err(|e| proto(e.to_string()))?;
        rtts.push(t.elapsed().as_micros() as u64);
    }
    rtts.sort_unstable();
    conn.close(0u32.into(), b"done");
    dialer.wait_idle().await;
    serve.abort();
    Ok(LinkCapacity {
        capacity_bytes_per_s,
        rtt_us: rtts[rtts.len() / 2],
    })
}

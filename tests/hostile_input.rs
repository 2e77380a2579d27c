//! Bad and hostile input: foreign certificates, corrupted frames, malformed
//! control requests. Each must be refused with nothing written.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkrep::control::Request;
use blkrep::engine::{NodeView, Role};
use blkrep::link::connection::{read_control, read_header};
use blkrep::link::tls::TlsMaterial;
use blkrep::link::wire::{FLAG_FORWARD, FLAG_RESYNC, Header, Kind};
use blkrep::link::{HelloMsg, LinkSettings, VolumeStateMsg, transport_config};
use blkrep::meta::{DiskState, Generations};
use common::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

async fn wait_log(path: &std::path::Path, needle: &str) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if std::fs::read_to_string(path)
            .unwrap_or_default()
            .contains(needle)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Starts both daemons and attaches the volume on both (no primary).
async fn start_and_attach(c: &mut blkrep::testkit::cluster::LocalCluster) {
    c.start(0).await.expect("alpha");
    c.start(1).await.expect("beta");
    for i in 0..2 {
        c.ok(
            i,
            Request::Attach {
                volume: "demo".into(),
            },
        )
        .await
        .expect("attach");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_with_a_certificate_from_another_ca_is_refused() {
    let mut c = cluster("foreign-ca", small());
    let foreign = c.dir.join("foreign");
    blkrep::cert::create_ca(&foreign).expect("foreign CA");
    blkrep::cert::issue("beta", &foreign, &foreign, 30).expect("foreign beta cert");
    use_identity(&c, 1, &foreign.join("beta.pem"), &foreign.join("beta.key"));
    start_and_attach(&mut c).await;
    // alpha dials beta and must reject beta's certificate.
    assert!(
        wait_log(&c.nodes[0].log, "invalid peer certificate").await,
        "alpha did not report the foreign certificate"
    );
    for i in 0..2 {
        let s = c.status(i).await.expect("status");
        assert_eq!(s.peer.connection, "Disconnected");
    }
    // status says why, on both sides (issue 18: it showed only
    // "Disconnected"), with the time it happened.
    let s = c
        .wait_for(0, "the certificate problem in status", WAIT, |s| {
            s.peer
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("beta's certificate is not accepted"))
        })
        .await
        .expect("alpha's status names beta's certificate");
    assert!(
        s.peer
            .last_error_at_unix_s
            .is_some_and(|t| t > 1_700_000_000)
    );
    c.wait_for(1, "the refused handshake in status", WAIT, |s| {
        s.peer
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("refused a replication connection"))
    })
    .await
    .expect("beta's status says it refused or was refused");
    let text = String::from_utf8_lossy(&cli(&c, 0, &["status", "demo"]).stdout).into_owned();
    assert!(
        text.contains("connection problem") && text.contains("certificate"),
        "{text}"
    );
    let beta_log = std::fs::read_to_string(&c.nodes[1].log).unwrap_or_default();
    assert!(
        !beta_log.contains("link to alpha is up"),
        "beta accepted a link: {beta_log}"
    );
}

/// A wrong peer address: the dialing side says it gets no answer and
/// what to check; the side that waits says nothing arrived and where.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_peer_address_is_explained_in_status() {
    let mut c = cluster("wrong-addr", small());
    let cfg = std::fs::read_to_string(&c.nodes[0].config).expect("config");
    let right = c.nodes[1].address.to_string();
    let unused = std::net::UdpSocket::bind("127.0.0.2:0").expect("port");
    let wrong = unused.local_addr().expect("addr").to_string();
    drop(unused);
    assert!(cfg.contains(&right), "{cfg}");
    std::fs::write(&c.nodes[0].config, cfg.replace(&right, &wrong)).expect("config");
    start_and_attach(&mut c).await;
    c.wait_for(0, "no answer in status", WAIT, |s| {
        s.peer
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains(&wrong) && e.contains("[nodes.beta] address"))
    })
    .await
    .expect("alpha's status names the address it dials");
    let s = c.status(1).await.expect("status");
    let e = s.peer.last_error.unwrap_or_default();
    assert!(
        e.contains("no connection from alpha")
            && e.contains("[nodes.beta] address in alpha's config"),
        "{e}"
    );
}

/// The TLS material of node `name` of cluster `c`.
fn node_tls(c: &blkrep::testkit::cluster::LocalCluster, name: &str) -> TlsMaterial {
    tls_in(&c.dir.join("tls"), name)
}

/// The CA and node `name`'s certificate and key in `dir`.
fn tls_in(dir: &std::path::Path, name: &str) -> TlsMaterial {
    TlsMaterial::load(
        &dir.join("ca.pem"),
        &dir.join(format!("{name}.pem")),
        &dir.join(format!("{name}.key")),
    )
    .expect("TLS material")
}

async fn read_frame(recv: &mut quinn::RecvStream) -> Option<(Header, Vec<u8>)> {
    let h = read_header(recv).await.ok()?;
    let mut payload = vec![0u8; h.payload_len as usize];
    recv.read_exact(&mut payload).await.ok()?;
    Some((h, payload))
}

async fn send_frame(send: &mut quinn::SendStream, h: Header, payload: &[u8]) {
    send.write_all(&h.encode(payload))
        .await
        .expect("send header");
    send.write_all(payload).await.expect("send payload");
}

/// The test plays node beta by hand: a real certificate, a hand-crafted
/// protocol conversation, then a frame whose payload does not match its CRC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_frame_is_refused_and_nothing_is_written() {
    let mut c = cluster("bad-frame", small());
    c.start(0).await.expect("alpha");
    c.ok(
        0,
        Request::Attach {
            volume: "demo".into(),
        },
    )
    .await
    .expect("attach alpha");
    let material = node_tls(&c, "beta");
    let settings = LinkSettings {
        peer_timeout_ms: 5000,
        keepalive_interval_ms: 1000,
        reconnect_backoff_max_ms: 500,
        inflight_requests_max: 16,
        mtu_max_bytes: 1452,
        lease_ms: 2000,
    };
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        material
            .quic_server(blkrep::link::tls::ALPN)
            .expect("server crypto"),
    ));
    server.transport_config(Arc::new(transport_config(&settings)));
    let endpoint = quinn::Endpoint::server(server, c.nodes[1].address).expect("bind as beta");
    let conn = tokio::time::timeout(WAIT, async {
        endpoint.accept().await.expect("incoming").await
    })
    .await
    .expect("alpha dials within the timeout")
    .expect("handshake");
    let (mut send, mut recv) = conn.accept_bi().await.expect("stream");
    let hello: HelloMsg =
        serde_json::from_slice(&read_control(&mut recv, Kind::Hello).await.expect("hello"))
            .expect("hello json");
    assert_eq!(hello.node, "alpha");
    let ours = serde_json::to_vec(&HelloMsg {
        node: "beta".into(),
        protocol: 1,
        lease_ms: Some(2000),
        inflight_requests_max: Some(16),
    })
    .expect("json");
    send_frame(&mut send, Header::new(Kind::Hello), &ours).await;

    // alpha announces its state; answer as an up-to-date primary with data.
    // (Lease pings may come first; this fake peer leaves them unanswered.)
    let (h, payload) = loop {
        let (h, payload) = read_frame(&mut recv).await.expect("alpha state");
        if h.kind != Kind::LeasePing {
            break (h, payload);
        }
    };
    assert_eq!(h.kind, Kind::VolumeState);
    let alpha: VolumeStateMsg = serde_json::from_slice(&payload).expect("state json");
    let alpha_view = alpha.view.expect("alpha view");
    let data_bytes = alpha_view.data_bytes;
    let me = VolumeStateMsg {
        volume: "demo".into(),
        index: 7,
        view: Some(NodeView {
            role: Role::Primary,
            disk: DiskState::UpToDate,
            generations: Generations {
                current: 0x1234,
                ..Default::default()
            },
            data_bytes,
            chunk_bytes: alpha_view.chunk_bytes,
            dirty_chunks: 0,
            sync_target: false,
            full_sync_base: 0,
            record: Default::default(),
            cache_lost: false,
            volatile_cache: true,
        }),
        sync_done: None,
        dirty_runs: None,
    };
    send_frame(
        &mut send,
        Header::new(Kind::VolumeState),
        &serde_json::to_vec(&me).expect("json"),
    )
    .await;
    // alpha becomes our sync target once its metadata says Inconsistent.
    loop {
        let (h, payload) = read_frame(&mut recv).await.expect("alpha target state");
        if h.kind == Kind::VolumeState {
            let m: VolumeStateMsg = serde_json::from_slice(&payload).expect("json");
            if m.view.is_some_and(|v| v.sync_target) {
                break;
            }
        }
    }
    // A valid resync write is applied and acknowledged.
    let mut h = Header::new(Kind::Write);
    h.volume = 7;
    h.request = 1;
    h.offset = 0;
    h.flags = FLAG_RESYNC;
    send_frame(&mut send, h, &[0x3c; 4096]).await;
    let (ack, _) = loop {
        let f = read_frame(&mut recv).await.expect("ack");
        if f.0.kind != Kind::LeasePing {
            break f;
        }
    };
    assert_eq!((ack.kind, ack.request, ack.status), (Kind::Ack, 1, 0));
    let disk = std::fs::File::open(&c.nodes[0].disk).expect("alpha disk");
    let mut b = [0u8; 4096];
    disk.read_exact_at(&mut b, 0).expect("read");
    assert!(b.iter().all(|&x| x == 0x3c), "valid write applied");

    // Frames outside the window (past the end of the volume, straddling
    // it) are refused; nothing is written. So is a write forwarded to a
    // node that is not the sender's sync source. (A frame for a volume
    // index the peer never announced closes the connection as a protocol
    // error.)
    let before = std::fs::read(&c.nodes[0].disk).expect("alpha disk");
    for (request, volume, offset, flags) in [
        (3u64, 7u32, data_bytes, FLAG_RESYNC),
        (4, 7, data_bytes - 2048, FLAG_RESYNC),
        (5, 7, 16384, FLAG_FORWARD),
    ] {
        let mut h = Header::new(Kind::Write);
        h.volume = volume;
        h.request = request;
        h.offset = offset;
        h.flags = flags;
        send_frame(&mut send, h, &[0x66; 4096]).await;
        let (ack, _) = loop {
            let f = read_frame(&mut recv)
                .await
                .unwrap_or_else(|| panic!("no answer to frame {request}"));
            if f.0.kind != Kind::LeasePing {
                break f;
            }
        };
        assert_eq!((ack.kind, ack.request), (Kind::Ack, request));
        assert_ne!(ack.status, 0, "frame {request} was accepted");
    }
    assert!(
        std::fs::read(&c.nodes[0].disk).expect("alpha disk") == before,
        "a refused frame wrote to the disk"
    );

    // Now a frame whose payload was damaged after its CRC was computed.
    let mut h = Header::new(Kind::Write);
    h.volume = 7;
    h.request = 2;
    h.offset = 8192;
    h.flags = FLAG_RESYNC;
    let good = [0x7eu8; 4096];
    let header = h.encode(&good);
    let mut bad = good;
    bad[100] ^= 0xff;
    send.write_all(&header).await.expect("send");
    send.write_all(&bad).await.expect("send");
    let closed = tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("alpha drops the connection");
    match closed {
        quinn::ConnectionError::ApplicationClosed(a) => {
            assert_eq!(a.error_code, quinn::VarInt::from_u32(1))
        }
        other => panic!("unexpected close: {other}"),
    }
    disk.read_exact_at(&mut b, 8192).expect("read");
    assert!(
        b.iter().all(|&x| x == 0),
        "the corrupted frame wrote nothing"
    );
    assert!(wait_log(&c.nodes[0].log, "payload checksum mismatch").await);
    // The daemon is alive and well.
    c.status(0).await.expect("alpha still answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_control_requests_get_an_error_not_a_crash() {
    let mut c = cluster("bad-control", small());
    c.start(0).await.expect("alpha");
    for garbage in [
        "not json\n",
        "{\"cmd\":\"primary\"}\n",
        "{\"cmd\":\"rm-rf\",\"volume\":\"x\"}\n",
        "\n",
    ] {
        let s = tokio::net::UnixStream::connect(&c.nodes[0].control)
            .await
            .expect("connect");
        let (r, mut w) = s.into_split();
        w.write_all(garbage.as_bytes()).await.expect("write");
        w.shutdown().await.expect("shutdown");
        let mut line = String::new();
        BufReader::new(r)
            .read_line(&mut line)
            .await
            .expect("answer");
        assert!(
            line.contains("\"result\":\"error\"") && line.contains("bad-request"),
            "{garbage:?} -> {line}"
        );
    }
    // A huge line without a newline is cut off, not buffered forever.
    let s = tokio::net::UnixStream::connect(&c.nodes[0].control)
        .await
        .expect("connect");
    let (r, mut w) = s.into_split();
    let big = vec![b'x'; 2 << 20];
    let _ = w.write_all(&big).await;
    let _ = w.shutdown().await;
    let mut line = String::new();
    let _ = BufReader::new(r).read_line(&mut line).await;
    assert!(line.contains("bad-request"), "{line}");
    c.status(0).await.expect("still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificate_is_refused() {
    let mut c = cluster("expired-cert", small());
    let tls = c.dir.join("tls");
    let expired = c.dir.join("expired");
    blkrep::cert::issue("beta", &tls, &expired, -5).expect("expired beta cert");
    use_identity(&c, 1, &expired.join("beta.pem"), &expired.join("beta.key"));
    start_and_attach(&mut c).await;
    assert!(
        wait_log(&c.nodes[0].log, "certificate expired").await,
        "alpha did not report the expired certificate: {}",
        std::fs::read_to_string(&c.nodes[0].log).unwrap_or_default()
    );
    let s = c.status(0).await.expect("status");
    assert_eq!(s.peer.connection, "Disconnected");
    // Status says whose certificate expired and how to renew it.
    let why = s.peer.last_error.unwrap_or_default();
    assert!(
        why.contains("beta's certificate has expired")
            && why.contains("blkrep cert issue beta --ca"),
        "{why}"
    );
    // beta, whose certificate alpha refused, is told so in its log.
    assert!(
        wait_log(
            &c.nodes[1].log,
            "refused this node's certificate as expired"
        )
        .await,
        "beta did not report its refused certificate: {}",
        std::fs::read_to_string(&c.nodes[1].log).unwrap_or_default()
    );
    // And beta, whose own certificate it is, says so in its status.
    let own = node_status(&c, 1).await.certificates;
    let mine = own.iter().find(|r| r.kind == "node").expect("own cert");
    assert_eq!(
        (mine.name.as_str(), mine.days_left),
        ("beta", -5),
        "{own:?}"
    );
    assert!(
        mine.warning
            .as_deref()
            .is_some_and(|w| w.contains("expired 5 days ago")),
        "{own:?}"
    );
}

/// The whole status report of node `i`.
async fn node_status(
    c: &blkrep::testkit::cluster::LocalCluster,
    i: usize,
) -> blkrep::control::status::NodeStatus {
    match c
        .call(i, Request::Status { volume: None })
        .await
        .expect("status")
    {
        blkrep::control::Response::Status(s) => s,
        other => panic!("unexpected status answer {other:?}"),
    }
}

/// Issue 14, hole 12: a certificate that expires in 10 days is reported
/// weeks ahead, by the node that holds it and by the peer and witness it
/// presents it to: in `status` (JSON and text) and in the logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_close_to_expiry_is_reported_ahead() {
    let mut c = cluster(
        "cert-expiry",
        blkrep::testkit::cluster::ClusterOptions {
            witness: true,
            ..small()
        },
    );
    let tls = c.dir.join("tls");
    let short = c.dir.join("short");
    blkrep::cert::issue("beta", &tls, &short, 10).expect("short-lived beta cert");
    use_identity(&c, 1, &short.join("beta.pem"), &short.join("beta.key"));
    c.start_witness().await.expect("witness");
    start_and_attach(&mut c).await;
    c.wait_for(0, "connected", WAIT, |s| s.peer.connection == "Connected")
        .await
        .expect("the link comes up: the certificate is still valid");
    // alpha learns beta's and the witness's certificates once they connect.
    let deadline = Instant::now() + WAIT;
    let alpha = loop {
        let s = node_status(&c, 0).await;
        let kinds: Vec<&str> = s.certificates.iter().map(|r| r.kind.as_str()).collect();
        if kinds.contains(&"peer") && kinds.contains(&"witness") {
            break s;
        }
        assert!(Instant::now() < deadline, "{:?}", s.certificates);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let find = |s: &blkrep::control::status::NodeStatus, kind: &str| {
        s.certificates
            .iter()
            .find(|r| r.kind == kind)
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} certificate in {:?}", s.certificates))
    };
    let peer = find(&alpha, "peer");
    assert_eq!((peer.name.as_str(), peer.days_left), ("beta", 9));
    let warning = peer.warning.expect("a warning for beta's certificate");
    assert!(
        warning.starts_with("peer beta's certificate expires in 9 days")
            && warning.contains("blkrep cert issue beta --ca"),
        "{warning}"
    );
    for kind in ["node", "ca", "witness"] {
        let r = find(&alpha, kind);
        assert!(r.days_left > 365 && r.warning.is_none(), "{r:?}");
    }
    let own = find(&node_status(&c, 1).await, "node");
    assert_eq!((own.name.as_str(), own.days_left), ("beta", 9));
    assert!(own.warning.is_some(), "{own:?}");
    // The logs: beta warns of its own certificate at start, alpha of the
    // peer's once the link came up.
    assert!(
        wait_log(
            &c.nodes[1].log,
            "this node's certificate (beta) expires in 9 days"
        )
        .await,
        "beta did not warn: {}",
        std::fs::read_to_string(&c.nodes[1].log).unwrap_or_default()
    );
    assert!(
        wait_log(&c.nodes[0].log, "peer beta's certificate expires in 9 days").await,
        "alpha did not warn: {}",
        std::fs::read_to_string(&c.nodes[0].log).unwrap_or_default()
    );
    // The text status an operator reads.
    let o = cli(&c, 0, &["status"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("peer beta 9 days")
            && text.contains("CERTIFICATE: peer beta's certificate expires in 9 days"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_certificate_for_the_wrong_node_is_refused() {
    // beta presents alpha's (valid, same CA) certificate: alpha dials beta by
    // name and must refuse a server that is not "beta".
    let mut c = cluster("wrong-name", small());
    let tls = c.dir.join("tls");
    use_identity(&c, 1, &tls.join("alpha.pem"), &tls.join("alpha.key"));
    start_and_attach(&mut c).await;
    assert!(
        wait_log(&c.nodes[0].log, "certificate not valid for name").await,
        "alpha did not report the certificate name mismatch: {}",
        std::fs::read_to_string(&c.nodes[0].log).unwrap_or_default()
    );
    assert_eq!(
        c.status(0).await.expect("status").peer.connection,
        "Disconnected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_volume_of_another_size_is_refused() {
    let mut c = cluster("wrong-size", small());
    // beta's disk is 4 MiB larger: fresh metadata with another usable size.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&c.nodes[1].disk)
        .expect("beta disk");
    f.set_len((16 << 20) + (4 << 20)).expect("grow");
    drop(f);
    let o = cli(&c, 1, &["create-md", "demo", "--force"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    start_and_attach(&mut c).await;
    let s = c
        .wait_for(0, "refused", WAIT, |s| {
            s.peer.relation.as_deref() == Some("Refused")
        })
        .await
        .expect("alpha refuses the peer");
    assert!(
        s.peer
            .refused_reason
            .as_deref()
            .is_some_and(|r| r.contains("different size")),
        "{s:?}"
    );
    // Nothing is mirrored: promotion with --force works locally, and the peer
    // stays out of the up-to-date set.
    c.ok(
        0,
        Request::Primary {
            volume: "demo".into(),
            force: true,
        },
    )
    .await
    .expect("primary");
    let s = c.status(0).await.expect("status");
    assert_eq!(s.peer.relation.as_deref(), Some("Refused"));
}

/// Flips one byte of node `i`'s backing file at `at`.
fn flip_byte(c: &blkrep::testkit::cluster::LocalCluster, i: usize, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&c.nodes[i].disk)
        .expect("open disk");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read byte");
    b[0] ^= 0x5a;
    f.write_all_at(&b, at).expect("write byte");
    f.sync_all().expect("sync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_metadata_is_detected_recovered_or_refused() {
    let c = up("corrupt-md", small()).await;
    qemu_io(
        &c,
        0,
        &["write -P 0x61 0 1M", "write -P 0x62 8M 64k", "flush"],
    );
    c.wait_in_sync(WAIT).await.expect("in sync");
    let disk_bytes = std::fs::metadata(&c.nodes[1].disk).expect("disk").len();
    let layout =
        blkrep::meta::MetaLayout::internal(disk_bytes, c.opts.chunk_bytes).expect("layout");
    let vol = || "demo".to_string();
    let detach = || Request::Detach {
        volume: vol(),
        force: false,
    };
    let attach = || Request::Attach { volume: vol() };

    // One superblock copy damaged: the other is used, with a warning.
    c.ok(1, detach()).await.expect("detach beta");
    flip_byte(&c, 1, layout.superblock_offset(0) + 40);
    flip_byte(&c, 1, layout.superblock_offset(1) + 40);
    let log = std::fs::read_to_string(&c.nodes[1].log).unwrap_or_default();
    let before = std::fs::read(&c.nodes[1].disk).expect("disk");
    // Both damaged: attach refuses, explains, and writes nothing.
    let e = c.ok(1, attach()).await.expect_err("attach must refuse");
    let msg = e.to_string();
    assert!(
        msg.contains("both superblock copies are damaged") && msg.contains("create-md"),
        "{msg}"
    );
    assert!(
        std::fs::read(&c.nodes[1].disk).expect("disk") == before,
        "a refused attach wrote to the disk"
    );
    // Repair one copy (flip it back): attach works on the other one.
    flip_byte(&c, 1, layout.superblock_offset(1) + 40);
    c.ok(1, attach()).await.expect("attach with one good copy");
    assert!(
        wait_log(&c.nodes[1].log, "one superblock copy is damaged").await,
        "no warning about the damaged copy"
    );
    c.wait_in_sync(WAIT).await.expect("in sync again");
    assert!(
        log.len()
            < std::fs::read_to_string(&c.nodes[1].log)
                .unwrap_or_default()
                .len()
    );

    // A damaged bitmap page: its chunks count as out of sync and are
    // copied again; the page is rewritten intact.
    c.ok(1, detach()).await.expect("detach beta");
    flip_byte(&c, 1, layout.bitmap_page_offset(0) + 3);
    // Beta's data differs in a chunk its (intact) bitmap did not mark:
    // only the conservative reading of the damaged page repairs it.
    flip_byte(&c, 1, 8 << 20);
    c.ok(1, attach())
        .await
        .expect("attach with a damaged bitmap page");
    assert!(
        wait_log(&c.nodes[1].log, "bitmap page(s) failed their checksum").await,
        "no warning about the damaged bitmap page"
    );
    c.wait_in_sync(WAIT)
        .await
        .expect("in sync after the bitmap repair");
    assert_replicas_equal(&c).await;
    c.ok(1, detach()).await.expect("detach beta");
    c.ok(1, attach()).await.expect("attach again");
    let log = std::fs::read_to_string(&c.nodes[1].log).unwrap_or_default();
    assert_eq!(
        log.matches("failed their checksum").count(),
        1,
        "the damaged page was rewritten intact"
    );
    c.wait_in_sync(WAIT).await.expect("in sync");
    assert_replicas_equal(&c).await;
}

/// Two copies of "the same" volume that never shared a history (created
/// and made primary apart: another volume with the same name and size)
/// refuse each other: nothing is synced either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_volume_with_an_unrelated_history_is_refused() {
    let mut c = cluster("unrelated", small());
    let vol = || "demo".to_string();
    for (i, byte) in [(0usize, 0xa1u8), (1, 0xb2)] {
        c.start(i).await.expect("start");
        c.ok(i, Request::Attach { volume: vol() })
            .await
            .expect("attach");
        c.ok(
            i,
            Request::Primary {
                volume: vol(),
                force: true,
            },
        )
        .await
        .expect("primary --force");
        let sock = c.nbd_socket(i);
        let mut n = blkrep::testkit::nbd_client::NbdClient::connect(&sock)
            .await
            .expect("nbd");
        n.write(0, &[byte; 4096], true).await.expect("write");
        c.kill(i);
    }
    for i in 0..2 {
        c.restart(i).await.expect("restart");
    }
    for i in 0..2 {
        c.wait_for(i, "the peer refused", WAIT, |s| {
            matches!(s.peer.relation.as_deref(), Some("SplitBrain" | "Refused"))
        })
        .await
        .expect("refused");
    }
    // Each copy keeps its own data.
    for (i, byte) in [(0usize, 0xa1u8), (1, 0xb2)] {
        let d = c.read_data(i, 4096).expect("read");
        assert!(
            d.iter().all(|&x| x == byte),
            "node {i}'s data was overwritten"
        );
    }
}

/// Issue 14, hole 1, against a real witness: a node with a valid
/// certificate asks for records under names that would leave the state
/// directory, or with a peer the witness does not serve. Each gets an
/// error answer, and the witness writes nothing anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_witness_refuses_volume_names_and_peers_it_does_not_serve() {
    use blkrep::quorum::{Holder, RecordView};
    use blkrep::witness::client::WitnessClient;
    use blkrep::witness::protocol::{ChangeOutcome, Claim, Refusal, WitnessOp};
    let mut c = cluster(
        "witness-names",
        blkrep::testkit::cluster::ClusterOptions {
            witness: true,
            ..small()
        },
    );
    c.start_witness().await.expect("witness");
    let w = c.witness.clone().expect("witness files");
    let material = node_tls(&c, "alpha");
    let client = WitnessClient::new("witness", w.address, &material, 5000).expect("client");
    let outside = c.dir.join("escaped");
    let escape = format!("../{}", outside.file_name().unwrap().to_string_lossy());
    let force = WitnessOp::Promote {
        force: true,
        incomplete: true,
    };
    let outcome = client
        .change(&escape, "beta", 0, force)
        .await
        .expect("an answer");
    assert!(
        matches!(outcome, ChangeOutcome::Refused(Refusal::InvalidVolume(_))),
        "{outcome:?}"
    );
    let outcome = client
        .change("demo", "mallory", 0, force)
        .await
        .expect("an answer");
    assert!(
        matches!(outcome, ChangeOutcome::Refused(Refusal::UnknownPeer(_))),
        "{outcome:?}"
    );
    let view = RecordView {
        epoch: 1,
        primary: Holder::Me,
        me_up_to_date: true,
        peer_up_to_date: true,
        forced: false,
    };
    let claims = vec![
        Claim {
            volume: escape.clone(),
            peer: "beta".into(),
            view,
            primary_now: true,
        },
        Claim {
            volume: "demo".into(),
            peer: "mallory".into(),
            view,
            primary_now: true,
        },
    ];
    let reply = client.heartbeat(claims).await.expect("heartbeat");
    assert!(
        reply
            .volumes
            .iter()
            .all(|a| a.refused.is_some() && !a.lease),
        "{:?}",
        reply.volumes
    );
    let escaped: Vec<_> = std::fs::read_dir(&c.dir)
        .expect("cluster dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("escaped"))
        .collect();
    assert!(escaped.is_empty(), "the witness wrote {escaped:?}");
    let stored = std::fs::read_dir(&w.state_dir).expect("state dir").count();
    assert_eq!(stored, 0, "the witness stored a record");
    // A good request still works (a forced promotion on a record the
    // witness has not seen first waits out any lease it may have granted
    // the peer before it started).
    let mut outcome = client
        .change("demo", "beta", 0, force)
        .await
        .expect("an answer");
    if let ChangeOutcome::Wait { wait_ms, .. } = outcome {
        tokio::time::sleep(Duration::from_millis(wait_ms + 50)).await;
        outcome = client
            .change("demo", "beta", 0, force)
            .await
            .expect("an answer");
    }
    assert!(matches!(outcome, ChangeOutcome::Done(_)), "{outcome:?}");
}

/// Test endpoints of one link: `alpha`'s real `PeerConnection` (its read
/// loop running) and the fake peer's raw QUIC stream, on loopback, with
/// certificates of one test CA.
struct RawLink {
    alpha: Arc<blkrep::link::connection::PeerConnection>,
    quic: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    _dir: TempDir,
}

/// A directory removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct NoVolumes;

impl blkrep::link::connection::InboundHandler for NoVolumes {
    fn connection_changed(
        &self,
        _: &str,
        _: Option<Arc<blkrep::link::connection::PeerConnection>>,
    ) {
    }
    fn volume_state(&self, _: &Arc<blkrep::link::connection::PeerConnection>, _: VolumeStateMsg) {}
    fn request(
        &self,
        _: &Arc<blkrep::link::connection::PeerConnection>,
        _: &str,
        _: blkrep::link::connection::InboundRequest,
    ) {
    }
}

async fn raw_link(tag: &str) -> RawLink {
    let dir = std::env::temp_dir().join(format!("blkrep-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    blkrep::cert::create_ca(&dir).expect("ca");
    for n in ["alpha", "beta"] {
        blkrep::cert::issue(n, &dir, &dir, 2).expect("cert");
    }
    let load = |n: &str| tls_in(&dir, n);
    let settings = LinkSettings {
        peer_timeout_ms: 5000,
        keepalive_interval_ms: 1000,
        reconnect_backoff_max_ms: 500,
        inflight_requests_max: 16,
        mtu_max_bytes: 1452,
        lease_ms: 2000,
    };
    let transport = Arc::new(transport_config(&settings));
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        load("beta")
            .quic_server(blkrep::link::tls::ALPN)
            .expect("server crypto"),
    ));
    server.transport_config(transport.clone());
    let beta = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).expect("bind beta");
    let mut client = quinn::ClientConfig::new(Arc::new(
        load("alpha")
            .quic_client(blkrep::link::tls::ALPN)
            .expect("client crypto"),
    ));
    client.transport_config(transport);
    let alpha_end = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("bind alpha");
    let beta_addr = beta.local_addr().expect("addr");
    let (dialed, accepted) = tokio::join!(
        async {
            alpha_end
                .connect_with(client, beta_addr, "beta")
                .expect("connect")
                .await
                .expect("handshake")
        },
        async {
            beta.accept()
                .await
                .expect("incoming")
                .await
                .expect("accept")
        }
    );
    let (a_send, a_recv) = dialed.open_bi().await.expect("stream");
    let alpha = blkrep::link::connection::PeerConnection::start(
        "beta".into(),
        dialed,
        a_send,
        16,
        32,
        Duration::from_secs(5),
        Default::default(),
    );
    // A stream appears at the peer once something was sent on it.
    let mut ping = Header::new(Kind::Flush);
    ping.request = 0;
    alpha
        .send(ping, bytes::Bytes::new())
        .await
        .expect("first frame");
    let (send, mut recv) = accepted.accept_bi().await.expect("peer stream");
    let (first, _) = read_frame(&mut recv).await.expect("first frame");
    assert_eq!(first.kind, Kind::Flush);
    let reader = alpha.clone();
    tokio::spawn(async move {
        let handler: Arc<dyn blkrep::link::connection::InboundHandler> = Arc::new(NoVolumes);
        reader.read_loop(a_recv, &handler).await
    });
    RawLink {
        alpha,
        quic: accepted,
        send,
        recv,
        _dir: TempDir(dir),
    }
}

/// Issue 14, hole 6: a ReadReply of another length than the read asked for
/// (or a digest of another size) is a protocol error of that peer: the
/// request fails and the link closes; nothing short reaches a client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_reply_of_the_wrong_length_is_a_protocol_error() {
    for (kind, answer_kind, answer_bytes) in [
        (Kind::ReadRequest, Kind::ReadReply, 8192usize),
        (Kind::ReadRequest, Kind::ReadReply, 4096),
        (Kind::ReadRequest, Kind::Ack, 0),
        (Kind::HashRequest, Kind::HashReply, 16),
    ] {
        let mut link = raw_link("short-reply").await;
        let mut ask = Header::new(kind);
        ask.offset = 0;
        ask.op_len = 8192;
        let alpha = link.alpha.clone();
        let request = tokio::spawn(async move { alpha.request(ask, bytes::Bytes::new()).await });
        let (h, _) = read_frame(&mut link.recv).await.expect("the request");
        assert_eq!(h.kind, kind);
        let mut answer = Header::new(answer_kind);
        answer.request = h.request;
        send_frame(&mut link.send, answer, &vec![0x5a; answer_bytes]).await;
        let result = tokio::time::timeout(WAIT, request)
            .await
            .expect("answered in time")
            .expect("task");
        let good = kind == Kind::ReadRequest && answer_bytes == 8192;
        if good {
            let reply = result.expect("the exact length is fine");
            assert_eq!(reply.data.map(|d| d.len()), Some(8192));
            continue;
        }
        assert!(
            matches!(result, Err(blkrep::link::LinkError::Protocol(_))),
            "{kind:?} answered by {answer_bytes} bytes: {:?}",
            result.map(|r| r.status)
        );
        match tokio::time::timeout(WAIT, link.quic.closed())
            .await
            .expect("the link closes")
        {
            quinn::ConnectionError::ApplicationClosed(a) => {
                assert_eq!(a.error_code, quinn::VarInt::from_u32(1))
            }
            other => panic!("unexpected close: {other}"),
        }
    }
}

/// A whole-device discard, as `mkfs` and `fstrim` send it, spans more
/// activity-log extents than the log holds. It completes (in pieces the
/// log can hold) instead of hanging the volume with its range locked, the
/// data reads back as zeros on both copies, and the volume still demotes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_device_discard_completes_and_leaves_the_volume_usable() {
    let opts = blkrep::testkit::cluster::ClusterOptions {
        disk_bytes: 128 << 20,
        al_extents: blkrep::meta::activity_log::AL_EXTENTS_MIN,
        ..Default::default()
    };
    let c = up("discard-all", opts).await;
    let size = c.status(0).await.expect("status").size_bytes.expect("size");
    assert!(
        size > (blkrep::meta::activity_log::AL_EXTENTS_MIN as u64) * (4 << 20),
        "the discard must span more extents than the log holds"
    );
    qemu_io(&c, 0, &["write -P 0x5a 0 1M", "write -P 0x5a 100M 1M"]);
    // qemu sends a discard as one NBD request of up to 2 GiB.
    let mut child = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c"])
        .arg(format!("discard 0 {size}"))
        .args(["-c", "flush"])
        .arg(nbd_uri(&c, 0))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run qemu-io");
    let deadline = Instant::now() + WAIT;
    while child.try_wait().expect("qemu-io").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            dump_logs(&c);
            panic!("a whole-device discard did not complete in {WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = child.wait_with_output().expect("qemu-io output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("failed"),
        "discard: {text}"
    );
    qemu_io(&c, 0, &["read -P 0 0 1M", "read -P 0 100M 1M"]);
    assert_replicas_equal(&c).await;
    c.ok(
        0,
        Request::Secondary {
            volume: "demo".into(),
            force: false,
        },
    )
    .await
    .expect("demote after the discard");
}

/// Hole 8: attaching a volume whose disk hangs (its filesystem frozen:
/// every write blocks in the kernel) must not stall the daemon. While that
/// attach waits in its superblock write, the other volume's replicated
/// writes and reads, `status`, and the link keep working; a second attach
/// of the hung volume is refused as busy; once the disk answers again the
/// attach completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attaching_a_volume_on_a_hung_disk_does_not_stall_the_others() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("needs root to mount and freeze a filesystem (CI runs as root): skipped");
        return;
    }
    let mut c = cluster(
        "hung-attach",
        blkrep::testkit::cluster::ClusterOptions {
            extra_volumes: 1,
            ..small()
        },
    );
    let fs = SmallFs::new(&c.dir, 48 << 20);
    // alpha's disk of the second volume moves onto the filesystem to freeze.
    fs.move_in(&c.nodes[0].disk.with_file_name("disk-1.img"));
    if let Err(e) = c.bring_up().await {
        dump_logs(&c);
        panic!("bring up: {e}");
    }
    qemu_io(&c, 0, &["write -P 0x11 0 1M"]);

    let frozen = fs.freeze();
    let control = c.nodes[0].control.clone();
    let attach = tokio::spawn(async move {
        blkrep::control::call(
            &control,
            &Request::Attach {
                volume: "demo-1".into(),
            },
        )
        .await
    });
    let deadline = Instant::now() + WAIT;
    while !daemon_blocked_on_disk(&c, 0) {
        assert!(
            Instant::now() < deadline && !attach.is_finished(),
            "the attach never reached its superblock write on the frozen disk"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The first volume goes on: a replicated write, a read, a flush.
    let limit = Duration::from_secs(15);
    let mut io = std::process::Command::new("qemu-io");
    io.args(["-f", "raw", "-c", "write -P 0x22 1M 1M", "-c", "flush"])
        .args(["-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 1M 1M"])
        .arg(nbd_uri(&c, 0));
    let out = output_within(&mut io, limit).await;
    let Some(out) = out else {
        dump_logs(&c);
        panic!("I/O on the other volume stalled while an attach waited on a hung disk");
    };
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io: {text}"
    );
    let status = tokio::time::timeout(limit, c.status(0)).await;
    assert!(
        matches!(status, Ok(Ok(_))),
        "status did not answer while an attach waited on a hung disk"
    );
    let again = tokio::time::timeout(
        limit,
        c.call(
            0,
            Request::Attach {
                volume: "demo-1".into(),
            },
        ),
    )
    .await;
    match again {
        Ok(Ok(blkrep::control::Response::Error { code, message })) => {
            assert_eq!(code, blkrep::control::ErrorCode::Busy, "{message}");
            assert!(message.contains("being attached"), "{message}");
        }
        other => panic!("a second attach of the hung volume: {other:?}"),
    }
    assert!(
        !attach.is_finished(),
        "the attach finished while its disk was frozen"
    );

    drop(frozen);
    let answer = tokio::time::timeout(WAIT, attach)
        .await
        .expect("the attach ends once the disk answers")
        .expect("task")
        .expect("control call");
    assert!(
        matches!(answer, blkrep::control::Response::Ok { .. }),
        "attach after the thaw: {answer:?}"
    );
    assert_replicas_equal(&c).await;
}

/// The 18-byte NBD greeting of a fresh connection, or None when the server
/// closed it first.
async fn nbd_greeting(s: &mut tokio::net::UnixStream) -> Option<[u8; 18]> {
    use tokio::io::AsyncReadExt;
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.ok().map(|_| g)
}

/// Whether the server closes `s` (EOF or reset) within `limit`; what it
/// sent before is returned.
async fn closed_within(s: &mut tokio::net::UnixStream, limit: Duration) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    let mut b = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut b)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(seen),
            Ok(Ok(n)) => seen.extend_from_slice(&b[..n]),
        }
    }
}

fn nbd_option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut o = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    o.extend_from_slice(&opt.to_be_bytes());
    o.extend_from_slice(&(data.len() as u32).to_be_bytes());
    o.extend_from_slice(data);
    o
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Hole 9: an NBD export bounds what its clients can take. At most
/// `CONNECTIONS_MAX` connections (one more is closed before the greeting);
/// at most `OPTIONS_MAX` options per handshake; a handshake not done in
/// `HANDSHAKE_TIMEOUT` is closed; and a client that pipelines large reads
/// and never reads the replies holds at most the volume's
/// `CLIENT_INFLIGHT_BYTES_MAX`, not 128 x 32 MiB per connection. Once the
/// hostile clients are gone, a real client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nbd_export_bounds_connections_handshakes_and_bytes_in_flight() {
    use blkrep::frontend::nbd::{CONNECTIONS_MAX, HANDSHAKE_TIMEOUT, OPTIONS_MAX};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = up(
        "nbd-bounds",
        blkrep::testkit::cluster::ClusterOptions {
            disk_bytes: 80 << 20,
            ..Default::default()
        },
    )
    .await;
    let sock = c.nbd_socket(0);
    let connect = || tokio::net::UnixStream::connect(&sock);

    // Connections: the limit is served, one more is closed at once.
    let mut idle = Vec::new();
    for _ in 0..CONNECTIONS_MAX {
        let mut s = connect().await.expect("connect");
        assert!(nbd_greeting(&mut s).await.is_some(), "greeting");
        idle.push(s);
    }
    let mut extra = connect().await.expect("connect");
    assert!(
        nbd_greeting(&mut extra).await.is_none(),
        "connection {} was served",
        CONNECTIONS_MAX + 1
    );
    let started = Instant::now();

    // Options: one connection floods the handshake with LIST options; it is
    // answered OPTIONS_MAX times, then closed.
    let mut flood = idle.pop().expect("a connection");
    let mut msg = 3u32.to_be_bytes().to_vec();
    for _ in 0..OPTIONS_MAX + 8 {
        msg.extend_from_slice(&nbd_option(3, &[]));
    }
    flood.write_all(&msg).await.expect("send options");
    let replies = closed_within(&mut flood, Duration::from_secs(5))
        .await
        .expect("an option flood is cut off");
    // Each LIST is answered by a SERVER reply (20 bytes + 4 + the name) and
    // an ACK (20 bytes).
    let per_list = 20 + 4 + "demo".len() + 20;
    assert_eq!(replies.len(), OPTIONS_MAX * per_list, "options answered");

    // Handshakes: the idle connections are closed once their time is up.
    for s in &mut idle {
        let left = (HANDSHAKE_TIMEOUT + Duration::from_secs(5)).saturating_sub(started.elapsed());
        assert!(
            closed_within(s, left).await.is_some(),
            "an idle handshake was not closed within {HANDSHAKE_TIMEOUT:?}"
        );
    }
    assert!(
        started.elapsed() >= HANDSHAKE_TIMEOUT - Duration::from_millis(500),
        "idle handshakes were closed before their time"
    );
    drop(idle);

    // Bytes in flight: 128 reads of 32 MiB, replies never read.
    let pid = c.pid(0).expect("alpha runs");
    let before = rss_bytes(pid);
    let mut greedy = connect().await.expect("connect");
    assert!(nbd_greeting(&mut greedy).await.is_some(), "greeting");
    let mut go = 3u32.to_be_bytes().to_vec();
    go.extend_from_slice(&nbd_option(1, b"demo"));
    greedy.write_all(&go).await.expect("export name");
    let mut export = [0u8; 10];
    greedy.read_exact(&mut export).await.expect("export info");
    let mut reads = Vec::new();
    for h in 0..128u64 {
        reads.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        reads.extend_from_slice(&0u16.to_be_bytes());
        reads.extend_from_slice(&0u16.to_be_bytes());
        reads.extend_from_slice(&h.to_be_bytes());
        reads.extend_from_slice(&0u64.to_be_bytes());
        reads.extend_from_slice(&(32u32 << 20).to_be_bytes());
    }
    greedy.write_all(&reads).await.expect("send reads");
    let bound = blkrep::volume::CLIENT_INFLIGHT_BYTES_MAX as u64 + (192 << 20);
    let mut peak = 0;
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(5) {
        peak = peak.max(rss_bytes(pid).saturating_sub(before));
        assert!(
            peak <= bound,
            "the daemon grew by {} MiB for one client's unread replies",
            peak >> 20
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        tokio::time::timeout(Duration::from_secs(10), c.status(0))
            .await
            .is_ok_and(|s| s.is_ok()),
        "status answers while a client holds the volume's budget"
    );
    drop(greedy);
    drop(extra);
    drop(flood);
    let started = Instant::now();
    let mut io = std::process::Command::new("qemu-io");
    io.args([
        "-f",
        "raw",
        "-c",
        "write -P 0x33 0 1M",
        "-c",
        "read -P 0x33 0 1M",
    ])
    .arg(nbd_uri(&c, 0));
    let out = output_within(&mut io, WAIT)
        .await
        .expect("a real client is served once the hostile ones are gone");
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
        "qemu-io: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    eprintln!(
        "peak growth {} MiB; a real client served {:?} after the hostile ones left",
        peak >> 20,
        started.elapsed()
    );
}

/// The first byte of what `server` answers to one QUIC Initial packet (a
/// connection attempt from a fresh address), None without an answer.
async fn answer_to_an_initial(server: std::net::SocketAddr, alpn: &[u8]) -> Option<u8> {
    let dir = blkrep::testkit::cluster::scratch_dir("initial");
    blkrep::cert::create_ca(&dir).expect("ca");
    blkrep::cert::issue("stranger", &dir, &dir, 2).expect("cert");
    let tls = tls_in(&dir, "stranger");
    let client = quinn::ClientConfig::new(Arc::new(tls.quic_client(alpn).expect("crypto")));
    let _ = std::fs::remove_dir_all(&dir);
    let mut endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let now = std::time::Instant::now();
    let (_, mut conn) = endpoint
        .connect(now, client, server, "alpha")
        .expect("connect");
    let mut initial = Vec::new();
    let t = conn
        .poll_transmit(now, 1, &mut initial)
        .expect("an Initial");
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    socket
        .send_to(&initial[..t.size], server)
        .await
        .expect("send");
    let mut answer = [0u8; 2048];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut answer))
        .await
        .ok()?
        .ok()?;
    (n > 0).then_some(answer[0])
}

/// Hole 10: a QUIC flood on the replication or the witness port. A
/// connection attempt from an address not yet validated gets a stateless
/// Retry (long header, type 3: first byte 0xf?), not a handshake; a burst
/// of handshakes that fail their certificate check is logged at warn once
/// (at most once per 10 s), not once each; replication goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_flood_is_answered_with_retries_and_logged_once() {
    let c = up(
        "quic-flood",
        blkrep::testkit::cluster::ClusterOptions {
            witness: true,
            ..small()
        },
    )
    .await;
    let witness = c.witness.clone().expect("a witness");
    for (what, addr, alpn) in [
        ("replication", c.nodes[0].address, blkrep::link::tls::ALPN),
        ("witness", witness.address, blkrep::witness::protocol::ALPN),
    ] {
        let first = answer_to_an_initial(addr, alpn).await;
        assert!(
            first.is_some_and(|b| b & 0xf0 == 0xf0),
            "the {what} port answered an unvalidated Initial with {first:x?}, not a Retry"
        );
    }

    let foreign = c.dir.join("foreign");
    blkrep::cert::create_ca(&foreign).expect("foreign CA");
    blkrep::cert::issue("beta", &foreign, &foreign, 30).expect("foreign cert");
    let tls = tls_in(&foreign, "beta");
    let attempts = 40;
    for (addr, alpn, name) in [
        (c.nodes[0].address, blkrep::link::tls::ALPN, "alpha"),
        (witness.address, blkrep::witness::protocol::ALPN, "witness"),
    ] {
        let client = quinn::ClientConfig::new(Arc::new(tls.quic_client(alpn).expect("crypto")));
        let mut end = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("bind");
        end.set_default_client_config(client);
        for _ in 0..attempts {
            let connecting = end.connect(addr, name).expect("connect");
            let r = tokio::time::timeout(Duration::from_secs(5), connecting).await;
            assert!(!matches!(r, Ok(Ok(_))), "a foreign certificate got through");
        }
        end.close(0u32.into(), b"done");
    }
    // Every attempt reached the server (each was refused by it: the first
    // line is there), and only the first of the burst was logged at warn.
    let count = |log: &std::path::Path, needle: &str| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("WARN") && l.contains(needle))
            .count()
    };
    assert!(
        wait_log(&c.nodes[0].log, "refused a replication connection").await,
        "alpha never logged the refused handshakes"
    );
    assert!(
        wait_log(&witness.log, "witness: refused").await,
        "the witness never logged the refused handshakes"
    );
    let alpha = count(&c.nodes[0].log, "refused a replication connection");
    let w = count(&witness.log, "witness: refused");
    assert!(
        alpha <= 2 && w <= 2,
        "{attempts} refused handshakes each were logged {alpha} times by alpha and {w} times by the witness"
    );
    qemu_io(&c, 0, &["write -P 0x44 0 1M", "read -P 0x44 0 1M"]);
    assert_replicas_equal(&c).await;
}

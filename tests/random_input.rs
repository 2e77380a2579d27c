//! Randomized robustness: every decoder that sees bytes from outside the
//! process gets hundreds of thousands of random and mutated inputs and must
//! answer with a value or an error, never a panic; and real daemons fed
//! garbage on their NBD and control sockets keep serving.
//!
//! Seeded and deterministic: `BLKREP_FUZZ_SEED=N` changes the stream.

mod common;

use std::path::Path;

use blkrep::config::Config;
use blkrep::control::Request;
use blkrep::frontend::nbd::parse_request;
use blkrep::link::HelloMsg;
use blkrep::link::wire::{Header, Kind, decode_frame};
use blkrep::meta::activity_log::{AL_SLOT_BYTES, AlSnapshot};
use blkrep::meta::superblock::{SUPERBLOCK_BYTES, Superblock};
use blkrep::meta::{DiskState, Generations};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use blkrep::testkit::rng::SplitMix64 as Rng;

/// Mutations of valid inputs.
trait Mutate {
    fn mutate(&mut self, valid: &[u8]) -> Vec<u8>;
}

impl Mutate for Rng {
    /// Flips, overwrites, truncates or extends a valid input.
    fn mutate(&mut self, valid: &[u8]) -> Vec<u8> {
        let mut v = valid.to_vec();
        for _ in 0..1 + self.below(4) {
            match self.below(5) {
                0 if !v.is_empty() => {
                    let i = self.below(v.len() as u64) as usize;
                    v[i] ^= 1 << self.below(8);
                }
                1 if !v.is_empty() => {
                    let i = self.below(v.len() as u64) as usize;
                    v[i] = self.next_u64() as u8;
                }
                2 => v.truncate(self.below(v.len() as u64 + 1) as usize),
                3 => {
                    let n = self.below(64) as usize;
                    let extra = self.bytes(n);
                    v.extend_from_slice(&extra);
                }
                _ => {
                    // Re-checksum a mutated header so deeper checks are reached.
                    if v.len() >= 48 {
                        let crc = crc32fast::hash(&v[..44]);
                        v[44..48].copy_from_slice(&crc.to_le_bytes());
                    }
                }
            }
        }
        v
    }
}

/// A valid superblock (a primary's).
fn sample_superblock() -> Superblock {
    Superblock {
        seq: 3,
        volume_name: "vol".into(),
        data_bytes: 3 << 30,
        chunk_bytes: 65536,
        disk_state: DiskState::UpToDate,
        generations: Generations {
            current: 5,
            bitmap: 4,
            history: [3, 2, 1, 0],
            forced: 0,
        },
        attached: true,
        primary: true,
        record: Default::default(),
        boot_id: [9; 16],
        cache_lost: false,
    }
}

/// A valid activity-log snapshot.
fn sample_al() -> AlSnapshot {
    AlSnapshot {
        seq: 2,
        extent_bytes: 4 << 20,
        extents: vec![1, 2, 3],
    }
}

fn seed() -> u64 {
    std::env::var("BLKREP_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed)
}

#[test]
fn wire_decoder_never_panics() {
    let mut rng = Rng(seed());
    let mut valid = Vec::new();
    for kind in [
        Kind::Write,
        Kind::Ack,
        Kind::VolumeState,
        Kind::HashReply,
        Kind::ReadRequest,
    ] {
        let payload = match kind {
            Kind::Write => vec![7u8; 4096],
            Kind::VolumeState => {
                br#"{"volume":"v","index":0,"view":null,"sync_done":null}"#.to_vec()
            }
            Kind::HashReply => vec![1u8; 32],
            _ => vec![],
        };
        let mut f = Header::new(kind).encode(&payload).to_vec();
        f.extend_from_slice(&payload);
        valid.push(f);
    }
    let mut accepted = 0;
    for i in 0..200_000 {
        let input = if i % 4 == 0 {
            let n = rng.below(200) as usize;
            rng.bytes(n)
        } else {
            let v = &valid[i % valid.len()];
            rng.mutate(v)
        };
        if decode_frame(&input).is_ok() {
            accepted += 1;
        }
        let _ = Header::decode(&input);
    }
    // Some mutations (e.g. appended bytes) leave a valid frame: the decoder
    // is exercised on both paths.
    assert!(accepted > 0);
}

#[test]
fn nbd_request_parser_and_metadata_decoders_never_panic() {
    let mut rng = Rng(seed() ^ 1);
    for _ in 0..200_000 {
        let mut b = [0u8; 28];
        b.copy_from_slice(&rng.bytes(28));
        if rng.below(2) == 0 {
            b[0..4].copy_from_slice(&0x2560_9513u32.to_be_bytes());
        }
        let _ = parse_request(&b);
    }
    let sb = sample_superblock().encode().expect("encode");
    let al = sample_al().encode().expect("encode");
    for _ in 0..20_000 {
        let mut m = rng.mutate(&sb);
        m.resize(SUPERBLOCK_BYTES, 0);
        if let Ok(decoded) = Superblock::decode(&m) {
            // Whatever decodes must encode again (it is self-consistent).
            assert!(decoded.encode().is_ok());
        }
        let mut a = rng.mutate(&al);
        a.resize(AL_SLOT_BYTES, 0);
        let _ = AlSnapshot::decode(&a);
    }
}

#[test]
fn config_parser_never_panics() {
    let valid = CONFIG;
    assert!(Config::parse(valid, Path::new("t.toml")).is_ok());
    let mut rng = Rng(seed() ^ 2);
    for _ in 0..20_000 {
        let m = rng.mutate(valid.as_bytes());
        let text = String::from_utf8_lossy(&m);
        let _ = Config::parse(&text, Path::new("t.toml"));
    }
}

/// Garbage on the NBD socket and the control socket of a live daemon: each
/// session ends or gets an error; the daemon keeps serving, and the data is
/// untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_survive_garbage_on_their_sockets() {
    let c = up("garbage", small()).await;
    qemu_io(&c, 0, &["write -P 0x61 0 64k", "flush"]);
    let mut rng = Rng(seed() ^ 3);
    for i in 0..60 {
        let s = tokio::net::UnixStream::connect(c.nbd_socket(0))
            .await
            .expect("connect nbd");
        let (mut r, mut w) = s.into_split();
        let mut greeting = [0u8; 18];
        let _ = r.read_exact(&mut greeting).await;
        // Half the sessions speak a valid opening, then garbage.
        if i % 2 == 0 {
            let mut go = 3u32.to_be_bytes().to_vec();
            go.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
            go.extend_from_slice(&7u32.to_be_bytes());
            go.extend_from_slice(&8u32.to_be_bytes());
            go.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
            let _ = w.write_all(&go).await;
        }
        let n = 1 + rng.below(4096) as usize;
        let junk = rng.bytes(n);
        let _ = w.write_all(&junk).await;
        let _ = w.shutdown().await;
        let mut sink = Vec::new();
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(2), r.read_to_end(&mut sink)).await;
    }
    for _ in 0..40 {
        let s = tokio::net::UnixStream::connect(&c.nodes[0].control)
            .await
            .expect("connect control");
        let (mut r, mut w) = s.into_split();
        let n = 1 + rng.below(512) as usize;
        let mut junk = rng.bytes(n);
        junk.push(b'\n');
        let _ = w.write_all(&junk).await;
        let _ = w.shutdown().await;
        let mut answer = String::new();
        let _ = r.read_to_string(&mut answer).await;
        assert!(answer.contains("bad-request"), "{answer}");
    }
    // Still serving, data intact, replicas equal.
    c.status(0).await.expect("status");
    qemu_io(&c, 0, &["read -P 0x61 0 64k"]);
    assert!(c.ok(0, Request::Status { volume: None }).await.is_ok());
    assert_replicas_equal(&c).await;
}

/// Valid inputs for each fuzz target, made by the real encoders: the seeds
/// of `fuzz/corpus/<target>/`. `BLKREP_WRITE_FUZZ_SEEDS=1` (re)writes them;
/// otherwise the committed seeds must equal what this build encodes, so a
/// format change cannot leave the fuzzers starting from stale inputs.
fn fuzz_seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    use blkrep::witness::protocol::{WitnessOp, WitnessRequest, encode};
    let mut seeds = Vec::new();
    let mut seed =
        |target, name: &str, bytes: Vec<u8>| seeds.push((target, name.to_string(), bytes));
    for (name, kind, payload) in [
        ("write", Kind::Write, vec![7u8; 4096]),
        ("ack", Kind::Ack, vec![]),
        ("flush", Kind::Flush, vec![]),
        ("read-request", Kind::ReadRequest, vec![]),
        ("hash-reply", Kind::HashReply, vec![1u8; 32]),
        ("lease-ping", Kind::LeasePing, vec![]),
        (
            "volume-state",
            Kind::VolumeState,
            br#"{"volume":"v","index":0,"view":null,"sync_done":null}"#.to_vec(),
        ),
    ] {
        let mut h = Header::new(kind);
        h.offset = 65536;
        h.op_len = 4096;
        let mut f = h.encode(&payload).to_vec();
        f.extend_from_slice(&payload);
        seed("wire_frame", name, f);
    }
    let hello = HelloMsg {
        node: "alpha".into(),
        protocol: 1,
        lease_ms: Some(2000),
        inflight_requests_max: Some(512),
    };
    seed(
        "wire_frame",
        "hello",
        serde_json::to_vec(&hello).expect("hello"),
    );
    for (name, ty, flags) in [
        ("read", 0u16, 0u16),
        ("write-fua", 1, 1),
        ("flush", 3, 0),
        ("trim", 4, 0),
        ("zeroes", 6, 0),
        ("disc", 2, 0),
    ] {
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&ty.to_be_bytes());
        b.extend_from_slice(&7u64.to_be_bytes());
        b.extend_from_slice(&4096u64.to_be_bytes());
        b.extend_from_slice(&4096u32.to_be_bytes());
        seed("nbd_request", name, b);
    }
    seed("nbd_session", "go-write-read-flush", nbd_session_script());
    for (name, script) in blkrep::testkit::replica_session::seed_scripts() {
        seed(
            "replica_session",
            name,
            blkrep::testkit::replica_session::encode_script(&script),
        );
    }
    let sb = sample_superblock();
    seed(
        "metadata",
        "superblock",
        sb.encode().expect("superblock").to_vec(),
    );
    let al = sample_al();
    seed(
        "metadata",
        "activity-log",
        al.encode().expect("al").to_vec(),
    );
    let mut bitmap = blkrep::meta::bitmap::Bitmap::new(3 << 30, 65536);
    bitmap.set_range(1 << 20, 1 << 20);
    seed("metadata", "bitmap-page", bitmap.page_bytes(0).to_vec());
    seed("config", "node", CONFIG.as_bytes().to_vec());
    seed("config", "witness", WITNESS_CONFIG.as_bytes().to_vec());
    for (name, req) in [
        (
            "change",
            WitnessRequest::Change {
                volume: "v".into(),
                peer: "beta".into(),
                expected_epoch: 4,
                op: WitnessOp::Promote {
                    force: false,
                    incomplete: false,
                },
            },
        ),
        ("heartbeat", WitnessRequest::Heartbeat { claims: vec![] }),
    ] {
        seed("witness_frame", name, encode(&req).expect("witness frame"));
    }
    seed("witness_arbiter", "lifecycle", witness_script(false));
    seed(
        "witness_arbiter",
        "repromote-then-takeover",
        witness_script(true),
    );
    for (name, req) in [
        ("attach", Request::Attach { volume: "v".into() }),
        (
            "primary",
            Request::Primary {
                volume: "v".into(),
                force: true,
            },
        ),
        ("status", Request::Status { volume: None }),
    ] {
        let mut line = serde_json::to_vec(&req).expect("control request");
        line.push(b'\n');
        seed("control_request", name, line);
    }
    seeds
}

/// What a client sends in one NBD session, for the `nbd_session` target
/// (the bytes `testkit::nbd_client` and qemu send): fixed newstyle flags,
/// NBD_OPT_GO for the default export asking for block sizes, then a write,
/// a read, a flush, a write of zeroes, a trim and a disconnect.
fn nbd_session_script() -> Vec<u8> {
    const OPT_MAGIC: u64 = 0x4948_4156_454f_5054;
    const REQUEST_MAGIC: u32 = 0x2560_9513;
    let mut b = Vec::new();
    b.extend_from_slice(&3u32.to_be_bytes());
    b.extend_from_slice(&OPT_MAGIC.to_be_bytes());
    b.extend_from_slice(&7u32.to_be_bytes());
    b.extend_from_slice(&8u32.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    b.extend_from_slice(&1u16.to_be_bytes());
    b.extend_from_slice(&3u16.to_be_bytes());
    let mut request = |ty: u16, flags: u16, handle: u64, offset: u64, len: u32| {
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&ty.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        if ty == 1 {
            b.extend(std::iter::repeat_n(0xa5u8, len as usize));
        }
    };
    request(1, 1, 1, 8192, 4096);
    request(0, 0, 2, 8192, 4096);
    request(3, 0, 3, 0, 0);
    request(6, 0, 4, 65536, 8192);
    request(4, 0, 5, 1 << 20, 65536);
    request(2, 0, 6, 0, 0);
    b
}

/// A script for the `witness_arbiter` target (see its doc for the step
/// format): alpha creates volume v, heartbeats, outdates beta, restores
/// it, demotes, and beta takes over; with `takeover`, alpha promotes again
/// while primary and beta forces a takeover 300 ms after alpha's first
/// lease would have ended (the lease alpha counts from its second grant
/// still runs).
fn witness_script(takeover: bool) -> Vec<u8> {
    use blkrep::quorum::{Holder, RecordView};
    use blkrep::witness::protocol::{Claim, WitnessOp, WitnessRequest};
    let mut out = Vec::new();
    let mut step = |node: u8, advance_25ms: u8, req: WitnessRequest| {
        let body = serde_json::to_vec(&req).expect("witness request");
        out.push(node);
        out.push(advance_25ms);
        out.extend_from_slice(&(body.len() as u16).to_le_bytes());
        out.extend_from_slice(&body);
    };
    let change = |peer: &str, expected_epoch: u64, op: WitnessOp| WitnessRequest::Change {
        volume: "v".into(),
        peer: peer.into(),
        expected_epoch,
        op,
    };
    let (alpha, beta) = (0u8, 1u8);
    let forced = WitnessOp::Promote {
        force: true,
        incomplete: true,
    };
    let promote = WitnessOp::Promote {
        force: false,
        incomplete: false,
    };
    // (A new witness first waits out any lease it may have granted before
    // it started: 2.2 s.)
    step(alpha, 90, change("beta", 0, forced));
    let claim = |epoch, peer: &str| WitnessRequest::Heartbeat {
        claims: vec![Claim {
            volume: "v".into(),
            peer: peer.into(),
            view: RecordView {
                epoch,
                primary: Holder::Me,
                me_up_to_date: true,
                peer_up_to_date: false,
                forced: true,
            },
            primary_now: true,
        }],
    };
    step(alpha, 4, claim(1, "beta"));
    step(alpha, 4, change("beta", 1, WitnessOp::Outdate));
    step(alpha, 4, change("beta", 1, WitnessOp::Restore));
    if takeover {
        step(alpha, 80, change("beta", 2, promote));
        step(beta, 12, change("alpha", 2, promote));
    } else {
        step(alpha, 4, change("beta", 2, WitnessOp::Demote));
        step(beta, 4, change("alpha", 3, promote));
        // The witness restarts; beta's lease is assumed to run.
        step(0x80 | alpha, 4, change("beta", 4, forced));
        step(alpha, 100, change("beta", 4, forced));
    }
    out
}

const CONFIG: &str = r#"
node = "alpha"
[tls]
ca = "ca.pem"
cert = "a.pem"
key = "a.key"
[link]
peer_timeout_ms = 3000
[nodes.alpha]
address = "127.0.0.1:7788"
[nodes.beta]
address = "127.0.0.2:7788"
[witness]
name = "w"
address = "127.0.0.3:7790"
[[volume]]
name = "vm-1"
chunk_bytes = 65536
al_extents = 100
nodes.alpha = { disk = "/tmp/a.img" }
nodes.beta = { disk = "/tmp/b.img", meta = "/tmp/b.meta" }
"#;

const WITNESS_CONFIG: &str = r#"
node = "w"
listen = "127.0.0.3:7790"
state_dir = "/var/lib/blkrep-witness"
nodes = ["alpha", "beta"]
[tls]
ca = "ca.pem"
cert = "w.pem"
key = "w.key"
"#;

#[test]
fn fuzz_seed_corpus_is_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let write = std::env::var_os("BLKREP_WRITE_FUZZ_SEEDS").is_some();
    for (target, name, bytes) in fuzz_seeds() {
        let path = root.join(target).join(format!("seed-{name}"));
        if write {
            std::fs::create_dir_all(root.join(target)).expect("corpus dir");
            std::fs::write(&path, &bytes).expect("write seed");
            continue;
        }
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            committed == bytes,
            "{} is missing or stale: run BLKREP_WRITE_FUZZ_SEEDS=1 cargo test --test random_input fuzz_seed",
            path.display()
        );
    }
    // The seeds are valid inputs for their decoders.
    if let Err(e) = Config::parse(CONFIG, Path::new("t.toml")) {
        panic!("{e}");
    }
    if let Err(e) = blkrep::config::WitnessConfig::parse(WITNESS_CONFIG, Path::new("w.toml")) {
        panic!("{e}");
    }
}

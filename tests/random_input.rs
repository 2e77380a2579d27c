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
    let sb = Superblock {
        seq: 3,
        volume_name: "vol".into(),
        data_bytes: 1 << 30,
        chunk_bytes: 65536,
        disk_state: DiskState::UpToDate,
        generations: Generations {
            current: 5,
            bitmap: 4,
            history: [3, 2, 1, 0],
        },
        attached: true,
        primary: false,
        record: Default::default(),
    }
    .encode()
    .expect("encode");
    let al = AlSnapshot {
        seq: 2,
        extent_bytes: 4 << 20,
        extents: vec![1, 2, 3],
    }
    .encode()
    .expect("encode");
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
    let valid = r#"
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
[[volume]]
name = "vm-1"
chunk_bytes = 65536
al_extents = 100
nodes.alpha = { disk = "/tmp/a.img" }
nodes.beta = { disk = "/tmp/b.img", meta = "/tmp/b.meta" }
"#;
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

//! Micro-benchmarks of the pieces on the write path: wire codec, payload
//! checksum, bitmap marking, one engine step, and the cross-thread hand-off
//! the ublk frontend uses (a thread asleep in io_uring_enter with an eventfd
//! read armed, woken by a tokio task that completed its request).
//!
//! Run: `cargo bench --bench micro`.

use std::hint::black_box;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};

use blkrep::engine::{Action, Engine, EngineConfig, NodeView, Op, Range, Role};
use blkrep::link::wire::{Header, Kind, decode_frame};
use blkrep::meta::{Bitmap, DiskState, Generations};
use criterion::{Criterion, criterion_group, criterion_main};

fn codec(c: &mut Criterion) {
    let payload = vec![0x5au8; 4096];
    let mut h = Header::new(Kind::Write);
    h.offset = 1 << 20;
    c.bench_function("wire encode+decode 4KiB write", |b| {
        b.iter(|| {
            let mut f = h.encode(black_box(&payload)).to_vec();
            f.extend_from_slice(&payload);
            black_box(decode_frame(&f).map(|(h, _)| h.offset).unwrap_or(0))
        })
    });
    let big = vec![0xa5u8; 1 << 20];
    c.bench_function("crc32 1MiB", |b| {
        b.iter(|| crc32fast::hash(black_box(&big)))
    });
}

fn bitmap(c: &mut Criterion) {
    let mut bm = Bitmap::new(1 << 40, 65536);
    let mut x = 1u64;
    c.bench_function("bitmap set_range 4KiB (1 TiB volume)", |b| {
        b.iter(|| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            black_box(bm.set_range((x % (1 << 28)) * 4096, 4096))
        })
    });
}

fn engine_step(c: &mut Criterion) {
    let cfg = EngineConfig {
        data_bytes: 1 << 30,
        chunk_bytes: 65536,
        tie_winner: true,
        al_extent_bytes: 4 << 20,
        al_extents: 1000,
        quorum: None,
        volatile_cache: true,
        client_requests_max: 256,
    };
    let gens = Generations {
        current: 7,
        ..Default::default()
    };
    let mut e = Engine::new(
        cfg,
        DiskState::UpToDate,
        gens,
        Bitmap::new(1 << 30, 65536),
        1,
    );
    e.peer_state(NodeView {
        role: Role::Secondary,
        disk: DiskState::UpToDate,
        generations: gens,
        data_bytes: 1 << 30,
        chunk_bytes: 65536,
        dirty_chunks: 0,
        sync_target: false,
        full_sync_base: 0,
        record: Default::default(),
        cache_lost: false,
        volatile_cache: true,
    });
    let _ = e.promote(false);
    settle(&mut e);
    let mut id = 0u64;
    c.bench_function("engine: replicated 4KiB write, submit to complete", |b| {
        b.iter(|| {
            id += 1;
            e.submit(
                id,
                Op::Write { fua: false },
                Range::new((id % 1000) * 4096, 4096),
            );
            e.local_done(id, true);
            e.peer_done(id, true);
            black_box(settle(&mut e))
        })
    });
}

/// Carries out the engine's actions as a shell whose disks answer at once
/// would: metadata writes are durable (each reported with its own token),
/// and the engine's own flushes (bounded unflushed writes) finish on both
/// copies. Returns whether a request completed.
fn settle(e: &mut Engine) -> bool {
    let mut done = false;
    loop {
        let mut tokens = Vec::new();
        let mut flushes = Vec::new();
        while let Some(a) = e.poll_action() {
            match a {
                Action::Complete { .. } => done = true,
                Action::PersistMeta { token, .. } => tokens.push(token),
                Action::LocalIo {
                    id, op: Op::Flush, ..
                } => flushes.push(id),
                _ => {}
            }
        }
        if tokens.is_empty() && flushes.is_empty() {
            return done;
        }
        for t in tokens {
            e.meta_persisted(t);
        }
        for f in flushes {
            e.local_done(f, true);
            e.peer_done(f, true);
        }
    }
}

fn handoff(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let mut ring = io_uring::IoUring::new(8).expect("io_uring");
    // SAFETY: eventfd has no memory-safety preconditions.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: raw was just returned by eventfd and is owned by nobody else.
    let efd = std::sync::Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
    let mut buf = [0u8; 8];
    c.bench_function(
        "hand-off: queue thread -> tokio task -> eventfd wake",
        |b| {
            b.iter(|| {
                let read = io_uring::opcode::Read::new(
                    io_uring::types::Fd(efd.as_raw_fd()),
                    buf.as_mut_ptr(),
                    8,
                )
                .build()
                .user_data(1);
                // SAFETY: buf outlives the read, which completes before the next
                // iteration re-arms it.
                unsafe { ring.submission().push(&read) }.expect("sq");
                let (tx, mut rx) = tokio::sync::oneshot::channel::<u64>();
                let e = efd.clone();
                rt.spawn(async move {
                    let _ = tx.send(42);
                    let one: u64 = 1;
                    // SAFETY: writes 8 bytes from a live u64 to an eventfd.
                    let _ = unsafe {
                        libc::write(e.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8)
                    };
                });
                ring.submit_and_wait(1).expect("wait");
                ring.completion().for_each(drop);
                black_box(rx.try_recv().unwrap_or(0))
            })
        },
    );
}

criterion_group!(benches, codec, bitmap, engine_step, handoff);
criterion_main!(benches);

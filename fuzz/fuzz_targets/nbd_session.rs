//! One NBD client connection, any bytes, against the real server and a real
//! volume (the shell, the engine and io_uring O_DIRECT on a file): the
//! input is everything the client sends, from the handshake on, and the
//! server's replies are read as they come. After every input it checks
//! that the server ended the connection (no hang: the client's end of
//! input is an EOF), that every byte of the volume's client budget came
//! back (a client that leaked it would starve the others), and that the
//! volume still serves a write and reads it back.
#![no_main]

use std::sync::OnceLock;

use blkrep::frontend::nbd::serve_connection;
use blkrep::store::AlignedBuf;
use blkrep::volume::{CLIENT_INFLIGHT_BYTES_MAX, VolumeHandle};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const VOLUME_BYTES: u64 = 16 << 20;

struct Fixture {
    runtime: tokio::runtime::Runtime,
    volume: VolumeHandle,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = blkrep::testkit::standalone::fuzz_runtime().expect("runtime");
        let disk = std::env::temp_dir().join(format!("blkrep-fuzz-nbd-{}.img", std::process::id()));
        let volume = runtime
            .block_on(blkrep::testkit::standalone::primary_on_file(
                &disk,
                "fuzz",
                VOLUME_BYTES,
            ))
            .expect("a standalone volume");
        Fixture { runtime, volume }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    f.runtime.block_on(async {
        let (client, server) = tokio::net::UnixStream::pair().expect("socket pair");
        let served = tokio::spawn(serve_connection(server, f.volume.clone()));
        let (mut from_server, mut to_server) = client.into_split();
        let drain = tokio::spawn(async move {
            let mut sink = vec![0u8; 64 << 10];
            while matches!(from_server.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        // The server may close early (a protocol error): then writing fails.
        let _ = to_server.write_all(data).await;
        let _ = to_server.shutdown().await;
        let ended = tokio::time::timeout(std::time::Duration::from_secs(20), served).await;
        assert!(
            ended.is_ok(),
            "the server did not end the connection after EOF"
        );
        drop(to_server);
        let _ = drain.await;
        assert_eq!(
            f.volume.client_bytes_available(),
            CLIENT_INFLIGHT_BYTES_MAX,
            "the connection kept part of the volume's client budget"
        );
        // The last 4 KiB of the data area (the metadata follows it).
        let last = f.volume.size_bytes() - 4096;
        let mut buf = AlignedBuf::zeroed(4096);
        buf.as_mut_slice().fill(0x5a);
        f.volume
            .write(last, buf, false)
            .await
            .expect("the volume still takes writes");
        let back = f
            .volume
            .read(last, 4096)
            .await
            .expect("the volume still serves reads");
        assert!(back.as_slice().iter().all(|&b| b == 0x5a));
    });
});

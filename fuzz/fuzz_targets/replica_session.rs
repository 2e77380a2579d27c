//! The replica side of the link, stateful: the input is a script for a
//! peer node (`blkrep::testkit::replica_session`: announce states, send
//! data frames with chosen flags, indexes, offsets and lengths, wait,
//! garble the stream, disconnect) that runs over a real QUIC connection
//! with mutual TLS against a node's real link and a fresh secondary volume
//! (shell, engine, io_uring O_DIRECT on a file). After each script the
//! volume is detached and its data area read back: every sector must be
//! zero or hold what a write frame wholly inside the data area carried
//! there. A panic also means the node hung (no hello, no volume state, a
//! connection it kept after the close) or refused to detach.
#![no_main]

use std::sync::OnceLock;

use blkrep::testkit::replica_session::{ReplicaFixture, decode_script};
use libfuzzer_sys::fuzz_target;

struct Fixture {
    runtime: tokio::runtime::Runtime,
    node: ReplicaFixture,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = blkrep::testkit::standalone::fuzz_runtime().expect("runtime");
        let dir = std::env::temp_dir().join(format!("blkrep-fuzz-replica-{}", std::process::id()));
        let node = runtime
            .block_on(async { ReplicaFixture::start(&dir) })
            .expect("the node and its link");
        Fixture { runtime, node }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let steps = decode_script(data);
    if let Err(stray) = f.runtime.block_on(f.node.run(&steps)) {
        panic!("{stray} (script: {steps:?})");
    }
});

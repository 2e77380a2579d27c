//! The replication link's frame decoder and the JSON messages it carries:
//! any bytes from a peer give a frame or an error, never a panic.
#![no_main]

use blkrep::link::wire::{Header, Kind, decode_frame};
use blkrep::link::{HelloMsg, PeerTerms, VolumeStateMsg};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Header::decode(data);
    if let Ok((header, payload)) = decode_frame(data) {
        let _ = header.verify_payload(payload);
        if header.kind == Kind::VolumeState {
            let _ = serde_json::from_slice::<VolumeStateMsg>(payload);
        }
    }
    if let Ok(hello) = serde_json::from_slice::<HelloMsg>(data) {
        let _ = PeerTerms::of(&hello);
    }
});

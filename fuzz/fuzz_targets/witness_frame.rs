//! The witness protocol's frames (length, JSON, CRC32) in both directions:
//! any bytes give a message or an error, never a panic.
#![no_main]

use blkrep::witness::protocol::{WitnessRequest, WitnessResponse, body_len, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(head) = data.get(..4).and_then(|h| <[u8; 4]>::try_from(h).ok()) {
        let _ = body_len(head);
    }
    let _ = decode::<WitnessRequest>(data);
    let _ = decode::<WitnessResponse>(data);
});

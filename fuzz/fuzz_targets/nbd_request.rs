//! The NBD transmission-phase request parser: any 28 bytes from a client
//! give a request or an error, never a panic.
#![no_main]

use blkrep::frontend::nbd::parse_request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for chunk in data.chunks_exact(28) {
        if let Ok(b) = <&[u8; 28]>::try_from(chunk) {
            let _ = parse_request(b);
        }
    }
});

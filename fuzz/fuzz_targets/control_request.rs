//! Control-socket requests (one JSON line each): any line gives a request
//! or an error, never a panic.
#![no_main]

use blkrep::control::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(line) = std::str::from_utf8(data) {
        let _ = serde_json::from_str::<Request>(line.trim_end());
    }
});

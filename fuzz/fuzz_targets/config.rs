//! The node and witness configuration parsers: any text gives a config or
//! an error naming the problem, never a panic.
#![no_main]

use std::path::Path;

use blkrep::config::{Config, WitnessConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = Config::parse(&text, Path::new("fuzz.toml"));
    let _ = WitnessConfig::parse(&text, Path::new("fuzz.toml"));
});

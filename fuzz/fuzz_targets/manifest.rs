//! `cargo fuzz run manifest`: see `sluice_fuzz::manifest`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz::manifest(data));

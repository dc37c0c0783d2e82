//! `cargo fuzz run tar_guard`: see `sluice_fuzz::tar_guard`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz::tar_guard(data));

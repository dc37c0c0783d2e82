//! `cargo fuzz run grubenv`: see `sluice_fuzz::grubenv`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz::grubenv(data));

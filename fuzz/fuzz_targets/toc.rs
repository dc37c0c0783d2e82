//! `cargo fuzz run toc`: see `sluice_fuzz::toc`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz::toc(data));

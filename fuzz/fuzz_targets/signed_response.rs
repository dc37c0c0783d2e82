//! `cargo fuzz run signed_response`: see `sluice_fuzz::signed_response`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz::signed_response(data));

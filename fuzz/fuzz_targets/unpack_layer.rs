//! `cargo fuzz run unpack_layer`: see `sluice_fuzz::unpack_layer`.
#![no_main]

libfuzzer_sys::fuzz_target!(
    init: {
        // A layer that writes past the unpack cap (a bomb that gets by it)
        // stops at this file size with SIGXFSZ, which libFuzzer reports as a
        // crash, instead of filling the disk.
        let limit = rustix::process::Rlimit {
            current: Some(64 << 20),
            maximum: rustix::process::getrlimit(rustix::process::Resource::Fsize).maximum,
        };
        rustix::process::setrlimit(rustix::process::Resource::Fsize, limit)
            .expect("limiting file sizes");
    },
    |data: &[u8]| sluice_fuzz::unpack_layer(data)
);

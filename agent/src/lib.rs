//! The Sluice device agent: asks the server which image to run, verifies the
//! signed answer and the image, writes it into the inactive A/B slot, switches
//! GRUB and assesses the new slot after boot.
#![deny(unsafe_code)]
#![warn(missing_docs)]
#![forbid(unused_must_use)]

pub mod agent;
pub mod bootloader;
pub mod chunked;
pub mod client;
pub mod config;
pub mod failpoint;
pub mod fsutil;
pub mod identity;
pub mod pipeline;
pub mod registry;
pub mod slot;
pub mod state;
pub mod trust;
pub mod unpack;

/// One log line on stderr (journald adds the time).
pub fn log(msg: &str) {
    eprintln!("sluice-agent: {msg}");
}

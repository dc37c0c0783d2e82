//! The Sluice server: publishes, signs and rolls out OS image releases, and
//! answers devices which image to run.
#![deny(unsafe_code)]
#![warn(missing_docs)]
#![forbid(unused_must_use)]

pub mod api;
pub mod app;
pub mod bench;
pub mod config;
pub mod db;
pub mod error;
pub mod infra;
pub mod paging;
pub mod resolve;
pub mod rules;

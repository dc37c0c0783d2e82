//! The Sluice server: publishes, signs and rolls out OS image releases, and
//! answers devices which image to run.
#![deny(unsafe_code)]
#![warn(missing_docs)]
#![forbid(unused_must_use)]

pub mod app;
pub mod audit;
pub mod auth;
pub mod bench;
pub mod channels;
pub mod config;
pub mod db;
pub mod devices;
pub mod error;
pub mod health;
pub mod keys;
pub mod paging;
pub mod products;
pub mod ratelimit;
pub mod registry;
pub mod releases;
pub mod resolve;
pub mod revocations;
pub mod rules;
pub mod signing;
pub mod stats;
pub mod tls;
pub mod tokens;
pub mod transfer;

//! The REST API, one module per resource: each holds its request and answer
//! types, its handlers and their queries. A handler checks who calls (the
//! extractors of [`auth`]), loads what the rules need, calls a pure rule in
//! `rules/`, stores the result and records it (`audit`, the channel's
//! history) in one transaction. The device-facing hot path is `resolve/`.

pub mod audit;
pub mod auth;
pub mod channels;
pub mod devices;
pub mod fleetlock;
pub mod health;
pub mod keys;
pub mod products;
pub mod releases;
pub mod stats;
pub mod tokens;
pub mod transfer;

//! The server's integration tests, one binary with one module per area (a
//! binary per file would link the whole server fifteen times). Each test
//! gets its own database from `#[sqlx::test]` and its own server on a free
//! loopback port, so they run in parallel. Run one area with
//! `cargo test -p sluice-server --test it e2e::`.

#[path = "../common/mod.rs"]
mod common;

mod api;
mod authz;
mod cli;
mod e2e;
mod faults;
mod fleet_policy;
mod fleetlock;
mod gate;
mod head_status;
mod identity;
mod keys;
mod openapi;
mod registry;
mod replicas;
mod run_script;
mod stats;
mod tls;
mod web;

//! The end-to-end tests, one binary with one module per area (a binary per
//! file would link the server and the agent's library six times): the real
//! server, the real `sluice-agent` binary, PostgreSQL, the registry, and in
//! `vm` and `derivative` real QEMU machines, at most one per core
//! ([`machine::machine_slot`]). Run one area with
//! `cargo test -p sluice-tests --test it vm::`.

#[path = "../../../server/tests/common/mod.rs"]
mod common;
mod kit;
mod machine;

mod agent;
mod balancer;
mod derivative;
mod identity;
mod tls;
mod trust;
mod vm;

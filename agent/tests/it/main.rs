//! The agent's integration tests, one binary with one module per area (a
//! binary per file would link the agent's library and its test helpers seven
//! times). Crash injection (`failpoint`) is armed per thread and the model's
//! panic hook quiets only its own crashes, so the areas run side by side.
//! Run one area with `cargo test -p sluice-agent --test it model::`.

mod common;

mod docs_examples;
mod fuzz_corpus;
mod grubenv;
mod hostile_layers;
mod model;
mod reboot_policy;
mod upgrade;
mod verify_slot;

//! The rules, with no I/O: which release a device should run
//! ([`rollout`]) and how a channel's state changes ([`channel`]). Handlers
//! load what these need, call them, store the result and record it.

pub mod channel;
pub mod rollout;

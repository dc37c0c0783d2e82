//! The rules, with no I/O: which release a device should run
//! ([`rollout`]), how a channel's state changes ([`channel`]) and which
//! names and versions are valid ([`names`]). Handlers
//! load what these need, call them, store the result and record it.

pub mod channel;
pub mod names;
pub mod rollout;

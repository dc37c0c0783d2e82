//! The rules, with no I/O: which release a device should run
//! ([`rollout`]), how a channel's state changes ([`channel`]), the fleet
//! policy (label selectors, waves, maintenance windows, reboot leases:
//! [`policy`]) and which names and versions are valid ([`names`]). Handlers
//! load what these need, call them, store the result and record it.

pub mod channel;
pub mod names;
pub mod policy;
pub mod rollout;

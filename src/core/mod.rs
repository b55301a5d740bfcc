//! The deterministic core of banditflow: events, attribution join, bandit models, snapshots
//! and the ranking policy.
//!
//! Rules (checked by `tests/tidy.rs`): no I/O, no clock, no unseeded randomness, no async
//! runtime, no Kafka, no metrics, no logging. Time and random seeds come in as arguments; the
//! core returns values and the edges act on them. Nothing here panics on outside data.

pub mod armlog;
mod beta;
pub mod blob;
pub mod buffer;
pub mod checkpoint;
pub mod decay;
pub mod event;
pub mod examination;
pub mod join;
pub mod linear;
pub mod model;
pub mod ope;
pub mod params;
pub mod partition;
pub mod pb;
pub mod policy;
pub mod prior;
pub mod reconfigure;
pub mod snapshot;
mod wire;

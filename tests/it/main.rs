//! The integration tests, as one binary (one link, shared helpers).

mod alignment;
mod bad_input;
mod changelog;
mod cluster;
mod formats;
mod fuzz_corpus;
mod golden;
mod hardening;
mod isolation;
mod join;
mod kafka;
mod lift;
mod memory;
mod network;
mod ope;
mod operations;
mod policy;
mod properties;
mod readme;
mod serving;
mod snapshot;
mod soak;
mod support;
mod telemetry;
mod tidy;
mod truth;

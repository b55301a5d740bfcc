//! banditflow: learns position-aware bandit rankings from impressions and shopper feedback on
//! Kafka, and publishes model snapshots for serving nodes.
//!
//! `core` is pure and deterministic; everything else is an edge (config files, recordings,
//! the offline replay, the synthetic shop, and later the Kafka service).

pub mod config;
pub mod core;
pub mod demo;
pub mod evaluate;
pub mod fuzzing;
pub mod generate;
pub mod kafka;
pub mod recording;
pub mod replay;
pub mod serving;
pub mod simulate;
pub mod telemetry;

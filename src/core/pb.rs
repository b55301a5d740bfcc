//! Generated protobuf types of the `banditflow.v1` contract (see `proto/`).
#![allow(missing_docs, clippy::all, clippy::pedantic)]
include!(concat!(env!("OUT_DIR"), "/banditflow.v1.rs"));

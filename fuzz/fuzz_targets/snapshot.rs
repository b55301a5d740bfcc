#![no_main]
//! See `banditflow::fuzzing::snapshot`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| banditflow::fuzzing::snapshot(data));

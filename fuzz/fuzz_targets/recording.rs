#![no_main]
//! See `banditflow::fuzzing::recording`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| banditflow::fuzzing::recording(data));

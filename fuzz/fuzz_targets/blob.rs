#![no_main]
//! See `banditflow::fuzzing::blob`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| banditflow::fuzzing::blob(data));

#![no_main]
//! See `banditflow::fuzzing::event`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| banditflow::fuzzing::event(data));

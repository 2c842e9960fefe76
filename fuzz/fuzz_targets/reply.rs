//! libFuzzer entry point; the checks live in `popgate_fuzz::reply`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| popgate_fuzz::reply::check(data));

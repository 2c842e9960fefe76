//! libFuzzer entry point; the checks live in `popgate_fuzz::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| popgate_fuzz::config::check(data));

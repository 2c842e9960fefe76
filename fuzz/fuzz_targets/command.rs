//! libFuzzer entry point; the checks live in `popgate_fuzz::command`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| popgate_fuzz::command::check(data));

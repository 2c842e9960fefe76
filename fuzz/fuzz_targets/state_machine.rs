//! libFuzzer entry point; the checks live in `popgate_fuzz::state_machine`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| popgate_fuzz::state_machine::check(data));

//! libFuzzer entry point; the checks live in `popgate_fuzz::sasl`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| popgate_fuzz::sasl::check(data));

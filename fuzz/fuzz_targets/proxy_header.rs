//! libFuzzer entry point; the checks live in `popgate_fuzz::proxy_header`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| popgate_fuzz::proxy_header::check(data));

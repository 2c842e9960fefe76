//! libFuzzer entry point; the checks live in `popgate_fuzz::login_name`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| popgate_fuzz::login_name::check(data));

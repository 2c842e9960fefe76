//! libFuzzer entry point; the checks live in `popgate_fuzz::line_framer`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| popgate_fuzz::line_framer::check(data));

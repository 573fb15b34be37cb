#![no_main]
//! Thin libFuzzer entry; the body (and its properties) lives in `vmbus_fuzz::channel_msg`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmbus_fuzz::channel_msg(data));

#![no_main]
//! Thin libFuzzer entry; the body (and its properties) lives in `vmbus_fuzz::vhost_chain`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmbus_fuzz::vhost_chain(data));

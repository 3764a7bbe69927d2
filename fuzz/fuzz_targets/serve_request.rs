//! Fuzz target `serve_request`: see `imageupd::fuzzing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    imageupd::fuzzing::run("serve_request", data);
});

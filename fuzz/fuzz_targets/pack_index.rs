//! Fuzz target `pack_index`: see `imageupd::fuzzing`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    imageupd::fuzzing::run("pack_index", data);
});

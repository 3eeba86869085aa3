//! Fuzz target: `weft_ipam::fuzzing::subnet_key`, a lease key (`LeaseKey::from_str`), asserting that whatever parses
//! round-trips and is valid (see src/fuzzing.rs). Seeds: ../tests/corpus/subnet_key.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = weft_ipam::fuzzing::subnet_key(data);
});

//! Fuzz target: `weft_ipam::fuzzing::lease_json`, a lease value as stored in etcd
//! (`LeaseAttrs::from_json`), asserting that whatever parses
//! round-trips and is valid (see src/fuzzing.rs). Seeds: ../tests/corpus/lease_json.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = weft_ipam::fuzzing::lease_json(data);
});

//! Fuzz target: `weft_ipam::fuzzing::net_conf`, flannel's net-conf JSON
//! (`NetworkConfig::from_json`), asserting that whatever parses
//! round-trips and is valid (see src/fuzzing.rs). Seeds: ../tests/corpus/net_conf.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = weft_ipam::fuzzing::net_conf(data);
});

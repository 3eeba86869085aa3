//! Fuzz target: `weft_forwarder::fuzzing::decap_udp`, which asserts the decapsulation properties
//! (see src/fuzzing.rs). Seed corpus: ../tests/corpus/.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = weft_forwarder::fuzzing::decap_udp(data);
});

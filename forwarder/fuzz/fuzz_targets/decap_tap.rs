//! Fuzz target: `weft_forwarder::fuzzing::decap_tap`, a VXLAN datagram in TAP mode,
//! asserting the delivered-frame properties (see src/fuzzing.rs). Seeds: ../tests/corpus/tap
//! and ../tests/corpus/vxlan.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = weft_forwarder::fuzzing::decap_tap(data);
});

//! Fuzz target: `weft_forwarder::fuzzing::merge_underlay`, a run of received datagrams
//! merged for the TUN, asserting each merged super-packet is valid IP behind a consistent
//! virtio-net header that gso cuts back into the same payloads (see src/fuzzing.rs).
//! Seeds: ../tests/corpus/gro.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = weft_forwarder::fuzzing::merge_underlay(data);
});

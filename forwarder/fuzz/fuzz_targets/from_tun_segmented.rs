//! Fuzz target: `weft_forwarder::fuzzing::from_tun_segmented`, a TUN read with a virtio-net
//! header (TSO/USO super-packets), asserting every segment is well-formed, within the path
//! MTU, checksums verify and the peer accepts it (see src/fuzzing.rs). Seeds: ../tests/corpus/gso.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = weft_forwarder::fuzzing::from_tun_segmented(data);
});

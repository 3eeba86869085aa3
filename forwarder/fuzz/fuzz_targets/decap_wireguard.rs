//! Fuzz target: `weft_forwarder::fuzzing::decap_wireguard`, a WireGuard data path between two
//! nodes with a session: raw datagrams, packets A sends, bytes A seals, tampered copies, replays,
//! each checked against a model of the receive path on a reference cipher (see src/fuzzing.rs).
//! Seeds: ../tests/corpus/wireguard.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = weft_forwarder::fuzzing::decap_wireguard(data);
});

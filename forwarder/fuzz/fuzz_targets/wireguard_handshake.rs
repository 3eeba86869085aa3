//! Fuzz target: `weft_forwarder::fuzzing::wireguard_handshake`, arbitrary and tampered handshake
//! messages against a responder and an initiator with an initiation pending: only the real ones
//! complete (see src/fuzzing.rs). Seeds: ../tests/corpus/wg_handshake.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = weft_forwarder::fuzzing::wireguard_handshake(data);
});

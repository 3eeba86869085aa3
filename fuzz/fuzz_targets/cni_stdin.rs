//! Fuzz target: `weft::cni::fuzzing::cni_stdin`, the CNI network configuration on stdin (and,
//! after a NUL byte, the environment), asserting that refusals are CNI errors with stable
//! codes and accepted inputs are safe and round-trip (see src/cni/fuzzing.rs).
//! Seeds: ../tests/corpus/cni_stdin.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = weft::cni::fuzzing::cni_stdin(data);
});

//! Replays the fuzz seed corpus (tests/corpus/, see its README) through the fuzz bodies in
//! `weft_ipam::fuzzing`, so every `cargo test` checks their round-trip properties over
//! flannel's own lease values, keys and net-confs.

// Test helpers outside #[test] fns: an unreadable corpus must fail the test loudly.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use weft_ipam::fuzzing;

fn corpus(dir: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus").join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json" || x == "txt" || x == "bin"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus in {}", dir.display());
    files
}

/// Runs `body` over every seed, every prefix of it, and every seed with one byte changed, so
/// truncation and single-byte corruption anywhere are exercised too.
fn replay(dir: &str, body: fn(&[u8]) -> bool, accepted: &[&str]) {
    for (name, data) in corpus(dir) {
        let parsed = body(&data);
        assert_eq!(parsed, accepted.contains(&name.as_str()), "{dir}/{name}");
        for cut in 0..data.len() {
            let _ = body(&data[..cut]);
        }
        for i in 0..data.len() {
            let mut d = data.clone();
            d[i] ^= 0x01;
            let _ = body(&d);
        }
    }
}

#[test]
fn lease_json_corpus_round_trips() {
    let accepted = [
        "crash_float_roundtrip.json",
        "flannel_dual_stack.json",
        "flannel_udp_bare.json",
        "flannel_vxlan.json",
        "unknown_fields.json",
        "weft_udp.json",
    ];
    replay("lease_json", fuzzing::lease_json, &accepted);
}

#[test]
fn subnet_key_corpus_round_trips() {
    replay("subnet_key", fuzzing::subnet_key, &["dual_stack.txt", "v4.txt", "zero.txt"]);
}

#[test]
fn net_conf_corpus_round_trips() {
    let accepted = [
        "crash_float_roundtrip.json",
        "dual_stack.json",
        "flannel_default.json",
        "flannel_doc_udp.json",
        "passthrough.json",
        "smallest.json",
    ];
    replay("net_conf", fuzzing::net_conf, &accepted);
}

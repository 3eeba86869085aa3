//! Replays the fuzz seed corpus (tests/corpus/, see its README) through the fuzz bodies, so
//! every `cargo test` runs the properties they assert over real and crafted frames.

// Test helpers outside #[test] fns: an unreadable corpus must fail the test loudly.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use weft_forwarder::UnderlayVerdict;
use weft_forwarder::fuzzing;

fn corpus(dir: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus").join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus in {}", dir.display());
    files
}

#[test]
fn vxlan_corpus_replays_and_linux_frames_are_accepted() {
    for (name, data) in corpus("vxlan") {
        let v = fuzzing::decap_vxlan(&data);
        match name.as_str() {
            "linux_icmp_echo_request.bin" | "linux_tcp_syn.bin" => {
                assert!(matches!(v, UnderlayVerdict::Deliver { .. }), "{name}: {v:?}")
            }
            "linux_arp_request.bin" => assert!(matches!(v, UnderlayVerdict::Reply { .. }), "{name}: {v:?}"),
            _ => {}
        }
        // Every prefix too: truncation anywhere must be handled.
        for cut in 0..data.len() {
            let _ = fuzzing::decap_vxlan(&data[..cut]);
        }
        // Inner frames as if read from a TUN.
        if data.len() > 22 {
            let _ = fuzzing::from_tun_vxlan(&data[22..]);
        }
    }
}

#[test]
fn udp_corpus_replays() {
    for (name, data) in corpus("udp") {
        let v = fuzzing::decap_udp(&data);
        if name == "echo_request.bin" {
            assert!(matches!(v, UnderlayVerdict::Deliver { .. }), "{name}: {v:?}");
        } else {
            assert!(matches!(v, UnderlayVerdict::Drop(_)), "{name}: {v:?}");
        }
        for cut in 0..data.len() {
            let _ = fuzzing::decap_udp(&data[..cut]);
        }
    }
}

#[test]
fn tun_corpus_replays() {
    // Packets as read from a TUN; `to_peer_subnet_broadcast.bin` is a fuzzer find: A used to
    // send a packet for B's subnet broadcast address, which B drops as a martian.
    for (_, data) in corpus("tun") {
        let _ = fuzzing::from_tun_vxlan(&data);
    }
}

//! Replays the `cni_stdin` fuzz seed corpus (tests/corpus/cni_stdin/, see the README there)
//! through `weft::cni::fuzzing::cni_stdin`, so every `cargo test` checks its properties, and
//! that each seed meets the outcome its name promises.

// Test helpers outside #[test] fns: an unreadable corpus must fail the test loudly.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use weft::cni::fuzzing::cni_stdin;

#[test]
fn cni_stdin_corpus_replays() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/cni_stdin");
    let mut seeds: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no corpus in {}", dir.display());
    for path in seeds {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let data = std::fs::read(&path).unwrap();
        let seen = cni_stdin(&data);
        let refused = seen.conf.is_err() || matches!(seen.env, Some(Err(_)));
        assert_eq!(refused, name.starts_with("refused_"), "{name}: {seen:?}");
        // Truncated anywhere, or one byte changed: never a panic, always a CNI error or a value.
        for cut in 0..data.len() {
            let _ = cni_stdin(&data[..cut]);
        }
        for i in (0..data.len()).step_by(3) {
            let mut d = data.clone();
            d[i] ^= 0x20;
            let _ = cni_stdin(&d);
        }
    }
}

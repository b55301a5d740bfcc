//! Replays the fuzzers' corpora (`fuzz/corpus/<target>/`, grown by `scripts/fuzz.sh`) through
//! the same entry points the fuzzers call (`banditflow::fuzzing`): none may panic or break the
//! property its target checks.

use std::path::Path;

#[test]
fn every_fuzz_corpus_input_decodes_or_is_rejected_cleanly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, target) in banditflow::fuzzing::TARGETS {
        let dir = root.join(name);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
            .map(|e| e.expect("entry").path())
            .collect();
        inputs.sort();
        assert!(inputs.len() >= 5, "corpus {name} has {} inputs", inputs.len());
        for path in inputs {
            let data = std::fs::read(&path).expect("corpus file");
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name}: {} fails", path.display());
        }
    }
}

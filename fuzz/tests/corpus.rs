//! Replays the committed corpus (`fuzz/corpus/<target>/*`) through the same target bodies the
//! fuzzer runs, with a plain `cargo test` on the stable toolchain (`make test` runs it).

use std::path::Path;

#[test]
fn every_committed_input_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (name, target) in vmbus_fuzz::TARGETS {
        let dir = root.join(name);
        let mut inputs = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("corpus entry").path();
            let bytes = std::fs::read(&path).expect("corpus file");
            eprintln!("{name}: {}", path.display());
            target(&bytes);
            inputs += 1;
        }
        assert!(inputs > 0, "{name}: empty corpus");
    }
}

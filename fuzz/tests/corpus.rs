//! Replays the committed corpus (`fuzz/corpus/<target>/*`) through the same target bodies the
//! fuzzer runs, with a plain `cargo test` on the stable toolchain (`make test` runs it).

use std::path::Path;

#[test]
fn every_committed_input_passes_its_target() {
    replay(vmbus_fuzz::TARGETS);
}

/// The engine corpora again, through the real session with its reader thread.
#[test]
fn engine_inputs_pass_with_a_reader_thread_too() {
    replay(vmbus_fuzz::THREADED_TARGETS);
}

fn replay(targets: &[(&str, vmbus_fuzz::Target)]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (name, target) in targets {
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

//! Measures the two ways the engine targets can serve requests (docs/fuzzing.md, "Engine
//! targets: why stepped"): every file of a corpus directory through `fuse_engine` (requests
//! served on the caller's thread) and through `fuse_engine_threaded` (the real session's
//! reader thread, one barrier per request), release build:
//!
//!     cargo run --release --manifest-path fuzz/Cargo.toml --example engine_speed -- DIR [ROUNDS]

use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("a corpus directory");
    let rounds: usize = args.next().map_or(3, |r| r.parse().expect("rounds"));
    let inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .expect("corpus directory")
        .map(|e| std::fs::read(e.expect("entry").path()).expect("input"))
        .collect();
    for (name, target) in [
        ("stepped", vmbus_fuzz::fuse_engine as vmbus_fuzz::Target),
        ("threaded", vmbus_fuzz::fuse_engine_threaded),
    ] {
        let start = Instant::now();
        for _ in 0..rounds {
            for input in &inputs {
                target(input);
            }
        }
        let runs = rounds * inputs.len();
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{name}: {runs} inputs in {secs:.2} s = {:.0} inputs/s",
            runs as f64 / secs
        );
    }
}

//! The benchmark script runs (on a tiny setting: the real figures come from `make bench`).

use crate::support::*;

#[test]
fn the_benchmark_runs_on_a_tiny_setting() {
    let _turn = serial();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = TempDir::new("bench");
    let run = std::process::Command::new("python3")
        .arg(root.join("bench/run.py"))
        .args(["--tiny", "--rbee", env!("CARGO_BIN_EXE_rbee"), "--model"])
        .arg(model_path())
        .args(["--out", out.str()])
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("rbee worker") && stdout.contains("chain (queen)"),
        "{stdout}"
    );
    let file = std::fs::read_dir(out.path())
        .expect("results")
        .next()
        .expect("a JSON file")
        .expect("entry");
    let figures: serde_json::Value =
        serde_json::from_slice(&std::fs::read(file.path()).unwrap()).unwrap();
    assert!(
        figures["medians"]["rbee worker"]["decode_tps"]
            .as_f64()
            .unwrap()
            > 0.0,
        "{figures}"
    );
    assert!(figures["memory_mb"]["queen_idle_mb"].as_f64().unwrap() > 0.0);
    assert_eq!(figures["cold_start_ms"].as_array().map(Vec::len), Some(1));
}

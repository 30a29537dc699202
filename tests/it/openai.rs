//! The OpenAI-compatible API, checked with the official `openai` Python client
//! (installed by `make test` into .models/py).

use crate::support::*;
use serde_json::json;
use std::time::Duration;

#[test]
fn the_official_python_client_works_against_worker_and_queen() {
    let _turn = serial();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let pythonpath = std::env::var("RBEE_TEST_PYTHONPATH")
        .unwrap_or_else(|_| root.join(".models/py").display().to_string());
    assert!(
        std::path::Path::new(&pythonpath).join("openai").is_dir(),
        "the openai package is missing from {pythonpath}: run `make test` (it installs it)"
    );
    let worker = ready_worker(&["--slots", "2"]);

    // A queen with two hives, one of which has the model in its catalog.
    let (one_home, two_home, queen_home) = (
        TempDir::new("oa-one"),
        TempDir::new("oa-two"),
        TempDir::new("oa-queen"),
    );
    let hive = |home: &TempDir| start_hive(home, &[], &[]);
    let (one, two) = (hive(&one_home), hive(&two_home));
    let model = format!("file:{}", model_path().display());
    let (status, _) = post(
        &format!("{}/v1/models/download", two.url),
        &json!({"model_ref": model}).to_string(),
    );
    assert_eq!(status, 202);
    let port = free_port();
    let queen = Proc::start(
        &[
            "queen",
            "--port",
            &port.to_string(),
            "--data-dir",
            queen_home.str(),
        ],
        port,
    );
    wait_until("the queen", Duration::from_secs(30), || {
        matches!(try_get(&format!("{}/health", queen.url)), Ok((200, _)))
    });
    for (name, h) in [("one", &one), ("two", &two)] {
        let (status, body) = post(
            &format!("{}/v1/hives", queen.url),
            &json!({"name": name, "url": h.url}).to_string(),
        );
        assert_eq!(status, 201, "{body}");
    }

    let script = root.join("tests/openai/client_test.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .args([&worker.url, &queen.url, "smollm2-135m-instruct.q4_1"])
        .env("PYTHONPATH", &pythonpath)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("15 passed, 0 failed"), "{stdout}");
    // The queen served on hive two, where the model was.
    let workers = get(&format!("{}/v1/workers/list", two.url)).1;
    assert_eq!(workers.as_array().map(Vec::len), Some(1), "{workers}");
}

//! The OpenAI-compatible API, checked with the official `openai` Python client
//! (installed by `make test` into .models/py): chat and completions
//! (`client_test.py`), then embeddings, structured output and tool calls
//! (`complete_test.py`).

use crate::support::*;
use serde_json::json;

#[test]
fn the_official_python_client_works_against_worker_and_queen() {
    let _turn = serial();
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
    let queen = start_queen(&queen_home, &[]);
    for (name, h) in [("one", &one), ("two", &two)] {
        let (status, body) = post(
            &format!("{}/v1/hives", queen.url),
            &json!({"name": name, "url": h.url}).to_string(),
        );
        assert_eq!(status, 201, "{body}");
    }

    let stdout = python(
        "clients/client_test.py",
        &[&worker.url, &queen.url, "smollm2-135m-instruct.q4_1"],
    );
    assert!(stdout.contains("17 passed, 0 failed"), "{stdout}");
    // Embeddings, structured output and tool calls, on both.
    let stdout = python(
        "clients/complete_test.py",
        &[&worker.url, &queen.url, "smollm2-135m-instruct.q4_1"],
    );
    assert!(stdout.contains("14 passed, 0 failed"), "{stdout}");
    // The queen served on hive two, where the model was.
    let workers = get(&format!("{}/v1/workers/list", two.url)).1;
    assert_eq!(workers.as_array().map(Vec::len), Some(1), "{workers}");
}

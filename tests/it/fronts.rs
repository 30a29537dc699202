//! Every client's protocol (DESIGN.md §16), checked with the official clients
//! (installed by `make test` into .models/py): the `ollama` library against
//! the queen, its `--ollama-port` and a worker (`clients/ollama_test.py`), and
//! the `anthropic` SDK against the queen and a worker (`clients/anthropic_test.py`),
//! llama-server's own endpoints as scripts call them (`clients/llama_server_test.py`),
//! and OpenAI's Responses API with the `openai` client (`clients/responses_test.py`).

use crate::hf_server::HfServer;
use crate::support::*;
use serde_json::json;

#[test]
fn ollama_and_anthropic_clients_work_against_queen_and_worker() {
    let _turn = serial();
    let worker = ready_worker(&["--slots", "2"]);
    // A model under another name on a stand-in Hugging Face, for `ollama pull`.
    let hf = HfServer::start();
    hf.add_repo(
        "test/tiny-GGUF",
        "tiny.Q4_1.gguf",
        &model_path(),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    );
    let (hive_home, queen_home) = (TempDir::new("fronts-hive"), TempDir::new("fronts-queen"));
    let hive = start_hive(&hive_home, &[], &[("HF_ENDPOINT", &hf.url)]);
    let model = format!("file:{}", model_path().display());
    let (status, _) = post(
        &format!("{}/v1/models/download", hive.url),
        &json!({"model_ref": model}).to_string(),
    );
    assert_eq!(status, 202);
    let ollama_port = free_port();
    let queen = start_queen(
        &queen_home,
        &["--no-local-hive", "--ollama-port", &ollama_port.to_string()],
    );
    let (status, body) = post(
        &format!("{}/v1/hives", queen.url),
        &json!({"name": "one", "url": hive.url}).to_string(),
    );
    assert_eq!(status, 201, "{body}");

    let name = "smollm2-135m-instruct.q4_1";
    let ollama_url = format!("http://127.0.0.1:{ollama_port}");
    let stdout = python(
        "clients/ollama_test.py",
        &[
            &queen.url,
            &ollama_url,
            &worker.url,
            name,
            "hf.co/test/tiny-GGUF:Q4_1",
        ],
    );
    assert!(stdout.contains("21 passed, 0 failed"), "{stdout}");
    let stdout = python(
        "clients/anthropic_test.py",
        &[&queen.url, &worker.url, name],
    );
    assert!(stdout.contains("15 passed, 0 failed"), "{stdout}");
    let stdout = python(
        "clients/llama_server_test.py",
        &[&worker.url, &queen.url, name],
    );
    assert!(stdout.contains("13 passed, 0 failed"), "{stdout}");
    let stdout = python(
        "clients/responses_test.py",
        &[&queen.url, &worker.url, name],
    );
    assert!(stdout.contains("12 passed, 0 failed"), "{stdout}");
}

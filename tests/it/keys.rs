//! Client keys (`rbee keeper keys`): a use key infers and cannot manage,
//! x-api-key works as Bearer does, a key over its rate gets 429 with
//! Retry-After, a revoked key 401, and the queen counts each key's tokens.

use crate::chain::{file_model, Cluster};
use crate::support::*;
use serde_json::{json, Value};

/// A request with these headers: its status, `Retry-After` and body.
fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> (u16, String, String) {
    let body = body.map(Value::to_string);
    call_header(method, url, headers, body.as_deref(), "retry-after")
}

#[test]
fn keys_reach_what_their_scope_allows_within_their_rate_until_revoked() {
    let _turn = serial();
    let c = Cluster::new("keys", &[("RBEE_TOKEN", "the-admin-token")]);
    let (code, _, err) = c.keeper(&["queen", "start"]);
    assert_eq!(code, 0, "{err}");
    let add = |args: &[&str]| {
        let mut all = vec!["keys", "add"];
        all.extend_from_slice(args);
        let (code, out, err) = c.keeper(&all);
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("shown this once"), "{err}");
        out.trim().to_string()
    };
    let alice = add(&["alice"]);
    let limited = add(&["limited", "--rate", "2/min"]);
    assert!(
        alice.starts_with("rbee-key-") && alice.len() > 40,
        "{alice}"
    );
    let q = |path: &str| format!("{}{path}", c.queen);
    let bearer = |k: &str| format!("Bearer {k}");

    // A use key infers, through the OpenAI face, with Bearer or x-api-key.
    let chat = json!({"model": file_model(), "max_tokens": 4, "temperature": 0,
                      "messages": [{"role": "user", "content": "Say hi"}]});
    let (status, _, body) = send(
        "POST",
        &q("/v1/chat/completions"),
        &[("authorization", &bearer(&alice))],
        Some(&chat),
    );
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = send("GET", &q("/v1/models"), &[("x-api-key", &alice)], None);
    assert_eq!(status, 200, "{body}");
    // It cannot manage the cluster.
    let hive = json!({"name": "x", "url": "http://127.0.0.1:9"});
    let (status, _, body) = send(
        "POST",
        &q("/v1/hives"),
        &[("x-api-key", &alice)],
        Some(&hive),
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("use key"), "{body}");
    let (status, _, _) = send(
        "GET",
        &q("/v1/keys"),
        &[("authorization", &bearer(&alice))],
        None,
    );
    assert_eq!(status, 403);
    // A made-up key, or none, is refused.
    let (status, _, _) = send(
        "GET",
        &q("/v1/models"),
        &[("x-api-key", "rbee-key-0000")],
        None,
    );
    assert_eq!(status, 401);

    // A use key sees its own jobs only: another's id is not found.
    let admin = [("authorization", "Bearer the-admin-token")];
    let job = json!({"model": file_model(), "prompt": "Hi", "max_tokens": 2});
    let (status, _, body) = send("POST", &q("/v1/jobs"), &admin, Some(&job));
    assert_eq!(status, 201, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap_or_default()["job_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let stream = q(&format!("/v1/jobs/{id}/stream"));
    let (status, _, _) = send("GET", &stream, &[("x-api-key", &alice)], None);
    assert_eq!(status, 404);
    let (status, _, _) = send(
        "DELETE",
        &q(&format!("/v1/jobs/{id}")),
        &[("x-api-key", &alice)],
        None,
    );
    assert_eq!(status, 404);
    let (status, _, body) = send("GET", &stream, &admin, None);
    assert_eq!(status, 200, "{body}");

    // Over its rate: 429, saying when to come back.
    for _ in 0..2 {
        let (status, _, _) = send("GET", &q("/v1/models"), &[("x-api-key", &limited)], None);
        assert_eq!(status, 200);
    }
    let (status, retry, body) = send("GET", &q("/v1/models"), &[("x-api-key", &limited)], None);
    assert_eq!(status, 429, "{body}");
    let secs: u64 = retry.parse().unwrap_or(0);
    assert!((1..=30).contains(&secs), "Retry-After {retry:?}");

    // The queen counts each key's requests and tokens; the token is an admin key.
    let listed = c.listed(&["keys", "list"]);
    let row = listed
        .iter()
        .find(|k| k["name"] == "alice")
        .cloned()
        .unwrap_or_default();
    assert_eq!(row["scope"], "use", "{row}");
    assert!(row["tokens_used"].as_u64().unwrap_or(0) > 0, "{row}");
    assert!(row["last_used"].is_string(), "{row}");
    let (status, _, metrics) = send("GET", &q("/metrics"), &admin, None);
    assert_eq!(status, 200);
    let tokens = row["tokens_used"].as_u64().unwrap_or(0);
    for line in [
        format!("rbee_queen_tokens_total{{key=\"alice\"}} {tokens}"),
        "rbee_queen_key_requests_total{key=\"alice\",outcome=\"ok\"} 2".to_string(),
        "rbee_queen_key_requests_total{key=\"alice\",outcome=\"refused\"} 2".to_string(),
        "rbee_queen_key_requests_total{key=\"limited\",outcome=\"limited\"} 1".to_string(),
    ] {
        assert!(metrics.contains(&line), "{line}:\n{metrics}");
    }

    // Revoked, it is refused.
    let (code, out, err) = c.keeper(&["keys", "revoke", "alice"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "revoked key alice\n");
    let (status, _, body) = send("GET", &q("/v1/models"), &[("x-api-key", &alice)], None);
    assert_eq!(status, 401, "{body}");
    let (code, _, err) = c.keeper(&["keys", "add", "limited"]);
    assert_eq!(code, 1);
    assert!(err.contains("exists already"), "{err}");
    let _ = c.keeper(&["queen", "stop"]);

    // A queen without a token answers this machine without one: a key would
    // restrict nothing, so none is made.
    let open = Cluster::new("keys-open", &[]);
    let (code, _, err) = open.keeper(&["queen", "start"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = open.keeper(&["keys", "add", "x"]);
    assert_eq!(code, 1);
    assert!(err.contains("has no token"), "{err}");
    let _ = open.keeper(&["queen", "stop"]);

    // A queen woken by a keeper with a token file asks for that token.
    let dir = TempDir::new("keys-token-file");
    let file = dir.path().join("token");
    std::fs::write(&file, "from-a-file\n").expect("token written");
    let file = file.display().to_string();
    let woken = Cluster::new("keys-woken", &[]);
    let (code, _, err) = woken.keeper(&["--token-file", &file, "queen", "start"]);
    assert_eq!(code, 0, "{err}");
    let hives = format!("{}/v1/hives", woken.queen);
    assert_eq!(send("GET", &hives, &[], None).0, 401);
    let bearer = [("authorization", "Bearer from-a-file")];
    assert_eq!(send("GET", &hives, &bearer, None).0, 200);
    let _ = woken.keeper(&["--token-file", &file, "queen", "stop"]);
}

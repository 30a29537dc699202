//! The worker's prompt cache (DESIGN.md §9) against the real model: reuse
//! never changes a greedy answer, and a conversation's next turn decodes only
//! what is new.

use crate::support::*;
use serde_json::{json, Value};
use std::time::Duration;

/// A whole (not streamed) OpenAI answer: its text and its usage.
fn complete(w: &Proc, path: &str, body: Value) -> (String, Value) {
    let (status, answer) = post(&format!("{}{path}", w.url), &body.to_string());
    assert_eq!(status, 200, "{answer}");
    let choice = &answer["choices"][0];
    let text = choice["message"]["content"]
        .as_str()
        .or(choice["text"].as_str())
        .expect("text in the answer")
        .to_string();
    (text, answer["usage"].clone())
}

fn cached_tokens(usage: &Value) -> u64 {
    usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached_tokens in usage")
}

fn prompt_tokens(usage: &Value) -> u64 {
    usage["prompt_tokens"].as_u64().expect("prompt_tokens")
}

/// A greedy completion of `prompt`, with or without the cache.
fn greedy(w: &Proc, prompt: &str, cache: bool) -> (String, Value) {
    complete(
        w,
        "/v1/completions",
        json!({"model": "m", "prompt": prompt, "max_tokens": 12, "temperature": 0, "cache_prompt": cache}),
    )
}

/// Long enough that reuse matters; its words tokenize on their own.
fn document() -> String {
    (0..60)
        .map(|i| format!("Fact {i}: the river passes the mill number {i} at noon."))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn a_second_request_decodes_only_the_tokens_after_the_shared_prefix() {
    let _turn = serial();
    let w = ready_worker(&["--slots", "2"]);
    let first = document();
    let (_, usage) = greedy(&w, &first, true);
    assert_eq!(
        cached_tokens(&usage),
        0,
        "a fresh worker has nothing cached"
    );
    let shared = prompt_tokens(&usage);
    let (_, usage) = greedy(&w, &format!("{first} Zebras sing"), true);
    assert_eq!(cached_tokens(&usage), shared, "{usage}");
    assert!(prompt_tokens(&usage) > shared);
    // The slot went on from the first request: one conversation, held whole
    // (once the engine has let the slot go, just after the answer).
    wait_until("the slot is free", Duration::from_secs(10), || {
        get(&format!("{}/v1/ready", w.url)).1["slots_busy"] == 0
    });
    let ready = get(&format!("{}/v1/ready", w.url)).1;
    assert_eq!(ready["cached_sequences"], 1, "{ready}");
    assert!(
        ready["cached_tokens"].as_u64() > Some(prompt_tokens(&usage)),
        "{ready}"
    );
}

#[test]
fn greedy_answers_are_the_same_with_and_without_the_cache_over_a_conversation() {
    let _turn = serial();
    let w = ready_worker(&["--slots", "2"]);
    let questions = [
        "Name a fruit.",
        "What colour is it?",
        "Where does it grow?",
        "Say it again in one word.",
    ];
    let mut messages = vec![json!({"role": "system", "content": document()})];
    let mut previous_prompt = 0;
    for (turn, q) in questions.iter().enumerate() {
        messages.push(json!({"role": "user", "content": q}));
        let ask = |cache: bool| {
            complete(
                &w,
                "/v1/chat/completions",
                json!({"model": "m", "messages": messages, "max_tokens": 16, "temperature": 0,
                       "cache_prompt": cache}),
            )
        };
        let (cached_answer, usage) = ask(true);
        let (fresh_answer, fresh_usage) = ask(false);
        assert_eq!(cached_answer, fresh_answer, "turn {turn}");
        assert_eq!(cached_tokens(&fresh_usage), 0);
        if turn > 0 {
            // Everything up to the last answer was read before.
            assert!(
                cached_tokens(&usage) >= previous_prompt,
                "turn {turn}: {usage}, previous prompt {previous_prompt}"
            );
        }
        previous_prompt = prompt_tokens(&usage);
        messages.push(json!({"role": "assistant", "content": cached_answer}));
    }
}

#[test]
fn eight_interleaved_conversations_on_four_slots_keep_their_caches_and_answers() {
    let _turn = serial();
    interleaved_conversations(&[]);
}

/// Without flash attention llama.cpp keeps V transposed in the KV cache, and a
/// saved state in that layout; a save reuses the last restored state's buffer.
#[test]
fn interleaved_conversations_keep_their_answers_without_flash_attention() {
    let _turn = serial();
    interleaved_conversations(&["--flash-attn", "off"]);
}

/// Eight conversations advanced in turn on four slots: every turn's greedy
/// answer with the cache equals the one without, and reuses its last prompt.
fn interleaved_conversations(flags: &[&str]) {
    let mut args = vec!["--slots", "4", "--ctx-size", "2048"];
    args.extend(flags);
    let w = ready_worker(&args);
    let topics = [
        "apples", "boats", "clouds", "dogs", "engines", "forests", "glass", "honey",
    ];
    let mut conversations: Vec<Vec<Value>> = topics
        .iter()
        .map(|t| {
            let system = format!(
                "You are a helper who knows everything about {t}. {}",
                &document()[..600]
            );
            vec![json!({"role": "system", "content": system})]
        })
        .collect();
    let mut previous = [0u64; 8];
    for round in 0..3 {
        for (k, messages) in conversations.iter_mut().enumerate() {
            messages.push(json!({"role": "user", "content": format!("Tell me fact {round} about {}.", topics[k])}));
            let body = |cache: bool| {
                json!({"model": "m", "messages": messages, "max_tokens": 10, "temperature": 0,
                       "cache_prompt": cache})
            };
            let (answer, usage) = complete(&w, "/v1/chat/completions", body(true));
            let (expected, _) = complete(&w, "/v1/chat/completions", body(false));
            assert_eq!(answer, expected, "round {round}, conversation {k}");
            if round > 0 {
                assert!(
                    cached_tokens(&usage) >= previous[k],
                    "round {round}, conversation {k}: {usage}, previous prompt {}",
                    previous[k]
                );
            }
            previous[k] = prompt_tokens(&usage);
            messages.push(json!({"role": "assistant", "content": answer}));
        }
    }
}

#[test]
fn a_prompt_shorter_than_a_cached_one_reuses_all_but_its_last_token() {
    let _turn = serial();
    let w = ready_worker(&["--slots", "1"]);
    let long = document();
    let short = long[..long.len() / 2]
        .rsplit_once(' ')
        .map_or(long.as_str(), |(head, _)| head)
        .to_string();
    greedy(&w, &long, true);
    let (answer, usage) = greedy(&w, &short, true);
    assert_eq!(cached_tokens(&usage), prompt_tokens(&usage) - 1, "{usage}");
    let (expected, _) = greedy(&w, &short, false);
    assert_eq!(answer, expected);
}

#[test]
fn a_request_cancelled_while_reading_its_prompt_leaves_the_cache_consistent() {
    let _turn = serial();
    let w = ready_worker(&["--slots", "1"]);
    let prompt = format!("{} {}", document(), document());
    for part in 0..3 {
        // Leave as soon as the request runs: its long prompt is still being read.
        let body = json!({"prompt": format!("{prompt} Part {part}"), "max_tokens": 50});
        let mut sse =
            stream(&format!("{}/v1/inference", w.url), Some(&body.to_string())).expect("stream");
        assert_eq!(sse.next_event()["type"], "started");
        drop(sse);
        wait_until("the slot is free", Duration::from_secs(30), || {
            get(&format!("{}/v1/ready", w.url)).1["slots_busy"] == 0
        });
    }
    let (answer, _) = greedy(&w, &prompt, true);
    let (expected, _) = greedy(&w, &prompt, false);
    assert_eq!(answer, expected);
}

#[test]
fn more_conversations_than_slots_are_kept_in_host_memory_oldest_dropped_first() {
    let _turn = serial();
    // One slot; host memory for one saved conversation of ~100 tokens
    // (SmolLM2 keeps 23 KB of K and V per token).
    let w = ready_worker(&["--slots", "1", "--cache-ram", "3"]);
    let prompts: Vec<String> = ["Apples", "Boats", "Clouds"]
        .iter()
        .map(|word| {
            (0..12)
                .map(|i| format!("{word} number {i} is red."))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let answers: Vec<String> = prompts.iter().map(|p| greedy(&w, p, true).0).collect();
    // "Boats" was saved when "Clouds" took the slot, and comes back.
    let (answer, usage) = greedy(&w, &prompts[1], true);
    assert_eq!(cached_tokens(&usage), prompt_tokens(&usage) - 1, "{usage}");
    assert_eq!(answer, answers[1]);
    // "Apples" was dropped to make room for it.
    let (answer, usage) = greedy(&w, &prompts[0], true);
    assert!(cached_tokens(&usage) <= 1, "{usage}");
    assert_eq!(answer, answers[0]);
}

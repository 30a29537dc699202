"""llama-server's own endpoints on a real rbee worker and through a real queen,
as scripts written for llama.cpp call them (HTTP and JSON, no client library).

Run by the integration test `fronts::ollama_and_anthropic_clients_work_against_queen_and_worker` as:
python3 llama_server_test.py WORKER_URL QUEEN_URL MODEL
"""
import json
import sys
import urllib.error
import urllib.request

from checks import check, report

WORKER, QUEEN, MODEL = sys.argv[1:4]


def call(base, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def completion(base, body):
    status, text = call(base, "/completion", body)
    assert status == 200, (status, text)
    if not body.get("stream"):
        return json.loads(text)
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1]["stop"] is True and all(not e["stop"] for e in events[:-1]), events[-2:]
    last = dict(events[-1])
    last["content"] = "".join(e["content"] for e in events)
    if body.get("n_probs"):
        last["completion_probabilities"] = [p for e in events for p in e.get("completion_probabilities", [])]
    return last


def suite(base, where, model):
    def completion_whole_and_streamed():
        body = {"model": model, "prompt": "Once upon a time", "n_predict": 8, "temperature": 0}
        completion(base, body)  # the next two read the prompt from the cache
        whole = completion(base, body)
        assert whole["stop"] is True and whole["tokens_predicted"] == 8 and whole["stop_type"] == "limit", whole
        assert whole["tokens_evaluated"] > 0 and whole["timings"]["predicted_n"] == 8, whole
        streamed = completion(base, dict(body, stream=True))
        assert streamed["content"] == whole["content"], (streamed, whole)

    def grammar_yes_or_no():
        for prompt in ["Is water wet?", "Is the sun cold?", "Answer: is 2 > 1?"]:
            r = completion(base, {"model": model, "prompt": prompt, "n_predict": 8, "temperature": 0.7,
                                  "grammar": 'root ::= "yes" | "no"'})
            assert r["content"] in ("yes", "no"), r["content"]

    def sampler_fields_and_refusals():
        r = completion(base, {"model": model, "prompt": "Hello", "n_predict": 4, "min_p": 0.1,
                              "repeat_penalty": 1.2, "repeat_last_n": 32, "typical_p": 0.9,
                              "logit_bias": [[42, -100]], "seed": 7})
        assert r["tokens_predicted"] <= 4, r
        status, text = call(base, "/completion", {"model": model, "prompt": "Hello", "n_probs": 3,
                                                  "post_sampling_probs": True})
        assert status == 400 and "post_sampling_probs" in text, (status, text)
        status, text = call(base, "/completion", {"model": model, "prompt": "Hello", "n_probs": 50})
        assert status == 400 and "n_probs" in text, (status, text)

    def n_probs_whole_and_streamed():
        body = {"model": model, "prompt": "The capital of France is", "n_predict": 4, "temperature": 0,
                "n_probs": 3}
        for r in [completion(base, body), completion(base, dict(body, stream=True))]:
            probs = r["completion_probabilities"]
            assert len(probs) == r["tokens_predicted"] == 4, r
            assert "".join(p["token"] for p in probs) == r["content"], r
            for p in probs:
                top = p["top_logprobs"]
                assert len(top) == 3 and top[0]["logprob"] >= top[1]["logprob"] >= top[2]["logprob"], p
                # Greedy: the token taken is the likeliest one, with its log-probability.
                assert p["id"] == top[0]["id"] and abs(p["logprob"] - top[0]["logprob"]) < 1e-4, p
                assert p["logprob"] <= 0 and bytes(p["bytes"]).decode() == p["token"], p

    def cut_inside_a_character():
        # A tree emoji is two tokens, the first of them the emoji's first bytes: an
        # answer cut after it (max_tokens 1) ends before it, with no U+FFFD.
        status, text = call(base, "/tokenize", {"model": model, "content": "🌳", "with_pieces": True})
        first = json.loads(text)["tokens"][0]
        assert isinstance(first["piece"], list), first  # bytes, not text
        bias = {"n_predict": 1, "temperature": 0, "logit_bias": [[first["id"], 100]]}
        for stream in [False, True]:
            r = completion(base, dict(bias, model=model, prompt="A tree:", stream=stream))
            assert r["tokens_predicted"] == 1 and r["content"] == "", r
        status, text = call(base, "/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": "A tree?"}], "max_tokens": 1,
            "temperature": 0, "logit_bias": {str(first["id"]): 100}})
        answer = json.loads(text)["choices"][0]
        assert status == 200 and answer["message"]["content"] == "", (status, text)
        assert answer["finish_reason"] == "length", answer

    def tokenize():
        status, text = call(base, "/tokenize", {"model": model, "content": "Hello world", "with_pieces": True})
        assert status == 200, text
        tokens = json.loads(text)["tokens"]
        assert "".join(t["piece"] for t in tokens) == "Hello world", tokens
        return [t["id"] for t in tokens]

    checks = [("completion", completion_whole_and_streamed), ("grammar", grammar_yes_or_no),
              ("sampling", sampler_fields_and_refusals), ("n_probs", n_probs_whole_and_streamed),
              ("cut inside a character", cut_inside_a_character), ("tokenize", tokenize)]
    for name, fn in checks:
        check(f"{where} {name}", fn)


def worker_only():
    def detokenize_props_slots():
        status, text = call(WORKER, "/tokenize", {"content": "Hello world", "add_special": True})
        ids = json.loads(text)["tokens"]
        status, text = call(WORKER, "/detokenize", {"tokens": ids})
        assert status == 200 and json.loads(text)["content"].endswith("Hello world"), text
        status, text = call(WORKER, "/detokenize", {"tokens": [10 ** 9]})
        assert status == 400 and "vocabulary" in text, (status, text)
        status, text = call(WORKER, "/props")
        props = json.loads(text)
        assert props["total_slots"] == 2 and props["default_generation_settings"]["n_ctx"] > 0, props
        assert "im_start" in props["chat_template"], props["chat_template"][:100]
        assert props["attention_kernel"] == "fa-small", props
        status, text = call(WORKER, "/slots")
        slots = json.loads(text)
        assert len(slots) == 2 and all(not s["is_processing"] for s in slots), slots

    check("worker detokenize props slots", detokenize_props_slots)


suite(WORKER, "worker", MODEL)
suite(QUEEN, "queen", MODEL)
worker_only()
report()

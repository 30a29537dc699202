"""The official `openai` Python client against a real rbee worker and a real queen.

Run by the integration test `openai::the_official_python_client_works_against_worker_and_queen`
as: python3 client_test.py WORKER_URL QUEEN_URL MODEL
"""
import sys

import openai
from checks import check, report

MODEL = sys.argv[3]


def suite(base, where):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0, timeout=120)

    def models():
        ids = [m.id for m in client.models.list()]
        assert MODEL in ids, ids
        assert client.models.retrieve(MODEL).id == MODEL
        try:
            client.models.retrieve("no-such-model")
            raise AssertionError("an unknown model was found")
        except openai.NotFoundError as e:
            assert e.body["type"] == "not_found_error", e.body

    def chat_whole():
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Why is the sky blue?"}],
            max_tokens=8, temperature=0)
        choice = r.choices[0]
        assert choice.finish_reason == "length", choice
        assert choice.message.role == "assistant" and choice.message.content, choice
        assert r.usage.completion_tokens == 8, r.usage
        assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + 8, r.usage

    def chat_stream():
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Name a colour."}],
            max_completion_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert text and finishes in (["stop"], ["length"]), (text, finishes)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0, chunks[-1]

    def completion_whole_and_stream():
        r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
        assert r.object == "text_completion" and r.choices[0].finish_reason == "length", r
        streamed = list(client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True))
        text = "".join(c.choices[0].text for c in streamed)
        assert text == r.choices[0].text, (text, r.choices[0].text)
        assert streamed[-1].choices[0].finish_reason == "length"

    def stop_sequences():
        free = client.completions.create(
            model=MODEL, prompt="Count: 1, 2, 3, 4,", max_tokens=20, temperature=0).choices[0].text
        stop = free[4:7]
        cut = client.completions.create(
            model=MODEL, prompt="Count: 1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[stop]).choices[0]
        assert cut.finish_reason == "stop", cut
        assert cut.text == free[: free.find(stop)], (cut.text, free, stop)

    def prompt_cache():
        messages = [{"role": "system", "content": "You answer in one word. " * 20},
                    {"role": "user", "content": "Name a colour."}]
        first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
        again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
        assert again.choices[0].message.content == first.choices[0].message.content, (first, again)
        cached = again.usage.prompt_tokens_details.cached_tokens
        assert cached == again.usage.prompt_tokens - 1, again.usage

    def errors():
        try:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
            raise AssertionError("n=2 was accepted")
        except openai.BadRequestError as e:
            assert "n=1" in str(e), e
        try:
            client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
            raise AssertionError("an unknown role was accepted")
        except openai.BadRequestError as e:
            assert "unknown role" in str(e), e

    def logprobs():
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Why is the sky blue?"}],
                                           max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
        content = r.choices[0].logprobs.content
        assert "".join(t.token for t in content) == r.choices[0].message.content, content
        assert all(t.logprob <= 0 and len(t.top_logprobs) == 3 for t in content), content
        assert all(t.token == t.top_logprobs[0].token for t in content), "greedy takes the likeliest"
        streamed = list(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Why is the sky blue?"}], max_tokens=5,
            temperature=0, logprobs=True, stream=True))
        tokens = [t.token for c in streamed if c.choices and c.choices[0].logprobs
                  for t in c.choices[0].logprobs.content or []]
        assert "".join(tokens) == r.choices[0].message.content, tokens
        done = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0, logprobs=2)
        assert len(done.choices[0].logprobs.token_logprobs) == 4, done.choices[0].logprobs

    for name, fn in [("models", models), ("logprobs", logprobs), ("chat", chat_whole), ("chat stream", chat_stream),
                     ("completions", completion_whole_and_stream), ("stop", stop_sequences), ("prompt cache", prompt_cache),
                     ("errors", errors)]:
        check(f"{where} {name}", fn)
    return client


suite(sys.argv[1], "worker")
queen = suite(sys.argv[2], "queen")


def unknown_model():
    try:
        queen.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert "no-such-model" in str(e), e


check("queen unknown model", unknown_model)
report()

"""The official `ollama` Python library against a real rbee queen (on its own
port and on --ollama-port) and a real worker.

Run by the integration test `fronts::ollama_and_anthropic_clients_work_against_queen_and_worker` as:
python3 ollama_test.py QUEEN_URL OLLAMA_PORT_URL WORKER_URL MODEL PULL_REF
"""
import json
import sys
import time
import urllib.request

import ollama
from checks import check, report

QUEEN, OLLAMA_PORT, WORKER, MODEL, PULL = sys.argv[1:6]
GREEDY = {"temperature": 0, "num_predict": 8}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def eventually(what, holds, seconds=10):
    """The cluster's view follows a hive's state a moment later."""
    deadline = time.time() + seconds
    while not holds():
        assert time.time() < deadline, what
        time.sleep(0.1)


def chat_suite(base, where):
    c = ollama.Client(host=base, timeout=120)

    def chat_whole_and_streamed():
        messages = [{"role": "user", "content": "Why is the sky blue?"}]
        c.chat(model=MODEL, messages=messages, options=GREEDY)  # both below read the prompt from the cache
        whole = c.chat(model=MODEL, messages=messages, options=GREEDY)
        assert whole.done and whole.done_reason == "length", whole
        assert whole.message.role == "assistant" and whole.message.content, whole
        assert whole.eval_count == 8 and whole.prompt_eval_count > 0, whole
        assert whole.total_duration > 0 and whole.eval_duration > 0, whole
        parts = list(c.chat(model=MODEL, messages=messages, options=GREEDY, stream=True))
        assert all(not p.done for p in parts[:-1]) and parts[-1].done, parts
        assert parts[-1].done_reason == "length" and parts[-1].eval_count == 8, parts[-1]
        text = "".join(p.message.content for p in parts)
        assert text == whole.message.content, (text, whole.message.content)

    def generate_whole_streamed_and_raw():
        whole = c.generate(model=MODEL, prompt="Once upon a time", options=GREEDY)
        assert whole.done and whole.response and whole.eval_count == 8, whole
        streamed = list(c.generate(model=MODEL, prompt="Once upon a time", options=GREEDY, stream=True))
        assert "".join(p.response for p in streamed) == whole.response, (streamed, whole)
        raw = c.generate(model=MODEL, prompt="1, 2, 3, 4,", raw=True, options={"temperature": 0, "num_predict": 6})
        assert raw.response.strip().startswith("5"), raw.response

    def format_schema():
        schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                  "required": ["name", "age"]}
        r = c.chat(model=MODEL, messages=[{"role": "user", "content": "Describe a person as JSON."}],
                   format=schema, options={"temperature": 0, "num_predict": 60})
        person = json.loads(r.message.content)
        assert isinstance(person["name"], str) and isinstance(person["age"], int), person
        r = c.generate(model=MODEL, prompt="A JSON object about a cat:", format="json",
                       options={"temperature": 0, "num_predict": 40})
        assert isinstance(json.loads(r.response), dict), r.response

    def tools_round_trip():
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        first = c.chat(model=MODEL, messages=messages, tools=[WEATHER], options={"temperature": 0, "num_predict": 60})
        for call in first.message.tool_calls or []:
            assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict), call
        messages += [{"role": "assistant", "content": "",
                      "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                     {"role": "tool", "content": '{"temperature": 18, "unit": "celsius"}', "tool_name": "get_weather"}]
        answer = c.chat(model=MODEL, messages=messages, tools=[WEATHER], options={"temperature": 0, "num_predict": 30})
        assert answer.message.content or answer.message.tool_calls, answer

    def logprobs():
        r = c.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=2,
                   options={"temperature": 0, "num_predict": 4})
        assert len(r.logprobs) == r.eval_count and all(len(l.top_logprobs) == 2 for l in r.logprobs), r.logprobs
        assert "".join(l.token for l in r.logprobs) == r.message.content, r

    def embed():
        e = c.embed(model=MODEL, input=["hello", "world"])
        assert len(e.embeddings) == 2 and len(e.embeddings[0]) == len(e.embeddings[1]) > 0, e
        one = c.embed(model=MODEL, input="hello")
        assert one.embeddings[0] == e.embeddings[0], "the same text, the same vector"

    def errors():
        for kwargs, says in [({"options": {"tfs_z": 0.5}}, "tfs_z"), ({"think": True}, "think"),
                             ({"options": {"temperature": 9}}, "temperature")]:
            try:
                c.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], **kwargs)
                raise AssertionError(f"{kwargs} was accepted")
            except ollama.ResponseError as e:
                assert e.status_code == 400 and says in e.error, (e.status_code, e.error)

    for name, fn in [("chat", chat_whole_and_streamed), ("generate", generate_whole_streamed_and_raw),
                     ("format", format_schema), ("tools", tools_round_trip), ("logprobs", logprobs), ("embed", embed), ("errors", errors)]:
        check(f"{where} {name}", fn)


def queen_suite(base, where):
    c = ollama.Client(host=base, timeout=120)
    tagged = MODEL.replace(".", ":", 1) if ":" not in MODEL else MODEL

    def probes():
        with urllib.request.urlopen(urllib.request.Request(base + "/", method="HEAD")) as r:
            assert r.status == 200
        with urllib.request.urlopen(base + "/api/version") as r:
            assert json.load(r)["version"], "a version"

    def list_show_ps():
        names = [m.model for m in c.list().models]
        assert tagged in names, names
        shown = c.show(tagged)
        assert shown.details.format == "gguf" and shown.details.quantization_level, shown
        assert "completion" in shown.capabilities, shown
        c.chat(model=tagged, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 1})
        eventually("the worker is listed", lambda: tagged in [m.model for m in c.ps().models])
        assert all(m.expires_at for m in c.ps().models)

    def older_embeddings():
        assert len(c.embeddings(model=tagged, prompt="hello").embedding) > 0

    def not_found():
        try:
            c.chat(model="no-such-model:q4", messages=[{"role": "user", "content": "hi"}])
            raise AssertionError("an unknown model answered")
        except ollama.ResponseError as e:
            assert e.status_code == 404 and "no-such-model.q4" in e.error, e.error

    def pull_and_delete():
        progress = list(c.pull(PULL, stream=True))
        assert progress[-1].status == "success", progress[-3:]
        sizes = [p for p in progress if p.total]
        assert sizes and sizes[-1].completed == sizes[-1].total > 0, progress
        assert any(m.model == "tiny:q4_1" for m in c.list().models), c.list()
        again = c.pull(PULL)  # already there: at once
        assert again.status == "success", again
        c.delete("tiny:q4_1")
        assert not any(m.model == "tiny:q4_1" for m in c.list().models), c.list()

    def copy_create_and_delete_names():
        c.copy(tagged, "mine")
        names = [m.model for m in c.list().models]
        assert "mine:latest" in names and tagged in names, names
        assert c.show("mine:latest").details.format == "gguf"
        assert c.create(model="made", from_="mine").status == "success"
        assert list(c.create(model="made:2", from_=tagged, stream=True))[-1].status == "success"
        for kwargs, says in [(dict(model="x", from_=tagged, system="You are Mario"), "system"),
                             (dict(model="x"), "from")]:
            try:
                c.create(**kwargs)
                raise AssertionError(f"create {kwargs} was accepted")
            except ollama.ResponseError as e:
                assert e.status_code == 400 and says in e.error, e.error
        try:
            c.push("mine")
            raise AssertionError("a push was accepted")
        except ollama.ResponseError as e:
            assert "registry" in e.error, e.error
        for name in ["mine", "made", "made:2"]:
            c.delete(name)  # the name only: the model stays
        names = [m.model for m in c.list().models]
        assert tagged in names and not {"mine:latest", "made:latest", "made:2"} & set(names), names

    def unload():
        loaded = c.generate(model=tagged, keep_alive=-1)
        assert loaded.done, loaded
        eventually("kept until stopped", lambda: [m.expires_at.year > 2100 for m in c.ps().models
                                                  if m.model == tagged] == [True])
        unloaded = c.generate(model=tagged, keep_alive=0)
        assert unloaded.done_reason == "unload", unloaded
        eventually("unloaded", lambda: not any(m.model == tagged for m in c.ps().models))

    for name, fn in [("probes", probes), ("list show ps", list_show_ps), ("embeddings", older_embeddings),
                     ("not found", not_found), ("pull delete", pull_and_delete),
                     ("copy create delete", copy_create_and_delete_names), ("unload", unload)]:
        check(f"{where} {name}", fn)


chat_suite(WORKER, "worker")
chat_suite(QUEEN, "queen")
queen_suite(OLLAMA_PORT, "ollama port")
report()

"""The official `anthropic` Python SDK against a real rbee queen and worker:
messages whole and streamed, a tool-use round trip, structured output, an
error's shape.

Run by the integration test `fronts::ollama_and_anthropic_clients_work_against_queen_and_worker` as:
python3 anthropic_test.py QUEEN_URL WORKER_URL MODEL
"""
import json
import sys

import anthropic
from checks import check, report

QUEEN, WORKER, MODEL = sys.argv[1:4]
GREEDY = {"temperature": 0}
WEATHER = {"name": "get_weather", "description": "Get the current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def suite(base, where):
    c = anthropic.Anthropic(base_url=base, api_key="not-needed", max_retries=0, timeout=120)
    ask = [{"role": "user", "content": "Why is the sky blue?"}]

    def whole_and_streamed():
        c.messages.create(model=MODEL, max_tokens=8, messages=ask, extra_body=GREEDY)  # the cache holds it now
        whole = c.messages.create(model=MODEL, max_tokens=8, messages=ask, extra_body=GREEDY)
        assert whole.type == "message" and whole.role == "assistant", whole
        assert whole.stop_reason == "max_tokens" and whole.usage.output_tokens == 8, whole
        assert whole.usage.input_tokens > 0 and whole.content[0].type == "text", whole
        with c.messages.stream(model=MODEL, max_tokens=8, messages=ask, extra_body=GREEDY) as s:
            text = "".join(s.text_stream)
            final = s.get_final_message()
        assert text == whole.content[0].text, (text, whole.content[0].text)
        assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 8, final

    def system_and_stop_sequence():
        r = c.messages.create(model=MODEL, max_tokens=30, system="Count from one to ten in words.",
                              messages=[{"role": "user", "content": "Go."}], stop_sequences=["five"],
                              extra_body=GREEDY)
        assert r.stop_reason in ("stop_sequence", "end_turn", "max_tokens"), r
        if r.stop_reason == "stop_sequence":
            assert r.stop_sequence == "five" and "five" not in r.content[0].text, r

    def tool_use_round_trip():
        first = c.messages.create(model=MODEL, max_tokens=80, tools=[WEATHER], tool_choice={"type": "any"},
                                  messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                                  extra_body=GREEDY)
        assert first.stop_reason == "tool_use", first
        use = [b for b in first.content if b.type == "tool_use"][0]
        assert use.name == "get_weather" and isinstance(use.input.get("city"), str), use
        second = c.messages.create(model=MODEL, max_tokens=30, tools=[WEATHER], extra_body=GREEDY, messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": first.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C, sunny"}]}])
        assert second.content, second

    def tool_use_streamed():
        with c.messages.stream(model=MODEL, max_tokens=80, tools=[WEATHER],
                               tool_choice={"type": "tool", "name": "get_weather"},
                               messages=[{"role": "user", "content": "Weather in Rome?"}], extra_body=GREEDY) as s:
            kinds = [e.type for e in s]
            final = s.get_final_message()
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds
        assert "content_block_start" in kinds and final.stop_reason == "tool_use", (kinds, final)
        assert final.content[-1].type == "tool_use" and "city" in final.content[-1].input, final

    def structured_output():
        schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
        r = c.messages.create(model=MODEL, max_tokens=40, messages=[{"role": "user", "content": "A person as JSON."}],
                              output_config={"format": {"type": "json_schema", "schema": schema}}, extra_body=GREEDY)
        assert isinstance(json.loads(r.content[0].text)["name"], str), r

    def errors():
        try:
            c.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "aGk="}}]}])
            raise AssertionError("an image was accepted")
        except anthropic.BadRequestError as e:
            assert e.body["type"] == "error" and e.body["error"]["type"] == "invalid_request_error", e.body
            assert "image" in e.body["error"]["message"], e.body

    def count_tokens():
        counted = c.messages.count_tokens(model=MODEL, messages=ask, tools=[WEATHER])
        used = c.messages.create(model=MODEL, max_tokens=1, messages=ask, tools=[WEATHER], extra_body=GREEDY)
        assert counted.input_tokens == used.usage.input_tokens > 0, (counted, used.usage)

    for name, fn in [("message", whole_and_streamed), ("count tokens", count_tokens), ("stop", system_and_stop_sequence),
                     ("tool use", tool_use_round_trip), ("tool use streamed", tool_use_streamed),
                     ("structured", structured_output), ("errors", errors)]:
        check(f"{where} {name}", fn)


suite(WORKER, "worker")
suite(QUEEN, "queen")


def not_found():
    c = anthropic.Anthropic(base_url=QUEEN, api_key="not-needed", max_retries=0, timeout=60)
    try:
        c.messages.create(model="no-such-model", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        raise AssertionError("an unknown model answered")
    except anthropic.NotFoundError as e:
        assert e.body["error"]["type"] == "not_found_error", e.body


check("queen not found", not_found)
report()

"""The official `openai` client's Responses API (`client.responses`) against a
real rbee queen and worker: whole and streamed, a second turn by
`previous_response_id` that reads its prefix from the prompt cache, stored
responses fetched and deleted, function tools, structured output, errors.

Run by the integration test `fronts::ollama_and_anthropic_clients_work_against_queen_and_worker` as:
python3 responses_test.py QUEEN_URL WORKER_URL MODEL
"""
import json
import sys

import openai
from checks import check, report

QUEEN, WORKER, MODEL = sys.argv[1:4]
WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def suite(base, where):
    c = openai.OpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0, timeout=120)

    def whole_and_streamed():
        ask = dict(model=MODEL, input="Why is the sky blue?", max_output_tokens=8, temperature=0)
        c.responses.create(**ask)  # the next two read the prompt from the cache
        whole = c.responses.create(**ask)
        assert whole.object == "response" and whole.status == "incomplete", whole
        assert whole.incomplete_details.reason == "max_output_tokens", whole
        assert whole.output_text and whole.usage.output_tokens == 8 and whole.usage.input_tokens > 0, whole
        events = list(c.responses.create(stream=True, **ask))
        kinds = [e.type for e in events]
        assert kinds[0] == "response.created" and kinds[-1] == "response.incomplete", kinds
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert text == whole.output_text, (text, whole.output_text)
        assert [e.sequence_number for e in events] == list(range(len(events)))

    def previous_response_id():
        first = c.responses.create(model=MODEL, instructions="You are brief.", temperature=0,
                                   input="My name is Ada. " + "I like rivers and mills. " * 30, max_output_tokens=12)
        # Instructions are not carried over (as OpenAI's are not): a client sends them each turn.
        second = c.responses.create(model=MODEL, instructions="You are brief.", input="What is my name?",
                                    previous_response_id=first.id, temperature=0, max_output_tokens=12)
        assert second.previous_response_id == first.id, second
        assert second.usage.input_tokens > first.usage.input_tokens, (first.usage, second.usage)
        cached = second.usage.input_tokens_details.cached_tokens
        assert cached >= first.usage.input_tokens - 2, (cached, first.usage, second.usage)
        assert c.responses.retrieve(second.id).id == second.id
        c.responses.delete(second.id)
        try:
            c.responses.retrieve(second.id)
            raise AssertionError("a deleted response was found")
        except openai.NotFoundError:
            pass

    def function_tool():
        r = c.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER],
                               tool_choice="required", temperature=0, max_output_tokens=80)
        calls = [o for o in r.output if o.type == "function_call"]
        assert calls and calls[0].name == "get_weather" and "city" in json.loads(calls[0].arguments), r.output
        follow = c.responses.create(model=MODEL, previous_response_id=r.id, tools=[WEATHER], temperature=0,
                                    max_output_tokens=20, input=[{"type": "function_call_output",
                                                                  "call_id": calls[0].call_id, "output": "18 C"}])
        assert follow.output, follow

    def structured():
        schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
                  "additionalProperties": False}
        r = c.responses.create(model=MODEL, input="A person as JSON.", temperature=0, max_output_tokens=40,
                               text={"format": {"type": "json_schema", "name": "person", "schema": schema}})
        assert isinstance(json.loads(r.output_text)["name"], str), r.output_text

    def logprobs():
        ask = dict(model=MODEL, input="The capital of France is", max_output_tokens=4, temperature=0,
                   include=["message.output_text.logprobs"], top_logprobs=2)
        whole = c.responses.create(**ask)
        lps = whole.output[0].content[0].logprobs
        assert "".join(l.token for l in lps) == whole.output_text and len(lps) == 4, lps
        for l in lps:
            # Greedy: the token taken is the likelier of the two alternatives.
            assert len(l.top_logprobs) == 2 and l.top_logprobs[0].token == l.token, l
            assert l.logprob <= 0 and abs(l.logprob - l.top_logprobs[0].logprob) < 1e-4, l
        events = list(c.responses.create(stream=True, **ask))
        streamed = [l for e in events if e.type == "response.output_text.delta" for l in e.logprobs]
        assert [l.token for l in streamed] == [l.token for l in lps], (streamed, lps)
        plain = c.responses.create(**dict(ask, include=None, top_logprobs=None))
        assert plain.output[0].content[0].logprobs == [], plain

    def errors():
        for kwargs, says in [({"previous_response_id": "resp_nope"}, "resp_nope"),
                             ({"reasoning": {"effort": "high"}}, "reasoning")]:
            try:
                c.responses.create(model=MODEL, input="hi", **kwargs)
                raise AssertionError(f"{kwargs} was accepted")
            except openai.BadRequestError as e:
                assert says in str(e), e

    for name, fn in [("whole and streamed", whole_and_streamed), ("previous response", previous_response_id),
                     ("function tool", function_tool), ("structured", structured), ("logprobs", logprobs), ("errors", errors)]:
        check(f"{where} responses {name}", fn)


suite(WORKER, "worker")
suite(QUEEN, "queen")
report()

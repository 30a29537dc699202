"""The OpenAI API beyond chat, with the official `openai` client against a
real rbee worker and a real queen: embeddings, structured output, tool calls.

Run by the integration test `openai::the_official_python_client_works_against_worker_and_queen`
as: python3 complete_test.py WORKER_URL QUEEN_URL MODEL
"""
import json
import math
import sys

import openai
from checks import check, report
import pydantic

MODEL = sys.argv[3]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


def valid_weather_args(arguments):
    args = json.loads(arguments)
    assert set(args) == {"city", "unit"}, args
    assert isinstance(args["city"], str) and args["unit"] in ("celsius", "fahrenheit"), args
    return args


class Person(pydantic.BaseModel):
    name: str
    age: int
    # maxItems: the grammar ends the list where a small model would not.
    languages: list[str] = pydantic.Field(max_length=3)


def suite(base, where):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0, timeout=180)

    def embeddings():
        texts = ["The cat sat on the mat.", "The cat sat on the mat.", "Stock markets fell sharply today."]
        r = client.embeddings.create(model=MODEL, input=texts)
        vectors = [d.embedding for d in r.data]
        assert len(vectors) == 3 and [d.index for d in r.data] == [0, 1, 2], r
        assert len(vectors[0]) == len(vectors[2]) > 100, len(vectors[0])
        cos = lambda a, b: sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
        assert cos(vectors[0], vectors[1]) > 0.9999, cos(vectors[0], vectors[1])
        assert cos(vectors[0], vectors[2]) < 0.99, cos(vectors[0], vectors[2])
        assert r.usage.prompt_tokens > 0, r.usage
        # The client asks for base64 by default without numpy; a string in, one vector out.
        one = client.embeddings.create(model=MODEL, input="The cat sat on the mat.", encoding_format="base64")
        assert len(one.data) == 1, one

    def parse_pydantic():
        r = client.beta.chat.completions.parse(
            model=MODEL,
            messages=[{"role": "user", "content": "Describe Ada, 36, who speaks English and French, as JSON."}],
            response_format=Person, max_tokens=120, temperature=0)
        person = r.choices[0].message.parsed
        assert isinstance(person, Person), r
        assert isinstance(person.age, int) and 0 <= len(person.languages) <= 3, person

    def json_object():
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Give me a JSON object about Paris."}],
            response_format={"type": "json_object"}, max_tokens=80, temperature=0)
        text = r.choices[0].message.content
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict), text

    def unsupported_schema_is_400():
        try:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {}}}})
        except openai.BadRequestError as e:
            assert "not" in str(e) and "is not supported" in str(e), e
        else:
            raise AssertionError("an unsupported schema was accepted")

    def tool_required():
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[WEATHER], tool_choice="required", max_tokens=80, temperature=0)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather", call
        valid_weather_args(call.function.arguments)
        assert call.id, call

    def tool_required_streamed():
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[WEATHER], tool_choice="required", max_tokens=80, temperature=0, stream=True)
        calls, finish = {}, None
        for chunk in stream:
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            for tc in delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": "", "arguments": "", "id": None})
                if tc.id:
                    entry["id"] = tc.id
                if tc.function and tc.function.name:
                    entry["name"] += tc.function.name
                if tc.function and tc.function.arguments:
                    entry["arguments"] += tc.function.arguments
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "tool_calls", finish
        assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"], calls
        valid_weather_args(calls[0]["arguments"])

    def tool_round_trip():
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        first = client.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER], max_tokens=80, temperature=0,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        call = first.choices[0].message.tool_calls[0]
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]})
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "unit": "celsius"})})
        second = client.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER], max_tokens=40, temperature=0)
        choice = second.choices[0]
        assert choice.finish_reason in ("stop", "length", "tool_calls"), choice
        assert choice.message.content or choice.message.tool_calls, choice
        assert second.usage.prompt_tokens > first.usage.prompt_tokens, (first.usage, second.usage)

    for name, fn in [("embeddings", embeddings), ("parse_pydantic", parse_pydantic), ("json_object", json_object),
                     ("unsupported_schema_is_400", unsupported_schema_is_400), ("tool_required", tool_required),
                     ("tool_required_streamed", tool_required_streamed), ("tool_round_trip", tool_round_trip)]:
        check(f"{where}: {name}", fn)


suite(sys.argv[1], "worker")
suite(sys.argv[2], "queen")
report()

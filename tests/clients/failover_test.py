"""The official `openai` client through a failover: the queen's worker is
killed mid-answer, and the answer, streamed or whole, comes out as if nothing
had happened (greedy: the same text as an uninterrupted run).

Run by the integration test
`resilience::the_official_client_streams_through_a_failover_without_a_break` as:
python3 failover_test.py QUEEN_URL MODEL PID_OF_THE_SERVING_WORKER
"""
import json
import os
import signal
import sys
import threading
import time
import urllib.request

import openai
from checks import check, report

QUEEN, MODEL, PID = sys.argv[1], sys.argv[2], int(sys.argv[3])
MESSAGES = [{"role": "user", "content": "Tell me a long story about a dragon."}]
MAX = 120


client = openai.OpenAI(base_url=f"{QUEEN}/v1", api_key="not-needed", max_retries=0, timeout=120)
reference = {}


def ready_worker():
    """The one ready worker the queen sees: its pid and URL."""
    with urllib.request.urlopen(f"{QUEEN}/v1/workers") as r:
        workers = [w for w in json.load(r) if w["state"] == "ready"]
    assert len(workers) == 1, workers
    return workers[0]["pid"], workers[0]["url"]


def uninterrupted():
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX, temperature=0)
    assert r.choices[0].finish_reason == "length", r
    assert r.usage.completion_tokens == MAX, r.usage
    reference["text"] = r.choices[0].message.content


def streamed_through_a_kill():
    pid, _ = ready_worker()
    assert pid == PID, (pid, PID)
    chunks, killed = [], False
    for c in client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}):
        chunks.append(c)
        texts = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
        if texts == 30 and not killed:
            os.kill(PID, signal.SIGKILL)
            killed = True
    assert killed, "the answer ended before 30 chunks"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"], finishes
    assert text == reference["text"], (text, reference["text"])
    assert chunks[-1].usage.completion_tokens == MAX, chunks[-1].usage


def whole_through_a_kill():
    pid, url = ready_worker()
    assert pid != PID, "a new worker took over"

    def kill_once_busy():
        deadline = time.time() + 60
        while time.time() < deadline:
            with urllib.request.urlopen(f"{url}/v1/ready") as r:
                if json.load(r)["slots_busy"] > 0:
                    time.sleep(0.2)
                    os.kill(pid, signal.SIGKILL)
                    return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_once_busy)
    killer.start()
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=MAX, temperature=0)
    killer.join()
    r = raw.parse()
    # The job behind the answer narrates the failover.
    with urllib.request.urlopen(f"{QUEEN}/v1/jobs/{raw.headers['x-rbee-job']}/stream") as s:
        narration = s.read().decode()
    assert '"action":"failover"' in narration, narration
    assert r.choices[0].finish_reason == "length", r
    assert r.usage.completion_tokens == MAX, r.usage
    assert r.choices[0].message.content == reference["text"], (r.choices[0].message.content, reference)


for name, fn in [("uninterrupted", uninterrupted), ("streamed through a kill", streamed_through_a_kill),
                 ("whole through a kill", whole_through_a_kill)]:
    check(name, fn)
report()

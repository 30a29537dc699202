"""What the benchmark scripts share (bench/run.py, bench/split.py): where the
repository is, the prompt, free ports, waiting for a server, and the figures
of a token stream. Standard library only.
"""
import http.client, json, socket, statistics, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Once upon a time, in a small village by the sea, there lived"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port, path, ok, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            r = c.getresponse()
            body = r.read().decode(errors="replace")
            if ok(r.status, body):
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"port {port}{path} not ready")


def figures(t0, times):
    ttft = (times[0] - t0) * 1000
    tps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
    return {"ttft_ms": ttft, "decode_tps": tps, "tokens": len(times)}


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def stream(port, method, path, body=None, lines=False):
    """Sends a request; its start time, and its answer's events as they arrive:
    (time, event) for each SSE `data:` event, or with `lines` each JSON line
    (Ollama's), until `[DONE]` or the stream's end. The one reader of streams."""
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request(method, path, body=json.dumps(body) if body is not None else None,
              headers={"content-type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"{path}: HTTP {r.status} {r.read()[:300]!r}")

    def read():
        try:
            for raw in r:
                line = raw.decode(errors="replace").strip()
                if lines and line:
                    yield time.perf_counter(), json.loads(line)
                elif line.startswith("data: "):
                    if line[6:] == "[DONE]":
                        return
                    yield time.perf_counter(), json.loads(line[6:])
        finally:
            c.close()
    return t0, read()


def sse_tokens(port, method, path, body, is_token):
    """Sends a request and reads its SSE answer; times of the request and of each token."""
    t0, events = stream(port, method, path, body)
    times = []
    for t, event in events:
        if is_token(event):
            times.append(t)
        if event.get("type") == "error":
            raise RuntimeError(f"{path}: {event}")
        if event.get("stop") is True or event.get("type") == "end":
            break
    return t0, times

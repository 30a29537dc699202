#!/usr/bin/env python3
"""rbee side by side with llama.cpp's llama-server and the bare engine (make bench).

Every contender runs the same model, threads, total context, prompt, temperature 0
and number of generated tokens; runs alternate between contenders (A B C A B C ...)
so drift on the machine hits all of them alike. Prints one table of medians with
ratios and the targets, and writes every figure to bench/results/<time>.json.
Standard library only.
"""
import argparse, http.client, json, os, shutil, signal, subprocess, sys, tempfile, threading, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROMPT, ROOT, figures, free_port, median, sse_tokens, stream, wait_http  # noqa: E402


class Rbee:
    name = "rbee worker"

    def __init__(self, a, flags=()):
        self.port = free_port()
        if flags:
            self.name = f"{self.name} {' '.join(flags)}"
        self.proc = subprocess.Popen(
            [a.rbee, "worker", "--model", a.model, "--port", str(self.port), "--threads", str(a.threads),
             "--slots", str(a.slots), "--ctx-size", str(a.ctx // a.slots), *flags, *getattr(a, "rbee_args", ())],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(self.port, "/v1/ready", lambda s, b: '"ready":true' in b)

    def stream(self, a):
        # The same prompt every run: without this it would come from the prompt cache.
        return sse_tokens(self.port, "POST", "/v1/inference",
                          {"prompt": PROMPT, "max_tokens": a.tokens, "temperature": 0, "cache_prompt": False},
                          lambda e: e.get("type") == "token")

    def chat(self, messages, max_tokens):
        return chat_ttft(self.port, messages, max_tokens)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


class LlamaServer:
    name = "llama-server"

    def __init__(self, a, flags=()):
        self.port = free_port()
        if flags:
            self.name = f"{self.name} {' '.join(flags)}"
        # The prompt cache is llama-server's default; the single-prompt table turns it off per request.
        self.proc = subprocess.Popen(
            [a.llama_server, "-m", a.model, "--port", str(self.port), "-t", str(a.threads), "-tb", str(a.threads),
             "-np", str(a.slots), "-c", str(a.ctx), "--no-webui", *flags, *getattr(a, "llama_args", ())],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(self.port, "/health", lambda s, b: s == 200)

    def stream(self, a):
        return sse_tokens(self.port, "POST", "/completion",
                          {"prompt": PROMPT, "n_predict": a.tokens, "temperature": 0, "stream": True,
                           "cache_prompt": False},
                          lambda e: bool(e.get("content")))

    def chat(self, messages, max_tokens):
        return chat_ttft(self.port, messages, max_tokens)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


class Chain:
    """keeper → queen → hive → worker, warm: the queen's job API, as the keeper uses it.

    The queen has `hives` hives registered, as a cluster would: the one that serves
    (one worker with the bench's slots and context, like the bare worker's) and idle
    ones whose budget fits no worker. Routing comes from its live view of all of them."""
    name = "chain (queen)"

    def __init__(self, a, hives=8, tls=False):
        # With `tls`, the queen reaches its hives and the worker over TLS 1.3 as it
        # does between machines (the hive's certificate pinned), here on loopback.
        self.tls = tls
        if tls:
            self.name = "chain, TLS"
        self.homes, self.hives = [], []
        self.hive_port = self.start_hive(a, [])
        started = json.loads(http_post(self.hive_port, "/v1/workers/spawn", {
            "model_ref": "file:" + a.model, "slots": a.slots, "ctx_size": a.ctx // a.slots}, tls=tls))
        if tls and not started["url"].startswith("https://"):
            raise RuntimeError(f"a worker spawned over TLS is given out as {started['url']}")
        wait_http(self.hive_port, "/v1/workers/list", lambda s, b: '"state":"ready"' in b)
        self.worker_pid = started["pid"]
        idle = [self.start_hive(a, ["--max-memory", "64MB"]) for _ in range(hives - 1)]
        self.port = free_port()
        env = dict(os.environ, RBEE_HOME=self.home())
        self.proc = subprocess.Popen([a.rbee, "queen", "--port", str(self.port)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(self.port, "/health", lambda s, b: s == 200)
        scheme = "https" if tls else "http"
        for i, port in enumerate([self.hive_port] + idle):
            http_post(self.port, "/v1/hives", {"name": f"h{i}", "url": f"{scheme}://127.0.0.1:{port}"})
        wait_http(self.port, "/v1/workers", lambda s, b: '"state":"ready"' in b)
        self.stream(a)  # warm

    def home(self):
        self.homes.append(tempfile.mkdtemp(prefix="rbee-bench-"))
        return self.homes[-1]

    def start_hive(self, a, extra):
        port = free_port()
        self.hives.append(subprocess.Popen(
            [a.rbee, "hive", "--port", str(port), "--data-dir", self.home(), "--worker-port", str(free_port())]
            + extra, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_http(port, "/health", lambda s, b: s == 200)
        return port

    def stream(self, a):
        body = {"model": a.model, "prompt": PROMPT, "max_tokens": a.tokens, "temperature": 0, "cache_prompt": False}
        t0 = time.perf_counter()
        job = json.loads(http_post(self.port, "/v1/jobs", body))
        _, times = sse_tokens(self.port, "GET", job["sse_url"], None, lambda e: e.get("type") == "token")
        return t0, times

    def pids(self):
        """Queen, serving hive and worker process ids."""
        return self.proc.pid, self.hives[0].pid, self.worker_pid

    def stop(self):
        for p in [self.proc] + self.hives:
            p.send_signal(signal.SIGTERM)
        for p in [self.proc] + self.hives:
            p.wait()
        for home in self.homes:
            shutil.rmtree(home, ignore_errors=True)


def chat_ttft(port, messages, max_tokens):
    """One streamed chat turn through /v1/chat/completions: time to first token (ms) and the answer."""
    body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0, events = stream(port, "POST", "/v1/chat/completions", body)
    first, text = None, []
    for t, event in events:
        piece = ((event.get("choices") or [{}])[0].get("delta") or {}).get("content")
        if piece:
            first = first or t
            text.append(piece)
    return ((first or time.perf_counter()) - t0) * 1000, "".join(text)


def front_stream(port, front, model, content, max_tokens):
    """One streamed chat turn through one of the queen's fronts: the request's time and
    each text piece's. The same turn, greedy, whichever protocol carries it."""
    messages = [{"role": "user", "content": content}]
    path, body = {
        "openai": ("/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": max_tokens,
                                            "temperature": 0, "stream": True}),
        "ollama": ("/api/chat", {"model": model, "messages": messages, "stream": True,
                                 "options": {"num_predict": max_tokens, "temperature": 0, "repeat_penalty": 1.0}}),
        "anthropic": ("/v1/messages", {"model": model, "messages": messages, "max_tokens": max_tokens,
                                       "temperature": 0, "stream": True}),
        "responses": ("/v1/responses", {"model": model, "input": content, "max_output_tokens": max_tokens,
                                        "temperature": 0, "stream": True}),
    }[front]
    t0, events = stream(port, "POST", path, body, lines=front == "ollama")
    times = []
    for t, event in events:
        if front == "ollama":
            text = event.get("message", {}).get("content")
        elif front == "openai":
            text = ((event.get("choices") or [{}])[0].get("delta") or {}).get("content")
        elif front == "responses":
            text = event.get("delta") if event.get("type") == "response.output_text.delta" else None
        else:
            text = (event.get("delta") or {}).get("text")
        if text:
            times.append(t)
        if event.get("done") or event.get("type") in ("message_stop", "response.completed", "response.incomplete") \
                or (event.get("choices") or [{}])[0].get("finish_reason"):
            break
    return t0, times


FRONTS = ["openai", "ollama", "anthropic", "responses"]


def fronts_section(a, chain):
    """The same chat turn through each of the queen's fronts, alternating (each first in
    turn), each run's text its own so no prompt cache carries over: TTFT and decode tok/s."""
    runs = {f: [] for f in FRONTS}
    for run in range(a.runs):
        # Each front goes first in turn: no front always follows the same one.
        for k, front in enumerate(FRONTS[run % len(FRONTS):] + FRONTS[:run % len(FRONTS)]):
            content = f"Story {run:03d}-{k}: {PROMPT}"
            runs[front].append(figures(*front_stream(chain.port, front, a.model, content, a.tokens)))
    return runs


def streamed_turn(port, path, body):
    """One streamed turn (chat completions or responses): its request's size in
    bytes, time to first text (ms), the text, and the response's id if any."""
    body = dict(body, stream=True)
    t0, events = stream(port, "POST", path, body)
    first, text, rid = None, [], None
    for t, event in events:
        if event.get("type") == "response.created":
            rid = event["response"]["id"]
        piece = event.get("delta") if event.get("type") == "response.output_text.delta" else \
            ((event.get("choices") or [{}])[0].get("delta") or {}).get("content")
        if piece:
            first = first or t
            text.append(piece)
    return len(json.dumps(body).encode()), ((first or time.perf_counter()) - t0) * 1000, "".join(text), rid


def previous_response_section(a, chain):
    """Conversations over a document, each later turn sent whole through chat
    completions or as the new turn alone with previous_response_id (each its own
    conversation, both warm in the prompt cache): bytes sent and TTFT, turns 2+."""
    out = {"chat_completions": {"bytes": [], "ttft_ms": []}, "previous_response_id": {"bytes": [], "ttft_ms": []}}
    for run in range(max(1, a.chat_runs)):
        # Within the chain worker's context per slot (1,024 tokens of its 8 slots).
        first = document(f"resp-{run}", min(a.doc_sentences, 25)) + "\n" + QUESTIONS[0]
        messages, previous = [], None
        for turn, q in enumerate(QUESTIONS[:a.chat_turns]):
            said = first if turn == 0 else q
            messages.append({"role": "user", "content": said})
            sent, ttft, text, _ = streamed_turn(chain.port, "/v1/chat/completions", {
                "model": a.model, "messages": messages, "max_tokens": a.chat_tokens, "temperature": 0})
            messages.append({"role": "assistant", "content": text})
            body = {"model": a.model, "input": said, "max_output_tokens": a.chat_tokens, "temperature": 0}
            if previous:
                body["previous_response_id"] = previous
            sent_r, ttft_r, _, previous = streamed_turn(chain.port, "/v1/responses", body)
            if turn:
                out["chat_completions"]["bytes"].append(sent)
                out["chat_completions"]["ttft_ms"].append(ttft)
                out["previous_response_id"]["bytes"].append(sent_r)
                out["previous_response_id"]["ttft_ms"].append(ttft_r)
    return out


def fronts_table(fronts, previous):
    """Medians per front, and each front against OpenAI's (the targets: within 2%);
    later turns by previous_response_id against whole conversations."""
    med = {f: {k: median([r[k] for r in v]) for k in ("ttft_ms", "decode_tps")} for f, v in fronts.items()}
    lines = ["the queen's fronts, one chat turn streamed: " + ", ".join(
        f"{f} TTFT {v['ttft_ms']:.1f} ms {v['decode_tps']:.1f} tok/s" for f, v in med.items())]
    whole, by_id = previous["chat_completions"], previous["previous_response_id"]
    lines.append(f"later turns: whole conversation {median(whole['bytes']):.0f} bytes TTFT "
                 f"{median(whole['ttft_ms']):.1f} ms, by previous_response_id {median(by_id['bytes']):.0f} bytes "
                 f"TTFT {median(by_id['ttft_ms']):.1f} ms")
    checks = [("previous_response_id/whole turn bytes ≤ 0.2", median(by_id["bytes"]) / median(whole["bytes"]), -0.2),
              ("previous_response_id/whole turn TTFT ≤ 1.02",
               median(by_id["ttft_ms"]) / median(whole["ttft_ms"]), -1.02)]
    for f in FRONTS[1:]:
        checks.append((f"{f}/openai front tok/s ≥ 0.98", med[f]["decode_tps"] / med["openai"]["decode_tps"], 0.98))
        checks.append((f"{f}/openai front TTFT ≤ 1.02", med[f]["ttft_ms"] / med["openai"]["ttft_ms"], -1.02))
    return med, lines, checks


def fronts_only(a):
    """`--fronts-only`: the chain's queen, each front in turn, and nothing else."""
    chain = Chain(a, a.hives)
    try:
        fronts = fronts_section(a, chain)
        previous = previous_response_section(a, chain)
    finally:
        chain.stop()
    med, lines, checks = fronts_table(fronts, previous)
    lines.insert(0, f"machine: {os.cpu_count()} cores, threads {a.threads}, model {Path(a.model).name}, "
                    f"{a.tokens} tokens at temperature 0, {a.runs} runs each, medians")
    for name, value, target in checks:
        met = value >= target if target > 0 else value <= -target
        lines.append(f"{name:<52}{value:>10.3f}  {'met' if met else 'MISSED'}")
    print("\n".join(lines))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    out = Path(a.out) / time.strftime("fronts-%Y%m%d-%H%M%S.json")
    out.write_text(json.dumps({"settings": vars(a), "fronts": fronts, "fronts_medians": med, "previous_response": previous,
                               "checks": [{"name": n, "value": v} for n, v, _ in checks], "table": lines}, indent=1))
    print(f"figures: {out}")


def document(tag, sentences):
    """A long system document; `tag` makes each run's text its own, so no cache carries over."""
    return f"Document {tag}. " + " ".join(
        f"Fact {i}: the river passes mill {i} at noon and the baker there sells {i % 7 + 2} loaves."
        for i in range(sentences))


QUESTIONS = ["What does the document describe?", "Which mill is mentioned first?", "How many loaves at mill 3?",
             "Summarize it in one sentence.", "What happens at noon?", "Name any two mills."]


def conversation_turns(server, tag, sentences, turns, max_tokens):
    """One conversation over a long document: the TTFT of each turn."""
    messages = [{"role": "system", "content": document(tag, sentences)}]
    ttfts = []
    for q in QUESTIONS[:turns]:
        messages.append({"role": "user", "content": q})
        ttft, answer = server.chat(messages, max_tokens)
        ttfts.append(ttft)
        messages.append({"role": "assistant", "content": answer})
    return ttfts


def interleaved_turns(server, tag, conversations, sentences, rounds, max_tokens):
    """Conversations advanced round-robin: the TTFT of every turn after each one's first."""
    chats = [[{"role": "system", "content": document(f"{tag}-{k}", sentences)}] for k in range(conversations)]
    later = []
    for round_ in range(rounds):
        for messages in chats:
            messages.append({"role": "user", "content": QUESTIONS[round_ % len(QUESTIONS)]})
            ttft, answer = server.chat(messages, max_tokens)
            if round_ > 0:
                later.append(ttft)
            messages.append({"role": "assistant", "content": answer})
    return later


def chat_section(a, with_llama):
    """Multi-turn chat, rbee against llama-server with its caches on: both with the same
    total KV (a.chat_ctx over a.chat_slots slots), alternating, medians. Both as they
    start by default, then both with flash attention off (on a CPU the faster at depth)."""
    class Chat:
        pass
    settings = Chat()
    settings.__dict__.update(vars(a))
    settings.slots, settings.ctx = a.chat_slots, a.chat_ctx
    servers = [Rbee(settings)] + ([LlamaServer(settings)] if with_llama else [])
    if a.chat_fa_off:
        servers += [Rbee(settings, ["--flash-attn", "off"])] + (
            [LlamaServer(settings, ["-fa", "off"])] if with_llama else [])
    one = {s.name: [] for s in servers}
    many = {s.name: [] for s in servers}
    try:
        for run in range(a.chat_runs):
            for s in servers:
                ttfts = conversation_turns(s, f"{s.name} run {run}", a.doc_sentences, a.chat_turns, a.chat_tokens)
                one[s.name].append({"first": ttfts[0], "later": ttfts[1:]})
                many[s.name].extend(interleaved_turns(s, f"{s.name} run {run} x", a.conversations,
                                                      a.doc_sentences // 2, a.chat_rounds, a.chat_tokens))
            print(f"chat run {run + 1}/{a.chat_runs} done", file=sys.stderr)
    finally:
        for s in servers:
            s.stop()
    return {name: {"first_turn_ms": median([r["first"] for r in runs]),
                   "later_turns_ms": median([t for r in runs for t in r["later"]]),
                   "interleaved_later_turns_ms": median(many[name])}
            for name, runs in one.items()}


def synthetic_model(shape, qtype="Q4_0"):
    """The synthetic GGUF of `shape` (bench/synthetic.py: real shapes, random weights),
    written on first use."""
    path = ROOT / f".models/synthetic/{shape}-{qtype}.gguf"
    subprocess.run([sys.executable, str(ROOT / "bench/synthetic.py"), shape, "--type", qtype, "--out", str(path)],
                   check=True, env=dict(os.environ, PYTHONPATH=str(ROOT / ".models/py")))
    return path


def chat_scaling(a, with_llama):
    """The chat section again, shorter (one run, flash attention as each starts), where
    rbee's attention kernel meets other shapes: SmolLM2 at more threads (on a machine
    with fewer cores, oversubscribed: a correctness and regression check, the speed
    figure comes from machines with the cores), and synthetic models of other attention
    shapes (llama-8kv128: an 8B's 8 KV heads of size 128, 4 layers); and SmolLM2 with a
    q8_0 KV cache (both servers), against the f16 of the chat section."""
    out = {}
    variants = [(f"SmolLM2, {t} threads", {"threads": t}) for t in a.chat_threads]
    variants += [("SmolLM2, KV cache q8_0", {"rbee_args": ["--cache-type-k", "q8_0", "--cache-type-v", "q8_0"],
                                             "llama_args": ["-ctk", "q8_0", "-ctv", "q8_0"]})] if a.chat_q8 else []
    variants += [(f"{shape}, {a.threads} threads", {"model": str(synthetic_model(shape)),
                                                    "doc_sentences": a.doc_sentences // 2})
                 for shape in a.chat_shapes]
    for label, changes in variants:
        v = argparse.Namespace(**vars(a))
        v.chat_runs, v.chat_fa_off, v.conversations, v.chat_rounds = 1, False, min(a.conversations, 4), 2
        for k, value in changes.items():
            setattr(v, k, value)
        print(f"chat: {label}", file=sys.stderr)
        out[label] = chat_section(v, with_llama)
    return out


def chat_scaling_lines(scaling):
    lines = ["chat turns at other threads, shapes and caches, TTFT ms (one run each; rbee/llama-server):",
             f"{'variant':<28}{'contender':<16}{'turn 1':>10}{'turns 2+':>10}{'interleaved 2+':>16}"]
    for label, chat in scaling.items():
        for k, v in chat.items():
            lines.append(f"{label:<28}{k:<16}{v['first_turn_ms']:>10.1f}{v['later_turns_ms']:>10.1f}"
                         f"{v['interleaved_later_turns_ms']:>16.1f}")
        if "llama-server" in chat:
            r, l = chat["rbee worker"], chat["llama-server"]
            lines.append(f"{'':<28}{'ratio':<16}{r['first_turn_ms'] / l['first_turn_ms']:>10.2f}"
                         f"{r['later_turns_ms'] / l['later_turns_ms']:>10.2f}"
                         f"{r['interleaved_later_turns_ms'] / l['interleaved_later_turns_ms']:>16.2f}")
    return lines


def chat_scaling_only(a):
    """Only the chat section at other threads and shapes (`--chat-scaling-only`)."""
    with_llama = Path(a.llama_server).exists()
    scaling = chat_scaling(a, with_llama)
    lines = [f"machine: {os.cpu_count()} cores", *chat_scaling_lines(scaling)]
    print("\n".join(lines))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    out = Path(a.out) / time.strftime("chat-scaling-%Y%m%d-%H%M%S.json")
    out.write_text(json.dumps({"settings": vars(a), "llama_cpp_versions": a.llama_version,
                               "chat_scaling": scaling, "table": lines}, indent=1))
    print(f"written: {out}")


def http_get(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", path)
    return c.getresponse().read()


def http_post(port, path, body, tls=False):
    """POST on loopback; over TLS (the daemon's own certificate, not checked here) when `tls`."""
    if tls:
        import ssl
        c = http.client.HTTPSConnection("127.0.0.1", port, timeout=60, context=ssl._create_unverified_context())
    else:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json"})
    r = c.getresponse()
    data = r.read()
    if r.status >= 300:
        raise RuntimeError(f"POST {path}: HTTP {r.status} {data[:300]!r}")
    return data


def rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def bare(a):
    out = subprocess.run([a.bare, a.model, PROMPT, str(a.tokens), str(a.threads), str(a.ctx // a.slots)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def aggregate(server, a, streams):
    results = [None] * streams

    def one(i):
        results[i] = server.stream(a)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = max(times[-1] for _, times in results)
    return sum(len(times) for _, times in results) / (end - start)


def cold_start(a):
    """`rbee keeper infer` with nothing running, to the first token on stdout."""
    home = tempfile.mkdtemp(prefix="rbee-cold-")
    queen = f"http://127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    p = subprocess.Popen([a.rbee, "keeper", "infer", "--queen-url", queen, "--ephemeral", "--quiet", "--node",
                          "localhost", "--model", a.model, "--max-tokens", "4", "--temperature", "0", PROMPT],
                         env=dict(os.environ, RBEE_HOME=home), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    p.stdout.read(1)
    first = time.perf_counter() - t0
    p.stdout.read()
    p.wait()
    shutil.rmtree(home, ignore_errors=True)
    return first * 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rbee", default=str(ROOT / "target/release/rbee"))
    ap.add_argument("--bare", default=str(ROOT / "target/release/examples/bare_engine"))
    ap.add_argument("--llama-server", default=str(ROOT / ".models/llama.cpp/build/bin/llama-server"))
    ap.add_argument("--llama-bench", default=str(ROOT / ".models/llama.cpp/build/bin/llama-bench"))
    ap.add_argument("--llama-version", default="")
    ap.add_argument("--model", default=str(ROOT / ".models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=8192, help="total context, shared by the slots")
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--hives", type=int, default=8, help="hives registered with the chain's queen")
    ap.add_argument("--chat-slots", type=int, default=4)
    ap.add_argument("--chat-ctx", type=int, default=8192, help="total context of the chat section")
    ap.add_argument("--chat-runs", type=int, default=3)
    ap.add_argument("--chat-turns", type=int, default=6)
    ap.add_argument("--chat-tokens", type=int, default=24, help="tokens per chat answer")
    ap.add_argument("--doc-sentences", type=int, default=60, help="about 1,300 tokens of system document")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--chat-rounds", type=int, default=3)
    ap.add_argument("--no-chat-fa-off", dest="chat_fa_off", action="store_false",
                    help="leave out the chat section's flash-attention-off rows")
    ap.add_argument("--chat-threads", type=lambda s: [int(t) for t in s.split(",") if t], default=[8, 16],
                    help="the chat section again at these thread counts (SmolLM2)")
    ap.add_argument("--chat-shapes", type=lambda s: [t for t in s.split(",") if t], default=["llama-8kv128"],
                    help="the chat section again on these synthetic shapes (bench/synthetic.py)")
    ap.add_argument("--no-chat-q8", dest="chat_q8", action="store_false",
                    help="skip the chat section with a q8_0 KV cache")
    ap.add_argument("--chat-scaling-only", action="store_true",
                    help="only the chat section at other threads and shapes")
    ap.add_argument("--split-runs", type=int, default=5)
    ap.add_argument("--split-layers", type=int, default=15, help="of SmolLM2's 30, on the lending hive")
    ap.add_argument("--tiny", action="store_true", help="one quick run of rbee's own contenders (for the test)")
    ap.add_argument("--fronts-only", action="store_true",
                    help="only the queen's fronts (OpenAI, Ollama, Anthropic) against each other")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    a = ap.parse_args()
    if a.tiny:
        a.runs, a.tokens, a.concurrency, a.slots, a.ctx, a.hives = 1, 8, "1,2", 2, 2048, 2
        a.chat_runs, a.chat_turns, a.chat_tokens, a.doc_sentences = 1, 2, 4, 6
        a.conversations, a.chat_rounds, a.chat_slots, a.chat_ctx = 3, 2, 2, 2048
        a.split_runs, a.chat_fa_off = 1, False
        a.chat_threads, a.chat_shapes, a.chat_q8 = [], [], False
    concurrency = [int(c) for c in a.concurrency.split(",")]
    if a.fronts_only:
        return fronts_only(a)
    if a.chat_scaling_only:
        return chat_scaling_only(a)
    with_llama = not a.tiny and Path(a.llama_server).exists()
    if not a.tiny and not with_llama:
        sys.exit(f"{a.llama_server} is missing: run `make bench`, which builds it")

    servers = [Rbee(a)] + ([LlamaServer(a)] if with_llama else [])
    chain = Chain(a, a.hives)
    chains = [chain, Chain(a, a.hives, tls=True)]
    single = {s.name: [] for s in servers + chains}
    single["bare engine"] = []
    agg = {s.name: {c: [] for c in concurrency} for s in servers + chains}
    try:
        for run in range(a.runs):
            for s in servers + chains:
                single[s.name].append(figures(*s.stream(a)))
            if Path(a.bare).exists():
                single["bare engine"].append(bare(a))
            for c in concurrency:
                for s in servers + chains:
                    agg[s.name][c].append(aggregate(s, a, c))
            print(f"run {run + 1}/{a.runs} done", file=sys.stderr)
        fronts = fronts_section(a, chain)
        previous = previous_response_section(a, chain)
        queen_pid, hive_pid, worker_pid = chain.pids()
        memory = {"queen_idle_mb": rss_mb(queen_pid), "hive_idle_mb": rss_mb(hive_pid),
                  "worker_loaded_mb": rss_mb(worker_pid)}
    finally:
        for s in servers + chains:
            s.stop()
    cold = [cold_start(a) for _ in range(a.runs)]
    llama_bench = None
    if with_llama and Path(a.llama_bench).exists():
        out = subprocess.run([a.llama_bench, "-m", a.model, "-t", str(a.threads), "-p", "16", "-n", str(a.tokens),
                              "-o", "json"], capture_output=True, text=True).stdout
        llama_bench = [{"n_prompt": r["n_prompt"], "n_gen": r["n_gen"], "avg_ts": r["avg_ts"]}
                       for r in json.loads(out or "[]")]

    chat = chat_section(a, with_llama)
    scaling = chat_scaling(a, with_llama)
    import split
    split_figures = split.section(a)

    med = {k: {f: median([r[f] for r in v]) for f in ("ttft_ms", "decode_tps")} for k, v in single.items() if v}
    med_agg = {k: {c: median(v) for c, v in per.items()} for k, per in agg.items()}
    rbee, srv, ch, b = med.get("rbee worker"), med.get("llama-server"), med.get("chain (queen)"), med.get("bare engine")
    tls = med.get("chain, TLS")

    def ratio(x, y):
        return x / y if x and y else float("nan")

    lines = [f"machine: {os.cpu_count()} cores, threads {a.threads}, model {Path(a.model).name}, "
             f"{a.tokens} tokens at temperature 0, {a.runs} runs each, medians",
             f"{'contender':<16}{'TTFT ms':>10}{'decode tok/s':>14}"]
    for k, v in med.items():
        lines.append(f"{k:<16}{v['ttft_ms']:>10.1f}{v['decode_tps']:>14.1f}")
    lines.append("aggregate decode tok/s by concurrent streams: " + ", ".join(
        f"{k}: " + " ".join(f"{c}→{v:.0f}" for c, v in per.items()) for k, per in med_agg.items()))
    checks = []
    if srv:
        checks.append(("rbee/llama-server single stream ≥ 0.98", ratio(rbee["decode_tps"], srv["decode_tps"]), 0.98))
        for c in concurrency:
            if c >= 4:
                checks.append((f"rbee/llama-server at {c} streams ≥ 1.0",
                               ratio(med_agg["rbee worker"][c], med_agg["llama-server"][c]), 1.0))
    if b:
        checks.append(("rbee/bare engine single stream ≥ 0.97", ratio(rbee["decode_tps"], b["decode_tps"]), 0.97))
    checks.append((f"chain TTFT overhead ms ≤ 3 ({a.hives} hives)", ch["ttft_ms"] - rbee["ttft_ms"], -3))
    for c in concurrency:
        if c >= 4:
            checks.append((f"chain/worker aggregate at {c} streams ≥ 0.95",
                           ratio(med_agg["chain (queen)"][c], med_agg["rbee worker"][c]), 0.95))
    checks.append(("chain/worker tok/s ≥ 0.99", ratio(ch["decode_tps"], rbee["decode_tps"]), 0.99))
    checks.append(("chain TLS TTFT overhead vs plain chain ms ≤ 1", tls["ttft_ms"] - ch["ttft_ms"], -1))
    checks.append(("chain TLS/plain chain tok/s ≥ 0.99", ratio(tls["decode_tps"], ch["decode_tps"]), 0.99))
    checks.append(("cold start ms ≤ 2000", median(cold), -2000))
    checks.append(("idle queen MB ≤ 20", memory["queen_idle_mb"], -20))
    checks.append(("idle hive MB ≤ 20", memory["hive_idle_mb"], -20))
    med_fronts, front_lines, front_checks = fronts_table(fronts, previous)
    lines += front_lines
    checks += front_checks
    lines.append(f"loaded worker RSS: {memory['worker_loaded_mb']:.0f} MB")
    lines.append(f"multi-turn chat, TTFT ms ({a.chat_slots} slots, total context {a.chat_ctx}, "
                 f"{a.chat_tokens}-token answers; {a.conversations} conversations interleaved):")
    lines.append(f"{'contender':<32}{'turn 1':>10}{'turns 2+':>10}{'interleaved 2+':>16}")
    for k, v in chat.items():
        lines.append(f"{k:<32}{v['first_turn_ms']:>10.1f}{v['later_turns_ms']:>10.1f}"
                     f"{v['interleaved_later_turns_ms']:>16.1f}")
    if "llama-server" in chat:
        r, l = chat["rbee worker"], chat["llama-server"]
        checks.append(("chat turns 2+ TTFT rbee/llama-server ≤ 1.0", ratio(r["later_turns_ms"], l["later_turns_ms"]), -1.0))
        checks.append(("interleaved turns 2+ TTFT rbee/llama-server ≤ 1.0",
                       ratio(r["interleaved_later_turns_ms"], l["interleaved_later_turns_ms"]), -1.0))
    lines += chat_scaling_lines(scaling)
    lines += split.lines(split_figures, a)
    for name, value, target in checks:
        met = value >= target if target > 0 else value <= -target
        lines.append(f"{name:<52}{value:>10.3f}  {'met' if met else 'MISSED'}")
    if llama_bench:
        lines.append("llama-bench: " + ", ".join(f"pp{r['n_prompt']} tg{r['n_gen']} {r['avg_ts']:.1f} t/s"
                                                  for r in llama_bench))
    print("\n".join(lines))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    out = Path(a.out) / time.strftime("bench-%Y%m%d-%H%M%S.json")
    out.write_text(json.dumps({"settings": vars(a), "llama_cpp_versions": a.llama_version, "single": single,
                               "medians": med, "aggregate": agg, "aggregate_medians": med_agg,
                               "cold_start_ms": cold, "memory_mb": memory, "llama_bench": llama_bench,
                               "chat": chat, "chat_scaling": scaling, "split": split_figures, "fronts": fronts,
                               "previous_response": previous,
                               "fronts_medians": med_fronts,
                               "checks": [{"name": n, "value": v} for n, v, _ in checks],
                               "table": lines}, indent=1))
    print(f"figures: {out}")


if __name__ == "__main__":
    main()

"""How costs grow (`make bench` runs it after bench/run.py): rbee's worker and
llama-server side by side in one run, on SmolLM2 and on a synthetic model of
Llama-3.2-1B's shape (bench/synthetic.py), each curve a few points:

- a chat turn's time to first token against the conversation's depth (1k, 2k,
  4k, 8k tokens already in the cache), and the decode speed of its answer there;
- aggregate decode tokens/s against concurrent streams (1, 2, 4, 8, 16), and for
  the larger shapes (`--single`: Llama-3.1-8B's) the single stream alone;
- the queen's routing overhead against registered hives, from bench/queen_scale's
  latest results (or a short run of it).

Figures to bench/results/curves-*.json; charts to bench/results/curves-*.png
and, under fixed names, to docs/curves/ (what the README shows).

    python3 bench/curves.py [--models smollm2,llama-3.2-1b] [--single llama-3.1-8b]
                            [--depths 1024,2048,4096,8192] [--gpu]

`--gpu` (bench/gpu.sh): llama-server offloads every layer (`-ngl 999`), as rbee's
worker does by default when built with a GPU backend.
"""
import argparse, glob, json, os, shutil, subprocess, sys, threading, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROMPT, ROOT, median, stream  # noqa: E402
import run  # noqa: E402

# About 21.7 tokens a sentence of run.document's text (60 sentences: ~1,300 tokens).
TOKENS_PER_SENTENCE = 21.7


def model_path(name):
    """The model's file and the context it was trained for."""
    if name == "smollm2":
        return str(ROOT / ".models/SmolLM2-135M-Instruct.Q4_1.gguf"), 8192
    return str(run.synthetic_model(name)), 32768


def settings(a, model, slots, ctx):
    s = argparse.Namespace(**vars(a))
    s.model, s.slots, s.ctx = model, slots, ctx
    if a.gpu:
        s.llama_args = ["-ngl", "999"]
    return s


def turn(port, messages, max_tokens):
    """One streamed chat turn: time to first token (ms), decode tokens/s, the answer."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0, events = stream(port, "POST", "/v1/chat/completions", body)
    times, text = [], []
    for t, e in events:
        delta = (e.get("choices") or [{}])[0].get("delta", {}).get("content")
        if delta:
            times.append(t)
            text.append(delta)
    ttft = (times[0] - t0) * 1000 if times else float("nan")
    tps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 2 else float("nan")
    return ttft, tps, "".join(text)


def tokens(port, text):
    """How many tokens `text` is, as the server's own /tokenize counts (both have it)."""
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", "/tokenize", body=json.dumps({"content": text}), headers={"content-type": "application/json"})
    return len(json.loads(c.getresponse().read())["tokens"])


def document_of(port, tag, target):
    """A run.document of about `target` tokens (never more), sized by the server's tokenizer."""
    n = max(1, int(target / TOKENS_PER_SENTENCE))
    for _ in range(4):
        doc = run.document(tag, n)
        have = tokens(port, doc)
        if have <= target and have > 0.97 * target:
            return doc
        n = max(1, int(n * target / have * 0.99))
    return run.document(tag, n)


def depth_curve(server, depths, answer_tokens, ctx):
    """Per depth: a document of that many tokens read (turn 1), then a question
    over it (turn 2, the point): its TTFT and its answer's decode speed. A depth
    the context cannot hold with the turn is read as deep as it can."""
    out = {}
    for d in depths:
        fits = min(d, ctx - answer_tokens - 160)
        doc = document_of(server.port, f"{server.name} depth {d} {time.time()}", fits)
        messages = [{"role": "system", "content": doc}, {"role": "user", "content": "What is this about?"}]
        _, _, answer = turn(server.port, messages, 8)
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Which mill is first?"}]
        ttft, tps, _ = turn(server.port, messages, answer_tokens)
        out[d] = {"ttft_ms": ttft, "decode_tps": tps}
        print(f"  {server.name}: depth {d}: TTFT {ttft:.0f} ms, decode {tps:.1f} tok/s", file=sys.stderr)
    return out


def streams_curve(server, a, counts):
    return {n: run.aggregate(server, a, n) for n in counts}


def queen_points(a):
    """Routing p50/p99 against hives, 10 in flight: bench/queen_scale's latest, else a short run.
    (Its files are named by time: in name order, the latest of each hive count wins.)"""
    found = {}
    for path in sorted(glob.glob(str(ROOT / "bench/results/queen-scale-*-x10.json"))):
        f = json.loads(Path(path).read_text())
        found[f["hives"]] = f
    if not found:
        exe = ROOT / "target/release/examples/queen_scale"
        for n in (10, 100, 1000):
            out = ROOT / f"bench/results/queen-scale-{time.strftime('%Y%m%d-%H%M%S')}-{n}-hives-x10.json"
            subprocess.run([str(exe), "--rbee", a.rbee, "--hives", str(n), "--jobs", "1000",
                            "--concurrency", "10", "--json", str(out)], check=True)
            found[n] = json.loads(out.read_text())
    return {n: {"p50_ms": f["routing_p50_ms"], "p99_ms": f["routing_p99_ms"]} for n, f in sorted(found.items())}


def charts(figures, stamp, out, docs_too):
    """One PNG per curve, both servers and every model on it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib (make bench installs it): charts skipped", file=sys.stderr)
        return []
    written = []
    docs = ROOT / "docs/curves"
    docs.mkdir(parents=True, exist_ok=True)

    def save(fig, name):
        path = Path(out) / f"curves-{stamp}-{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        if docs_too:
            shutil.copy(path, docs / f"{'gpu-' if figures.get('gpu') else ''}{name}.png")
        written.append(str(path))

    for key, label, name in (("ttft_ms", "chat turn TTFT (ms)", "depth-ttft"),
                             ("decode_tps", "decode tokens/s", "depth-decode")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for model, per in figures["models"].items():
            for server, points in per["depth"].items():
                xs = sorted(int(d) for d in points)
                ax.plot(xs, [points[str(x)][key] if str(x) in points else points[x][key] for x in xs],
                        marker="o", label=f"{model}, {server}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens already in the conversation")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        save(fig, name)

    fig, ax = plt.subplots(figsize=(6, 4))
    for model, per in figures["models"].items():
        for server, points in per["streams"].items():
            xs = sorted(int(n) for n in points)
            ax.plot(xs, [points[str(x)] if str(x) in points else points[x] for x in xs], marker="o",
                    label=f"{model}, {server}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate decode tokens/s")
    ax.legend(fontsize=7)
    save(fig, "streams")

    q = figures.get("queen")
    if q:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = sorted(int(n) for n in q)
        for key in ("p50_ms", "p99_ms"):
            ax.plot(xs, [q[str(x)][key] if str(x) in q else q[x][key] for x in xs], marker="o", label=key[:3])
        ax.set_xscale("log")
        ax.set_xlabel("registered hives")
        ax.set_ylabel("queen routing overhead (ms), 10 in flight")
        ax.legend()
        save(fig, "queen-hives")
    return written


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rbee", default=str(ROOT / "target/release/rbee"))
    ap.add_argument("--llama-server", default=str(ROOT / ".models/llama.cpp/build/bin/llama-server"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--models", default="smollm2,llama-3.2-1b")
    ap.add_argument("--single", default="llama-3.1-8b", help="models measured at one stream only ('' for none)")
    ap.add_argument("--gpu", action="store_true", help="llama-server offloads every layer (-ngl 999)")
    ap.add_argument("--no-docs", action="store_true", help="charts to --out only, not docs/curves/")
    ap.add_argument("--depths", default="1024,2048,4096,8192")
    ap.add_argument("--streams", default="1,2,4,8,16")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per answer")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    a = ap.parse_args()
    depths = [int(d) for d in a.depths.split(",")]
    counts = [int(n) for n in a.streams.split(",")]
    with_llama = Path(a.llama_server).exists()
    figures = {"machine": f"{os.cpu_count()} cores", "threads": a.threads, "gpu": a.gpu, "models": {}}
    kinds = [run.Rbee] + ([run.LlamaServer] if with_llama else [])
    for name in a.models.split(","):
        model, trained = model_path(name)
        per = {"depth": {}, "streams": {}}
        # One slot deep enough for the deepest point (the model's context at most).
        ctx = min(max(depths) + 512, trained)
        deep = settings(a, model, 1, ctx)
        for kind in kinds:
            server = kind(deep)
            try:
                per["depth"][server.name] = depth_curve(server, depths, a.tokens, ctx)
            finally:
                server.stop()
        wide = settings(a, model, max(counts), max(counts) * 1024)
        wide.tokens = a.tokens
        for kind in kinds:
            server = kind(wide)
            try:
                per["streams"][server.name] = streams_curve(server, wide, counts)
                print(f"  {server.name}: streams {per['streams'][server.name]}", file=sys.stderr)
            finally:
                server.stop()
        figures["models"][name] = per
    for name in filter(None, a.single.split(",")):
        model, _ = model_path(name)
        one = settings(a, model, 1, 2048)
        one.tokens = a.tokens
        per = {"depth": {}, "streams": {}}
        for kind in kinds:
            server = kind(one)
            try:
                per["streams"][server.name] = streams_curve(server, one, [1])
                print(f"  {name}, {server.name}: one stream {per['streams'][server.name][1]:.1f} tok/s",
                      file=sys.stderr)
            finally:
                server.stop()
        figures["models"][name] = per
    # The queen's curve is the CPU run's (bench/queen_scale); a GPU run has only its own.
    figures["queen"] = {} if a.gpu else queen_points(a)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    figures["charts"] = charts(figures, stamp, a.out, not a.no_docs)
    out = Path(a.out) / f"curves-{stamp}.json"
    out.write_text(json.dumps(figures, indent=1))
    for model, per in figures["models"].items():
        print(f"{model}: depth → TTFT ms / decode tok/s; streams → aggregate tok/s")
        for server, points in per["depth"].items():
            print(f"  {server:<14}" + "  ".join(f"{d}: {p['ttft_ms']:.0f}/{p['decode_tps']:.1f}"
                                                  for d, p in points.items()))
        for server, points in per["streams"].items():
            print(f"  {server:<14}" + "  ".join(f"{n}→{v:.0f}" for n, v in points.items()))
    print("queen: " + "  ".join(f"{n} hives p50 {p['p50_ms']:.2f} p99 {p['p99_ms']:.2f} ms"
                                for n, p in figures["queen"].items()))
    print(f"figures: {out}")


if __name__ == "__main__":
    main()

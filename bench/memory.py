"""The memory estimate against reality (`make bench` runs it): for each model shape
and KV cache type, a worker started through a real hive, as placement sees it —

- the hive's estimate for it (`memory_mb` of the spawn's answer) and what it is made
  of (the hive's log: weights, KV cache, compute — llama.cpp's buffers — then a fixed
  margin for the runtime and the host-memory prompt cache's budget, `--cache-ram`);
- what llama.cpp reports allocating for it (its load log, which the hive passes on at
  debug level: the model, KV cache, compute and output buffers);
- its resident memory (VmRSS) after its context has been used (every slot filled with a
  prompt to within 192 tokens of its end and an answer of up to 128, at once).

    python3 bench/memory.py [--shapes smollm2,llama-3.2-1b,...] [--caches f16,q8_0]

Figures to bench/results/memory-*.json, and a table.
"""
import argparse, http.client, json, os, re, shutil, subprocess, sys, tempfile, threading, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, free_port, wait_http  # noqa: E402
import curves, run  # noqa: E402

BUFFER = re.compile(r"(\S+): .*?(model|KV|compute|output) buffer size = +([0-9.]+) MiB")
PARTS = re.compile(r"(\S+): memory estimate (\d+) MiB = .*\(llama\.cpp's buffers (\d+)\) \+ margin (\d+)")


def call(port, method, path, body=None, timeout=600):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request(method, path, body=json.dumps(body) if body is not None else None,
              headers={"content-type": "application/json"})
    r = c.getresponse()
    data = r.read()
    if r.status >= 300:
        raise RuntimeError(f"{method} {path}: HTTP {r.status} {data[:300]!r}")
    return json.loads(data) if data else None


def rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cache_ram_mb(pid):
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return int(args[args.index(b"--cache-ram") + 1])


def fill(port, slots, ctx, answer):
    """Every slot at once: a prompt that leaves room for `answer` tokens, and the answer."""
    def one(i):
        doc = curves.document_of(port, f"memory {i} {time.time()}", ctx - answer - 64)
        call(port, "POST", "/completion", {"prompt": doc, "n_predict": answer, "temperature": 0})
    threads = [threading.Thread(target=one, args=(i,)) for i in range(slots)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def measure(hive_port, log, shape, model, cache, slots, ctx):
    info = call(hive_port, "POST", "/v1/workers/spawn", {
        "model_ref": f"file:{model}", "backend": "cpu", "slots": slots, "ctx_size": ctx, "cache_type": cache})
    wid, pid, url = info["worker_id"], info["pid"], info["url"]
    estimate = info["memory_mb"]
    port = int(url.rsplit(":", 1)[1])
    try:
        wait_http(port, "/v1/ready", lambda s, b: '"ready":true' in b, timeout=300)
        cache_ram = cache_ram_mb(pid)
        loaded = rss_mb(pid)
        fill(port, slots, ctx, 128)
        used = rss_mb(pid)
    finally:
        call(hive_port, "POST", f"/v1/workers/{wid}/shutdown")
    buffers, parts = {}, None
    for line in Path(log).read_text(errors="replace").splitlines():
        if wid not in line:
            continue
        m = BUFFER.search(line)
        if m:
            buffers[m.group(2)] = buffers.get(m.group(2), 0.0) + float(m.group(3))
        m = PARTS.search(line)
        if m:
            parts = {"buffers_mb": int(m.group(3)), "margin_mb": int(m.group(4))}
    llama = sum(buffers.values())
    row = {"shape": shape, "cache": cache, "slots": slots, "ctx": ctx, "estimate_mb": estimate,
           "estimate_llama_mb": estimate - cache_ram, "cache_ram_mb": cache_ram,
           "estimate_buffers_mb": parts and parts["buffers_mb"], "margin_mb": parts and parts["margin_mb"],
           "llama_cpp_mb": llama, "llama_cpp_buffers_mb": buffers,
           "rss_loaded_mb": loaded, "rss_full_mb": used}
    print(f"  {shape} {cache}: estimate {estimate - cache_ram} MiB (+{cache_ram} prompt cache), "
          f"llama.cpp {llama:.0f} MiB {buffers}, RSS {loaded:.0f} → {used:.0f} MiB", file=sys.stderr)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rbee", default=str(ROOT / "target/release/rbee"))
    ap.add_argument("--shapes", default="smollm2,llama-3.2-1b,qwen2.5-1.5b,llama-8kv128,olmoe-mini,qwen3moe-mini")
    ap.add_argument("--caches", default="f16,q8_0")
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048, help="context of each slot")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    a = ap.parse_args()
    home = tempfile.mkdtemp(prefix="rbee-memory-")
    log = Path(home) / "hive.log"
    port = free_port()
    env = dict(os.environ, RBEE_HOME=home, RUST_LOG="info,llama-cpp-2=info,rbee::worker_log=debug")
    hive = subprocess.Popen([a.rbee, "hive", "--port", str(port), "--data-dir", home, "--idle-timeout", "10m"],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    rows = []
    try:
        wait_http(port, "/v1/health", lambda s, b: s == 200)
        for shape in a.shapes.split(","):
            model = curves.model_path(shape)[0] if shape == "smollm2" else str(run.synthetic_model(shape))
            for cache in a.caches.split(","):
                rows.append(measure(port, log, shape, model, cache, a.slots, a.ctx))
    finally:
        hive.terminate()
        hive.wait()
        shutil.rmtree(home, ignore_errors=True)
    lines = [f"machine: {os.cpu_count()} cores; {a.slots} slots of {a.ctx} tokens each; MiB",
             "(buffers: the estimate of llama.cpp's buffers; estimate: those, the margin and the prompt cache)",
             f"{'shape':<16}{'cache':<7}{'buffers':>8}{'llama.cpp':>10}{'ratio':>7}{'estimate':>9}"
             f"{'RSS loaded':>11}{'RSS full':>9}"]
    for r in rows:
        buffers = r["estimate_buffers_mb"] or float("nan")
        lines.append(f"{r['shape']:<16}{r['cache']:<7}{buffers:>8}{r['llama_cpp_mb']:>10.0f}"
                     f"{buffers / r['llama_cpp_mb']:>7.3f}{r['estimate_mb']:>9}"
                     f"{r['rss_loaded_mb']:>11.0f}{r['rss_full_mb']:>9.0f}")
    print("\n".join(lines))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    out = Path(a.out) / time.strftime("memory-%Y%m%d-%H%M%S.json")
    out.write_text(json.dumps({"rows": rows, "table": lines}, indent=1))
    print(f"figures: {out}")


if __name__ == "__main__":
    main()

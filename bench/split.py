#!/usr/bin/env python3
"""One model split across two machines against the same model on one worker (make bench).

A lending hive makes a lease (llama.cpp's RPC server on its loopback, reached
only through the hive's port); a worker gets `--remote LAYERS@URL` and keeps the
rest of the layers on its own CPU. Measured single-stream, greedy, the same prompt
each run: the worker whole, split over loopback (plain, and over TLS as between
machines), split between two network namespaces (a veth pair: separate network
stacks, addresses and a token on the lender's port; TLS, as everything between
machines is), and split with latency added in the tunnel, each chunk held 1 and
5 ms each way (RBEE_TUNNEL_DELAY_MS: `tc netem` is not available here). Runs
alternate between the variants; medians. As a section of bench/run.py, or alone:
`python3 bench/split.py --runs 3`. Needs root for the namespaces (else skipped).
Standard library only.
"""
import argparse, http.client, json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROMPT, ROOT, figures, free_port, median, sse_tokens, wait_http  # noqa: E402

NETNS = "rbee-bench-lend"
NEAR, FAR = "10.79.0.1", "10.79.0.2"
TOKEN = "rbee-bench-split"


def call(host, port, method, path, body=None):
    """A call with the token; over TLS beyond loopback (the lender's certificate is not
    checked here: the bench made it)."""
    if host == "127.0.0.1":
        c = http.client.HTTPConnection(host, port, timeout=60)
    else:
        import ssl
        c = http.client.HTTPSConnection(host, port, timeout=60, context=ssl._create_unverified_context())
    c.request(method, path, body=json.dumps(body) if body is not None else None,
              headers={"content-type": "application/json", "authorization": f"Bearer {TOKEN}"})
    r = c.getresponse()
    data = r.read()
    if r.status >= 300:
        raise RuntimeError(f"{method} {path}: HTTP {r.status} {data[:300]!r}")
    return json.loads(data or b"null")


def sh(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def netns_up():
    """A namespace on its own address, joined to this one by a veth pair; False without root."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    netns_down()
    try:
        sh("ip", "netns", "add", NETNS)
        sh("ip", "link", "add", "rbee-bsp0", "type", "veth", "peer", "name", "rbee-bsp1")
        sh("ip", "link", "set", "rbee-bsp1", "netns", NETNS)
        sh("ip", "addr", "add", f"{NEAR}/24", "dev", "rbee-bsp0")
        sh("ip", "link", "set", "rbee-bsp0", "up")
        inside = ["ip", "netns", "exec", NETNS]
        sh(*inside, "ip", "addr", "add", f"{FAR}/24", "dev", "rbee-bsp1")
        sh(*inside, "ip", "link", "set", "rbee-bsp1", "up")
        sh(*inside, "ip", "link", "set", "lo", "up")
        return True
    except subprocess.CalledProcessError as e:
        print(f"split bench: no network namespace ({e.stderr.strip()}); skipping that variant", file=sys.stderr)
        netns_down()
        return False


def identity(a, home):
    """The fingerprint of the hive identity in `home` (made there if it has none)."""
    return sh(a.rbee, "hive", "--show-identity", "--data-dir", home).stdout.strip()


def netns_down():
    sh("ip", "link", "del", "rbee-bsp0", check=False)
    sh("ip", "netns", "del", NETNS, check=False)


class Lender:
    """A hive that lends its CPU, on loopback or inside the namespace."""

    def __init__(self, a, netns):
        self.home = tempfile.mkdtemp(prefix="rbee-bench-lend-")
        self.fingerprint = identity(a, self.home)
        self.netns = netns
        self.port = free_port()
        self.host = FAR if netns else "127.0.0.1"
        cmd = [a.rbee, "hive", "--port", str(self.port), "--data-dir", self.home]
        if netns:
            cmd = ["ip", "netns", "exec", NETNS] + cmd + ["--host", "0.0.0.0"]
        self.proc = subprocess.Popen(cmd, env=dict(os.environ, RBEE_TOKEN=TOKEN),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.time() + 60
        while True:
            try:
                call(self.host, self.port, "GET", "/v1/health")
                break
            except OSError:
                if time.time() > end:
                    raise
                time.sleep(0.05)
        self.leases = 0

    def lease(self, layers, memory_mb, tls):
        """A lease of `memory_mb` (its RPC server holds no more); its id and tunnel URL
        (https:// when `tls`, which reaching the lender in the namespace needs)."""
        self.leases += 1
        lease = f"lease-bench-{self.leases}"
        call(self.host, self.port, "POST", "/v1/leases",
             {"lease": lease, "model": "bench", "borrower": "bench", "layers": layers,
              "memory_mb": memory_mb})
        scheme = "https" if tls else "http"
        return lease, f"{scheme}://{self.host}:{self.port}/v1/rpc?lease={lease}"

    def end(self, lease):
        """Ends a lease at once (a hive holds a few per borrower)."""
        call(self.host, self.port, "DELETE", f"/v1/leases/{lease}")

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
        shutil.rmtree(self.home, ignore_errors=True)


class Worker:
    def __init__(self, a, remote=None, delay_ms=0, passive=False, tls=None):
        """`tls`: (the worker's identity dir, the lender's fingerprint) for an https:// tunnel."""
        self.port = free_port()
        cmd = [a.rbee, "worker", "--model", a.model, "--port", str(self.port), "--threads", str(a.threads),
               "--slots", "1", "--ctx-size", "2048", "--cache-ram", "0"]
        if remote:
            cmd += ["--remote", remote]
        if tls:
            cmd += ["--identity-dir", tls[0], "--peer", tls[1]]
        # The lender's token for its tunnel; the worker itself takes none.
        env = dict(os.environ, RBEE_REMOTE_TOKENS=TOKEN, RBEE_TUNNEL_DELAY_MS=str(delay_ms))
        env.pop("RBEE_TOKEN", None)
        if passive:
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http_token(self.port)

    def stream(self, tokens):
        return sse_tokens(self.port, "POST", "/v1/inference",
                          {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "cache_prompt": False},
                          lambda e: e.get("type") == "token")

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def wait_http_token(port, timeout=180):
    end = time.time() + timeout
    while time.time() < end:
        try:
            if call("127.0.0.1", port, "GET", "/v1/ready").get("ready"):
                return
        except (OSError, RuntimeError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"worker on {port} not ready")


def section(a):
    """Medians per variant: TTFT and decode tokens/s, and the split/whole ratio."""
    layers = a.split_layers
    with_netns = netns_up()
    lenders = {"loopback": Lender(a, False)}
    if with_netns:
        lenders["netns"] = Lender(a, True)
    # Both "machines" share this one's cores: llama.cpp's OpenMP threads spin while
    # the worker waits for the lender, and take the cores the lender computes on.
    # With passive waits (OMP_WAIT_POLICY=PASSIVE) the pair shows what the split
    # itself costs, as on two machines.
    # (name, lender, added delay ms, passive waits, TLS)
    variants = [("one worker", None, 0, False, False), ("split, loopback", "loopback", 0, False, False),
                ("split, loopback, TLS", "loopback", 0, False, True),
                ("one worker, passive", None, 0, True, False),
                ("split, loopback, passive", "loopback", 0, True, False)]
    far = "netns" if with_netns else "loopback"
    if with_netns:
        variants += [("split, netns, TLS", "netns", 0, False, True)]
    variants += [(f"split, {far} +1 ms", far, 1, False, with_netns), (f"split, {far} +5 ms", far, 5, False, with_netns)]
    runs = {v[0]: [] for v in variants}
    # What a lease may hold: more than any share of the model's layers with their cache.
    memory_mb = 2 * os.path.getsize(a.model) // 2**20 + 1024
    # The worker's side of a TLS tunnel: an identity of its own (its hive's, in a cluster).
    worker_home = tempfile.mkdtemp(prefix="rbee-bench-borrow-")
    identity(a, worker_home)
    try:
        for _ in range(a.split_runs):
            for name, where, delay, passive, tls in variants:
                lease = None
                if where:
                    lease, url = lenders[where].lease(layers, memory_mb, tls)
                remote = f"{layers}@{url}" if where else None
                pinned = (worker_home, lenders[where].fingerprint) if tls else None
                w = Worker(a, remote, delay, passive, pinned)
                try:
                    w.stream(8)  # warm
                    runs[name].append(figures(*w.stream(a.tokens)))
                finally:
                    w.stop()
                    if lease:
                        lenders[where].end(lease)
    finally:
        for lender in lenders.values():
            lender.stop()
        if with_netns:
            netns_down()
        shutil.rmtree(worker_home, ignore_errors=True)
    med = {k: {f: median([r[f] for r in v]) for f in ("ttft_ms", "decode_tps")} for k, v in runs.items()}
    for k, v in med.items():
        whole = med["one worker, passive" if "passive" in k else "one worker"]["decode_tps"]
        v["vs_one_worker"] = v["decode_tps"] / whole if whole else float("nan")
    return {"layers_lent": layers, "runs": runs, "medians": med}


def lines(split, a):
    out = [f"one model across two machines: {split['layers_lent']} of 30 layers lent through the tunnel, "
           f"{a.tokens} tokens, single stream, {a.split_runs} runs each, medians:",
           f"{'variant':<24}{'TTFT ms':>10}{'decode tok/s':>14}{'vs one worker':>15}"]
    for k, v in split["medians"].items():
        out.append(f"{k:<24}{v['ttft_ms']:>10.1f}{v['decode_tps']:>14.1f}{v['vs_one_worker']:>15.2f}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rbee", default=str(ROOT / "target/release/rbee"))
    ap.add_argument("--model", default=str(ROOT / ".models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--split-runs", type=int, default=3)
    ap.add_argument("--split-layers", type=int, default=15)
    a = ap.parse_args()
    print("\n".join(lines(section(a), a)))


if __name__ == "__main__":
    main()

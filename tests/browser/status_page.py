"""The queen's status page in a real headless Chromium, driven over the
DevTools protocol on a pipe (--remote-debugging-pipe: no extra package).

Run by the integration test
`observe::the_status_page_in_a_real_browser_shows_the_hive_the_worker_and_the_job` as:
python3 status_page.py CHROMIUM QUEEN_URL HIVE_NAME MODEL_REF SCREENSHOT_DIR

The page is opened first; then a job runs, and the page must show it without
being reloaded (its status stream). Screenshots at a laptop's and a phone's
size are written to SCREENSHOT_DIR.
"""
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

CHROMIUM, QUEEN, HIVE, MODEL, SHOTS = sys.argv[1:6]


class Browser:
    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="rbee-chromium-")
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()

        def fds():  # Chromium reads commands on fd 3 and writes answers on fd 4.
            # Copies first (the pipes may sit on 3 and 4 already); dup2 makes
            # the targets survive the exec, which os.pipe's own fds do not.
            r, w = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(r, 3)
            os.dup2(w, 4)
            os.setsid()  # a group of its own: closing ends its helper processes too

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-pipe", f"--user-data-dir={self.profile}", "about:blank"],
            preexec_fn=fds, close_fds=False,
            # Its singleton socket's folder too, so that closing removes everything.
            env=dict(os.environ, TMPDIR=self.profile),
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.profile, "chromium.log"), "w"))
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.buf = b""
        self.next_id = 0
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def send(self, method, params=None, session=None):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self.buf:
                chunk = os.read(self.from_chrome, 65536)
                if not chunk:
                    raise RuntimeError("chromium went away")
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def page(self, method, params=None):
        return self.send(method, params, self.session)

    def dom(self):
        r = self.page("Runtime.evaluate", {"expression": "document.documentElement.outerHTML",
                                           "returnByValue": True})
        return r.get("result", {}).get("value") or ""

    def wait_for(self, what, texts, seconds=60):
        deadline = time.time() + seconds
        while time.time() < deadline:
            dom = self.dom()
            if all(t in dom for t in texts):
                return dom
            time.sleep(0.2)
        raise AssertionError(f"the page never showed {what}: {texts}\n{self.dom()}")

    def screenshot(self, name, width, height, mobile):
        self.page("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})
        time.sleep(0.3)
        data = self.page("Page.captureScreenshot", {"format": "png"})["data"]
        path = os.path.join(SHOTS, f"status-page-{name}.png")
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        print(f"screenshot {path}")

    def close(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for _ in range(50):  # its helpers may still be going away
            shutil.rmtree(self.profile, ignore_errors=True)
            if not os.path.exists(self.profile):
                break
            time.sleep(0.1)


def get(path):
    with urllib.request.urlopen(f"{QUEEN}{path}") as r:
        return json.load(r)


b = Browser()
try:
    b.page("Page.enable")
    b.page("Page.navigate", {"url": f"{QUEEN}/"})
    b.wait_for("the hive", [f'data-hive="{HIVE}"', "hives up"])
    print("ok the page shows the hive")
    # A job now, with the page open: it must appear by itself.
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0})
    req = urllib.request.Request(f"{QUEEN}/v1/jobs", data=body.encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req) as r:
        job = json.load(r)["job_id"]
    with urllib.request.urlopen(f"{QUEEN}/v1/jobs/{job}/stream") as r:
        r.read()
    worker = get("/v1/status")["workers"][0]["worker_id"]
    dom = b.wait_for("the worker and the finished job",
                     [f'data-worker="{worker}"', f'data-job="{job}"', 'class="badge done"'])
    print("ok the page shows the worker and the job, live")
    assert 'data-model="smollm2-135m-instruct.q4_1"' in dom, dom
    print("ok the page shows the hive's model")
    b.screenshot("laptop", 1280, 900, False)
    b.screenshot("phone", 390, 844, True)
finally:
    b.close()
print("all ok")

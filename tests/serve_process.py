"""`tide-cli serve` as a child process on a free localhost port, for the server and web tests and
the server benchmark."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "models", "tide-demo.gguf")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running server: .url, .proc; stop() sends SIGTERM and returns the exit code."""

    def __init__(self, *extra, model=DEMO, timeout=60.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "tide_cpp.cli", "serve", "-m", model, "--device", "sim",
               "--policy", "tide", "--gpu-experts", "4", "--port", str(self.port), *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tide-cli serve exited ({self.proc.returncode}):\n"
                                   f"{self.proc.stdout.read()}")
            try:
                if request(self.url + "/health")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"tide-cli serve did not answer within {timeout} s")
            time.sleep(0.1)

    def stop(self, timeout=60.0):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def output(self):
        return self.proc.stdout.read() if self.proc.poll() is not None else ""


def request(url, body=None, headers=None, method=None, timeout=60.0):
    """(status, decoded JSON or text) of one HTTP request; body: bytes, str or a JSON object."""
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def sse_events(raw):
    """[(event name or None, data str)] of a server-sent events body."""
    out = []
    for part in raw.split("\n\n"):
        if not part.strip():
            continue
        name, data = None, []
        for line in part.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        out.append((name, "\n".join(data)))
    return out

"""Load test of `tide-cli serve`: N concurrent clients for a bounded time, on 127.0.0.1 only.

Starts the server on the demo model (or --model), lets --clients threads send chat completions
(half of them streamed) back to back for --seconds, and prints requests/s, latency p50/p99,
errors, answers that differ from the same question's first answer (greedy decoding must give
one answer whatever the interleaving), and the server's resident memory before and after.

    .venv/bin/python bench/bench_server.py --clients 8 --seconds 30 \
        --out bench/results/server_demo_sim.txt
"""

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["What is 37 plus 48?", "How many minutes are in 3 hours?", "What is 12 times 7?",
             "How many grams are in 2 kilograms?", "What is 91 minus 36?"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def one_request(port, question, stream, max_tokens):
    """(latency seconds, answer text) of one chat completion; raises on any error."""
    body = {"model": "bench", "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens, "stream": stream}
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        raw = r.read().decode()
    finally:
        conn.close()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {raw[:200]}")
    if stream:
        text = []
        events = [e for e in raw.split("\n\n") if e.startswith("data: ")]
        if not events or events[-1] != "data: [DONE]":
            raise RuntimeError("stream did not end with [DONE]")
        for e in events[:-1]:
            chunk = json.loads(e[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"]:
                text.append(chunk["choices"][0]["delta"].get("content") or "")
        answer = "".join(text)
    else:
        answer = json.loads(raw)["choices"][0]["message"]["content"]
    return time.perf_counter() - t0, answer


def percentile(values, q):
    v = sorted(values)
    if not v:
        return float("nan")
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "tide-demo.gguf"))
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--server-args", default="--device sim --policy tide --gpu-experts 4",
                    help="options of tide-cli serve (default: %(default)s)")
    ap.add_argument("--out", default=None, help="also write the report to this file")
    a = ap.parse_args(argv)

    port = free_port()
    cmd = [sys.executable, "-m", "tide_cpp.cli", "serve", "-m", a.model, "--host", "127.0.0.1",
           "--port", str(port), "--max-queue", str(max(16, a.clients)), *a.server_args.split()]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                one_request(port, QUESTIONS[0], False, a.max_tokens)   # also the warm-up
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the server did not start:\n{proc.stderr.read()}")
                time.sleep(0.2)
        first = {q: one_request(port, q, False, a.max_tokens)[1] for q in QUESTIONS}
        rss_before = rss_kib(proc.pid)

        lat, errors, mismatches = [], [], []
        lock = threading.Lock()
        stop_at = time.monotonic() + a.seconds

        def client(i):
            n = i
            while time.monotonic() < stop_at:
                q = QUESTIONS[n % len(QUESTIONS)]
                try:
                    dt, answer = one_request(port, q, stream=bool(n % 2), max_tokens=a.max_tokens)
                    with lock:
                        lat.append(dt)
                        if answer != first[q]:
                            mismatches.append((q, answer))
                except Exception as e:   # counted and reported, never hidden
                    with lock:
                        errors.append(repr(e))
                n += 1

        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rss_after = rss_kib(proc.pid)
    finally:
        proc.terminate()
        code = proc.wait(60)

    lines = [
        f"bench_server: {os.path.basename(a.model)}, serve {a.server_args}, {a.clients} clients "
        f"for {a.seconds:.0f} s, max_tokens {a.max_tokens}, half streamed",
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, Python "
        f"{platform.python_version()}, load average {load:.1f} at the start (the machine is "
        "shared: figures are lower bounds)",
        f"requests: {len(lat)} ok in {wall:.1f} s = {len(lat) / wall:.1f} requests/s",
        f"latency: p50 {1000 * percentile(lat, 50):.1f} ms, p99 {1000 * percentile(lat, 99):.1f} "
        f"ms, max {1000 * max(lat, default=float('nan')):.1f} ms",
        f"errors: {len(errors)}; answers differing from the serial answer: {len(mismatches)}",
        f"server RSS: {rss_before / 1024:.1f} MiB before, {rss_after / 1024:.1f} MiB after "
        f"({(rss_after - rss_before) / 1024:+.1f} MiB)",
        f"server exit code after SIGTERM: {code}",
    ]
    for e in errors[:5]:
        lines.append(f"  error: {e}")
    for q, ans in mismatches[:5]:
        lines.append(f"  mismatch: {q!r} -> {ans!r}, first {first[q]!r}")
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(report)
        os.replace(tmp, a.out)
    return 1 if errors or mismatches or code != 0 else 0


if __name__ == "__main__":
    sys.exit(main())

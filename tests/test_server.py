"""tide-cli serve: OpenAI's API over the demo model, through real HTTP on localhost.

The official `openai` client talks to the server unchanged; errors are OpenAI-shaped and name the
field; requests from many clients queue and give the same answers as one at a time; a client that
hangs up cancels its generation; a full queue answers 503; SIGTERM exits cleanly."""

import http.client
import json
import random
import signal
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the server extra is not installed (pip install "
                                      "'tide_cpp[server]')")
pytest.importorskip("uvicorn", reason="the server extra is not installed")

from serve_process import Server, request, sse_events  # noqa: E402

QUESTION = [{"role": "user", "content": "What is 37 plus 48?"}]
ANSWER = "37 plus 48 is 85."
# About 120 denoising steps (one token a step, never above threshold 1.0): a job that runs long
# enough (about a second) to be seen running, queued behind, cancelled or interrupted.
SLOW = {"prompt": "1 2 3", "max_tokens": 120, "block_length": 128, "steps": 128,
        "threshold": 1.0, "eos_early_stop": False}


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    assert s.stop() == 0


def chat(server, body=None, **fields):
    return request(server.url + "/v1/chat/completions",
                   {"model": "tide-demo", "messages": QUESTION, **(body or {}), **fields})


def health(server):
    status, body = request(server.url + "/health")
    assert status == 200
    return body["queue"]


def wait_for(server, cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        q = health(server)
        if cond(q):
            return q
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting; queue: {health(server)}")


def stream_raw(server, path, body):
    """The whole server-sent events body of a streamed request."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", path, json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200, r.read()
    assert r.getheader("content-type").startswith("text/event-stream")
    raw = r.read().decode()
    conn.close()
    return raw


# ---- shapes -----------------------------------------------------------------------------------

def test_health_and_models(server):
    status, body = request(server.url + "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == "tide-demo"
    status, body = request(server.url + "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tide-demo"]
    assert body["data"][0]["object"] == "model"
    status, body = request(server.url + "/v1/models/tide-demo")
    assert status == 200 and body["id"] == "tide-demo"
    status, body = request(server.url + "/v1/models/gpt-4")
    assert status == 404 and body["error"]["code"] == "model_not_found"


def test_chat_completion_shape(server):
    status, body = chat(server, max_tokens=64)
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "tide-demo" and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": ANSWER}
    assert choice["finish_reason"] == "stop" and choice["index"] == 0
    u = body["usage"]
    assert u["prompt_tokens"] > 0 and u["completion_tokens"] > 0
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert body["tide"]["steps"] >= 1 and body["tide"]["tokens"] == u["completion_tokens"]


def test_finish_reason_length(server):
    status, body = chat(server, max_tokens=3)
    assert status == 200
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    assert ANSWER.startswith(body["choices"][0]["message"]["content"])


def test_stop_string(server):
    status, body = chat(server, stop=["48"])
    assert status == 200
    assert body["choices"][0]["message"]["content"] == "37 plus "
    assert body["choices"][0]["finish_reason"] == "stop"


def test_stream_matches_whole(server):
    raw = stream_raw(server, "/v1/chat/completions",
                     {"messages": QUESTION, "stream_options": {"include_usage": True}})
    events = sse_events(raw)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(d) for name, d in events[:-1] if name is None]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == ANSWER
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    usage = chunks[-1]   # include_usage: a last chunk with no choices and the usage
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    # named events are not OpenAI chunks; without denoise_events no step is sent
    names = {name for name, _ in events}
    assert "tide.step" not in names and "tide.stats" in names


def test_denoise_events_fill_the_canvas(server):
    raw = stream_raw(server, "/v1/chat/completions",
                     {"messages": QUESTION, "denoise_events": True, "threshold": 0.999})
    events = sse_events(raw)
    steps = [json.loads(d) for name, d in events if name == "tide.step"]
    assert len(steps) > 1   # threshold 0.999: more than one step
    assert [s["step"] for s in steps] == list(range(len(steps)))
    seen = {}
    for s in steps:
        for offset, text in s["unmasked"]:
            assert offset not in seen, "a position unmasked twice"
            assert s["start"] <= offset < s["end"]
            seen[offset] = text
        assert s["edited"] == []   # LLaDA2.0's schedule never edits a committed token
    assert steps[-1]["masked"] == 0 or steps[-1]["eos"]
    first_eos = min(o for s in steps for o in s["eos"])
    assert "".join(seen[i] for i in range(first_eos)) == ANSWER
    stats = [json.loads(d) for name, d in events if name == "tide.stats"]
    assert stats[0]["steps"] == len(steps)


def test_text_completion(server):
    status, body = request(server.url + "/v1/completions",
                           {"model": "tide-demo", "prompt": "37 plus 48 is", "max_tokens": 8})
    assert status == 200, body
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert isinstance(body["choices"][0]["text"], str)
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    raw = stream_raw(server, "/v1/completions", {"prompt": "37 plus 48 is", "max_tokens": 8})
    chunks = [json.loads(d) for name, d in sse_events(raw)[:-1] if name is None]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == body["choices"][0]["text"]


def test_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tide-demo"]
    out = client.chat.completions.create(model="tide-demo", messages=QUESTION, max_tokens=64,
                                         temperature=0, seed=7, extra_body={"threshold": 0.9})
    assert out.choices[0].message.content == ANSWER
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens > 0
    parts = []
    for chunk in client.chat.completions.create(model="tide-demo", messages=QUESTION,
                                                stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    assert "".join(parts) == ANSWER
    text = client.completions.create(model="tide-demo", prompt="37 plus 48 is", max_tokens=8)
    assert text.object == "text_completion"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tide-demo", messages=QUESTION, top_p=7)
    assert e.value.body["param"] == "top_p"


# ---- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("messages", []), ("messages", "hi"), ("messages", [{"content": "no role"}]),
    ("messages", [{"role": "user", "content": 5}]),
    ("max_tokens", 0), ("max_tokens", "many"), ("max_completion_tokens", -3),
    ("temperature", -1), ("temperature", "hot"), ("temperature", 3), ("top_p", 0),
    ("top_p", 1.5), ("top_k", -1), ("seed", 1.5), ("stop", 5), ("stop", ["a"] * 5),
    ("stream", "yes"), ("stream_options", 3), ("n", 2), ("logprobs", True), ("tools", [{}]),
    ("response_format", {"type": "json_object"}), ("block_length", 0), ("steps", 64),
    ("threshold", 0), ("threshold", 2), ("minimal_topk", 0), ("eos_early_stop", 1),
    ("denoise_events", "on"), ("model", 5), ("presence_penalty", 9),
])
def test_invalid_field_is_400_naming_it(server, field, value):
    status, body = chat(server, **{field: value})
    assert status == 400, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"].split("[")[0] == field and field in err["message"]


@pytest.mark.parametrize("raw", [b"{bad", b"[1, 2]", b"", b"\xff\xfe", b"null", b'"text"',
                                 b"[" * 100000, b'{"messages": NaN}'])
def test_malformed_json_is_400(server, raw):
    for path in ("/v1/chat/completions", "/v1/completions"):
        status, body = request(server.url + path, raw)
        assert status == 400 and body["error"]["code"] == "invalid_json"


def test_prompt_too_long_is_400(server):
    status, body = chat(server, messages=[{"role": "user", "content": "7 " * 3000}])
    assert status == 400 and body["error"]["param"] == "messages"
    assert "context" in body["error"]["message"]
    status, body = request(server.url + "/v1/completions", {"prompt": [10**9]})
    assert status == 400 and body["error"]["param"] == "prompt"


def test_unknown_route_and_method(server):
    status, body = request(server.url + "/v1/embeddings", {"input": "x"})
    assert status == 404 and "error" in body
    status, body = request(server.url + "/v1/chat/completions", method="GET")
    assert status == 405 and "error" in body


def test_random_bodies_never_500(server):
    """Every field of a valid body replaced by odd values: a 200 or a 400, nothing else."""
    rng = random.Random(0)
    odd = [None, -1, 0, 1, 2.5, -0.5, 10**30, "x", "", [], {}, True, [1, "a"], {"a": 1},
           float("1e308"), [{"role": "user"}]]
    base = {"model": "tide-demo", "messages": QUESTION, "max_tokens": 8, "temperature": 0,
            "top_p": 1, "top_k": 0, "seed": 1, "stop": ["\n"], "block_length": 16, "steps": 8,
            "threshold": 0.9, "minimal_topk": 1, "eos_early_stop": True, "stream": False}
    for _ in range(150):
        body = dict(base)
        for k in rng.sample(sorted(base), rng.randint(1, 3)):
            body[k] = rng.choice(odd)
        status, out = chat(server, body)
        assert status in (200, 400), (body, out)
        if status == 400:
            assert out["error"]["type"] == "invalid_request_error"
    assert health(server)["failed"] == 0


# ---- many clients -----------------------------------------------------------------------------

def test_concurrent_clients_get_serial_answers(server):
    bodies = [{"messages": QUESTION}, {"messages": QUESTION, "max_tokens": 4},
              {"messages": [{"role": "user", "content": "How many minutes are in 3 hours?"}]},
              {"messages": QUESTION, "threshold": 0.5}]
    serial = [chat(server, b)[1]["choices"][0]["message"]["content"] for b in bodies]
    results = {}

    def client(i):
        for j in range(6):
            b = bodies[(i + j) % len(bodies)]
            if (i + j) % 2:
                raw = stream_raw(server, "/v1/chat/completions", b)
                chunks = [json.loads(d) for n, d in sse_events(raw)[:-1] if n is None]
                text = "".join(c["choices"][0]["delta"].get("content") or ""
                               for c in chunks if c["choices"])
            else:
                status, out = chat(server, b)
                assert status == 200
                text = out["choices"][0]["message"]["content"]
            results[(i, j)] = (text, serial[(i + j) % len(bodies)])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 36
    assert all(got == want for got, want in results.values())


def test_client_hangup_cancels_generation(server):
    before = health(server)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions",
                 json.dumps({**SLOW, "stream": True, "denoise_events": True}),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    while b"event: tide.step" not in r.readline():
        pass
    conn.close()   # hang up after the first step
    q = wait_for(server, lambda q: q["cancelled"] > before["cancelled"] and not q["running"])
    assert q["completed"] == before["completed"]   # it did not run to its end
    status, body = chat(server)   # the worker is free again
    assert status == 200 and body["choices"][0]["message"]["content"] == ANSWER


def test_client_hangup_cancels_whole_answer(server):
    """Not streamed: the server notices the closed connection while the answer is computed."""
    before = health(server)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(SLOW), {"Content-Type": "application/json"})
    wait_for(server, lambda q: q["running"] == 1)
    conn.close()
    q = wait_for(server, lambda q: q["cancelled"] > before["cancelled"] and not q["running"])
    assert q["completed"] == before["completed"]


def test_full_queue_is_503():
    s = Server("--max-queue", "1")
    try:
        results = []
        slow = threading.Thread(target=lambda: results.append(
            request(s.url + "/v1/completions", SLOW)))
        slow.start()
        wait_for(s, lambda q: q["running"] == 1)
        queued = threading.Thread(target=lambda: results.append(
            request(s.url + "/v1/completions", SLOW)))
        queued.start()
        wait_for(s, lambda q: q["queued"] == 1)
        status, body = request(s.url + "/v1/completions", SLOW)
        assert status == 503
        assert body["error"]["type"] == "server_error"
        assert "queue is full" in body["error"]["message"]
        slow.join()
        queued.join()
        assert [st for st, _ in results] == [200, 200]
        assert health(s)["refused"] == 1
    finally:
        assert s.stop() == 0


def _header_names(resp):
    return {k.lower() for k, _ in resp.getheaders()}


def _chunked_post(port, path, chunks):
    """(status, body) of a POST whose body comes in chunks without a Content-Length; the server
    may answer and close before the last chunk is sent."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", path)
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    try:
        for c in chunks:
            conn.send(b"%x\r\n%s\r\n" % (len(c), c))
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    r = conn.getresponse()
    out = r.status, json.loads(r.read())
    conn.close()
    return out


def test_request_size_limit_and_cors():
    origin = "http://localhost:3000"
    s = Server("--max-request-bytes", "4KiB", "--cors-origin", origin)
    try:
        big = {"model": "tide-demo", "messages": [{"role": "user", "content": "x" * 5000}]}
        status, body = request(s.url + "/v1/chat/completions", big)      # Content-Length
        assert status == 413, body
        assert "4096 bytes" in body["error"]["message"]
        assert "--max-request-bytes" in body["error"]["message"]
        status, body = _chunked_post(s.port, "/v1/completions", [b"{" + b" " * 1023] * 8)
        assert status == 413 and body["error"]["code"] == "request_too_large"
        piece = json.dumps({"prompt": "What is 37 plus 48?", "max_tokens": 4}).encode()
        status, body = _chunked_post(s.port, "/v1/completions", [piece[:10], piece[10:]])
        assert status == 200, body                                       # under the limit
        status, body = chat(s)
        assert status == 200 and body["choices"][0]["message"]["content"] == ANSWER

        # a browser page on the named origin: preflight, then the request itself
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("OPTIONS", "/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
        r = conn.getresponse()
        r.read()
        assert r.status == 200
        assert r.getheader("access-control-allow-origin") == origin
        assert "x-stainless-os" in r.getheader("access-control-allow-headers").lower()
        conn.request("GET", "/v1/models", headers={"Origin": origin})
        r = conn.getresponse()
        r.read()
        assert r.status == 200 and r.getheader("access-control-allow-origin") == origin
        conn.request("GET", "/v1/models", headers={"Origin": "http://elsewhere.test"})
        r = conn.getresponse()
        r.read()
        assert "access-control-allow-origin" not in _header_names(r)   # not a named origin
        conn.close()
    finally:
        assert s.stop() == 0


def test_no_cors_unless_asked(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/v1/models", headers={"Origin": "http://localhost:3000"})
    r = conn.getresponse()
    r.read()
    conn.close()
    assert r.status == 200 and "access-control-allow-origin" not in _header_names(r)


def test_api_key():
    s = Server("--api-key", "sesame")
    try:
        status, body = request(s.url + "/v1/models")
        assert status == 401 and body["error"]["type"] == "authentication_error"
        status, body = request(s.url + "/v1/chat/completions", {"messages": QUESTION},
                               headers={"Authorization": "Bearer wrong"})
        assert status == 401
        status, body = request(s.url + "/v1/models", headers={"Authorization": "Bearer sesame"})
        assert status == 200
        assert request(s.url + "/health")[0] == 200   # liveness needs no key
        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="sesame")
        out = client.chat.completions.create(model="tide-demo", messages=QUESTION)
        assert out.choices[0].message.content == ANSWER
    finally:
        assert s.stop() == 0


# ---- shutdown ---------------------------------------------------------------------------------

def _stream_in_thread(s, out):
    def run():
        try:
            conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
            conn.request("POST", "/v1/completions", json.dumps({**SLOW, "stream": True}),
                         {"Content-Type": "application/json"})
            r = conn.getresponse()
            out.append(r.read().decode())
        except (OSError, http.client.HTTPException) as e:
            out.append(e)
    t = threading.Thread(target=run)
    t.start()
    return t


def _sigterm_while_streaming(shutdown_timeout):
    """SIGTERM to a server streaming a slow request: it exits 0 without a traceback and the stream
    still ends with [DONE], whatever the shutdown timeout. Returns the stream's events for the
    checks that depend on the timeout."""
    s = Server("--shutdown-timeout", shutdown_timeout)
    out = []
    t = _stream_in_thread(s, out)
    wait_for(s, lambda q: q["running"] == 1)
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(60) == 0
    t.join()
    assert "Traceback" not in s.output()
    events = sse_events(out[0])
    assert events[-1] == (None, "[DONE]")
    return events


def test_sigterm_finishes_the_running_request():
    events = _sigterm_while_streaming("60")
    finish = [json.loads(d)["choices"][0]["finish_reason"] for n, d in events[:-1] if n is None]
    assert finish[-1] in ("stop", "length")


def test_sigterm_cancels_after_the_timeout():
    events = _sigterm_while_streaming("0.2")
    # the running request was cancelled at a step: its stream ends with OpenAI's error event
    last = json.loads(events[-2][1])
    assert last["error"]["code"] == "cancelled"


def test_server_does_not_import_torch():
    import subprocess
    import sys
    code = ("import sys, tide_cpp.server.app, tide_cpp.commands.serve, tide_cpp.model; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_step_events_carry_edits():
    """The canvas diff reports a committed token replaced by another (LLaDA2.1's editing) and a
    token turned back into a mask, whatever schedule produced them."""
    import numpy as np

    from tide_cpp.generation import StepInfo
    from tide_cpp.server.completions import _Canvas

    class Tok:
        def decode(self, ids, skip_special=True):
            return "".join(f"<{i}>" for i in ids)

    class Job:
        def __init__(self):
            self.events = []

        def emit(self, kind, payload=None):
            self.events.append((kind, payload))

        def check(self):
            pass

    M, E, P = 99, 98, 2   # mask id, eos id, prompt length
    job = Job()
    canvas = _Canvas(Tok(), job)

    def step(i, ids, committed):
        ids = np.asarray(ids, dtype=np.int32)
        canvas.on_step(StepInfo(0, i, 0, 6, P, ids, np.asarray(committed), np.ones(len(committed)),
                                int((ids[P:] == M).sum()), M, E, 4), True)
        return job.events[-1][1]

    ev = step(0, [5, 6, 10, M, M, M], [2])
    assert ev["unmasked"] == [[0, "<10>"]] and ev["edited"] == [] and ev["masked"] == 3
    assert (ev["start"], ev["end"]) == (0, 4)
    ev = step(1, [5, 6, 11, 12, M, M], [3])      # position 2 edited 10 -> 11, 3 unmasked
    assert ev["unmasked"] == [[1, "<12>"]] and ev["edited"] == [[0, "<11>"]]
    ev = step(2, [5, 6, 11, M, E, M], [4])       # 3 back to a mask, 4 is the end of text
    assert ev["edited"] == [[1, None]] and ev["unmasked"] == [[2, "<98>"]] and ev["eos"] == [2]


@pytest.mark.parametrize("args,message", [
    (["--threshold", "5"], "threshold"), (["--steps", "64"], "steps"),
    (["--port", "70000"], "--port"), (["--max-queue", "-1"], "--max-queue"),
    (["--max-request-bytes", "0"], "--max-request-bytes"),
    (["--max-request-bytes", "lots"], "--max-request-bytes"),
    (["--cors-origin", "localhost:3000"], "--cors-origin"),
])
def test_bad_options_fail_at_start(args, message):
    import subprocess
    import sys
    from serve_process import DEMO, ROOT
    r = subprocess.run([sys.executable, "-m", "tide_cpp.cli", "serve", "-m", DEMO, *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and message in r.stderr
    r = subprocess.run([sys.executable, "-m", "tide_cpp.cli", "serve", "-m", "missing.gguf"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "missing.gguf" in r.stderr

"""The chat API (tide_cpp/chat.py) and the command line (`tide-cli generate`, `tide-cli chat`).

The model is the tiny checkpoint converted to GGUF and run by the native engine on the CPU. The
chat command is driven through a pseudo-terminal (stdlib pty), as a
person would: a turn, a second turn that uses the history, /reset, Ctrl-C during a reply, /exit.
"""

import os
import re
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import reference_generate as rg
from tide_cpp import chat, generation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = 8
FAST = dict(max_tokens=20, block_length=B, steps=B)
EOS_BIAS = (287, 1.05)  # as test_generate: EOS mid-answer


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {"plain": rg.write_tiny_gguf(root, "plain")[2],
            "eos": rg.write_tiny_gguf(root, "eos", eos_bias=EOS_BIAS)[2]}


@pytest.fixture(scope="module")
def models(gguf):
    """{'plain': model, 'eos': model} on the CPU backend (eos: an EOS bias mid-answer)."""
    from tide_cpp.model import Model
    out = {k: Model(p, device="cpu", n_threads=1) for k, p in gguf.items()}
    yield out
    for m in out.values():
        m.close()


MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]


def expected(model, messages, **kw):
    from tide_cpp.tokenizer import tokenizer_of
    ids = tokenizer_of(model).apply_chat_template(messages, tokenize=True)
    return generation.generate(model, ids, **kw)


# ---- create_chat_completion -----------------------------------------------------------------

def test_completion_shape(models):
    m = models["plain"]
    out = chat.create_chat_completion(m, MSGS, **FAST)
    want = expected(m, MSGS, **FAST)
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion"
    assert isinstance(out["created"], int) and isinstance(out["model"], str)
    (c,) = out["choices"]
    assert c["index"] == 0 and c["logprobs"] is None
    assert c["message"] == {"role": "assistant", "content": want.text}
    assert c["finish_reason"] == "length"
    u = out["usage"]
    assert u["completion_tokens"] == len(want.tokens) == 20
    assert u["prompt_tokens"] == want.prompt_tokens
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_model_method_delegates(models):
    m = models["plain"]
    out = m.create_chat_completion(MSGS, **FAST)
    assert out["choices"][0]["message"]["content"] == expected(m, MSGS, **FAST).text


def test_stream_chunks_concatenate(models):
    m = models["plain"]
    whole = chat.create_chat_completion(m, MSGS, max_tokens=30, block_length=B, steps=4)
    chunks = list(chat.create_chat_completion(m, MSGS, max_tokens=30, block_length=B, steps=4,
                                              stream=True))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    body = chunks[1:-1]
    assert len(body) >= 2  # block by block
    assert all(c["choices"][0]["finish_reason"] is None for c in body)
    text = "".join(c["choices"][0]["delta"]["content"] for c in body)
    assert text == whole["choices"][0]["message"]["content"]


def test_eos_finishes_with_stop(models):
    m = models["eos"]
    msgs = [{"role": "user", "content": "What is 37 plus 48?"}]
    out = chat.create_chat_completion(m, msgs, max_tokens=64, block_length=B, steps=B)
    want = expected(m, msgs, max_tokens=64, block_length=B, steps=B)
    assert want.finish_reason == "stop" and len(want.tokens) < 64
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["message"]["content"] == want.text
    assert out["usage"]["completion_tokens"] == len(want.tokens)
    chunks = list(chat.create_chat_completion(m, msgs, max_tokens=64, block_length=B, steps=B,
                                              stream=True))
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_stop_strings(models):
    m = models["plain"]
    full = expected(m, MSGS, **FAST).text
    stop = full[7:9]
    cut = full[:full.find(stop)]
    out = chat.create_chat_completion(m, MSGS, stop=[stop, "never-there"], **FAST)
    assert out["choices"][0]["message"]["content"] == cut
    assert out["choices"][0]["finish_reason"] == "stop"
    chunks = list(chat.create_chat_completion(m, MSGS, stop=stop, stream=True, **FAST))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == cut
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_in_chat(models):
    m = models["plain"]
    kw = dict(max_tokens=16, block_length=B, steps=4, temperature=0.9, top_k=40)
    a = chat.create_chat_completion(m, MSGS, seed=3, **kw)["choices"][0]["message"]["content"]
    b = chat.create_chat_completion(m, MSGS, seed=3, **kw)["choices"][0]["message"]["content"]
    c = chat.create_chat_completion(m, MSGS, seed=4, **kw)["choices"][0]["message"]["content"]
    assert a == b and a != c


@pytest.mark.parametrize("messages,kw,name", [
    ([], {}, "messages"),
    (None, {}, "messages"),
    (MSGS, {"max_tokens": 0}, "max_tokens"),
    (MSGS, {"threshold": 2.0}, "threshold"),
    (MSGS, {"steps": 64}, "steps"),
    (MSGS, {"stop": 3}, "stop"),
])
def test_chat_invalid_arguments(models, messages, kw, name):
    with pytest.raises(ValueError, match=name):
        chat.create_chat_completion(models["plain"], messages, **kw)
    with pytest.raises(ValueError, match=name):
        chat.create_chat_completion(models["plain"], messages, stream=True, **kw)


# ---- tide-cli generate -----------------------------------------------------------------------

def cli(*args, input=None, timeout=60):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "tide_cpp.cli", *args], capture_output=True,
                          text=True, encoding="utf-8", errors="replace", input=input,
                          timeout=timeout, env=env, cwd=ROOT)


def test_cli_generate(gguf, models, tmp_path):
    m = models["plain"]
    want = generation.generate(m, m.tokenize("Hello, world!"), **FAST)
    trace = tmp_path / "trace.npz"
    r = cli("generate", "-m", gguf["plain"], "--device", "cpu", "--threads", "1", "-p",
            "Hello, world!", "--max-tokens", "20", "--block-length", str(B), "--steps", str(B),
            "--trace", str(trace))
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.text + "\n"
    assert "tokens: 20 in" in r.stderr and "tokens per forward" in r.stderr
    assert "promoted" in r.stderr and "H2D" in r.stderr and "device" in r.stderr
    t = np.load(trace)
    assert {"hits", "kind", "block", "step", "n_tokens"} <= set(t.files)
    assert (t["kind"] == 0).sum() == want.stats["steps"]
    assert int(t["block_length"]) == B


def test_cli_generate_chat_and_stdin(gguf, models):
    m = models["plain"]
    want = expected(m, [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}],
                    **FAST)
    r = cli("generate", "-m", gguf["plain"], "--device", "cpu", "--threads", "1", "--chat",
            "-s", "S", "--max-tokens", "20", "--block-length", str(B), "--steps", str(B),
            "--no-stats", input="Q?")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.text + "\n" and r.stderr == ""


@pytest.mark.parametrize("args,name", [
    (["--threshold", "1.5"], "threshold"),
    (["--steps", "64"], "steps"),
    (["--top-p", "0"], "top_p"),
])
def test_cli_generate_bad_options(gguf, args, name):
    r = cli("generate", "-m", gguf["plain"], "--device", "cpu", "-p", "x", *args)
    assert r.returncode == 1 and name in r.stderr and "Traceback" not in r.stderr


def test_cli_missing_model(tmp_path):
    r = cli("generate", "-m", str(tmp_path / "nope.gguf"), "--device", "cpu", "-p", "x")
    assert r.returncode == 1 and "error" in r.stderr and "Traceback" not in r.stderr


def test_cli_help():
    for cmd in ("generate", "chat"):
        r = cli(cmd, "--help")
        assert r.returncode == 0
        for opt in ("--max-tokens", "--block-length", "--steps", "--threshold", "--temperature",
                    "--top-k", "--top-p", "--seed", "--minimal-topk", "--no-eos-early-stop",
                    "--device", "--threads", "--policy", "--gpu-experts", "--refresh-interval"):
            assert opt in r.stdout, (cmd, opt)


# ---- the pseudo-terminal ---------------------------------------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|[\x07]")


class Terminal:
    """A child process on a pseudo-terminal, read and written as a person would."""

    def __init__(self, argv, env=None):
        import pty
        pid, fd = pty.fork()
        if pid == 0:  # the child: the pty is its controlling terminal
            try:
                os.chdir(ROOT)
                os.execve(argv[0], argv, env or os.environ)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.buf = ""
        self.log = ""

    def _read(self, timeout):
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child is gone
            data = b""
        if not data:
            raise EOFError(self.log)
        text = data.decode("utf-8", "replace").replace("\r\n", "\n")
        self.buf += text
        self.log += text
        return True

    def expect(self, pattern, timeout=60):
        """Everything up to the first match of pattern (consumed); the text before it."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            clean = ANSI.sub("", self.buf)
            mt = rx.search(clean)
            if mt:
                self.buf = clean[mt.end():]
                return clean[:mt.start()]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; got:\n{self.log[-2000:]}")
            self._read(min(left, 0.5))

    def peek(self, pattern, timeout=60):
        """Wait until the unread text matches pattern, consuming nothing."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while not rx.search(ANSI.sub("", self.buf)):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; got:\n{self.log[-2000:]}")
            self._read(min(left, 0.5))

    def send(self, text):
        os.write(self.fd, text.encode())

    def wait(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            try:
                self._read(0.1)
            except EOFError:
                pass
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError("the chat did not exit")


PROMPT = r">>> "


def reply_of(out, sent):
    """The reply printed after the echo of the line we sent."""
    i = out.find(sent)
    assert i >= 0, (sent, out)
    return out[i + len(sent):].lstrip("\n").rstrip("\n")


def test_chat_on_a_terminal(gguf, models):
    m = models["plain"]
    kw = dict(max_tokens=16, block_length=B, steps=B)
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONIOENCODING": "utf-8", "TERM": "dumb"}
    term = Terminal([sys.executable, "-m", "tide_cpp.cli", "chat", "-m", gguf["plain"],
                     "--device", "cpu", "--threads", "1", "-s", "Be brief.",
                     "--max-tokens", "16", "--block-length", str(B), "--steps", str(B)], env)
    try:
        term.expect(PROMPT)
        history = [{"role": "system", "content": "Be brief."}]

        def turn(text):
            term.send(text + "\n")
            got = reply_of(term.expect(PROMPT), text)
            history.append({"role": "user", "content": text})
            want = expected(m, history, **kw).text
            history.append({"role": "assistant", "content": want})
            return got, want

        # a turn, then a second that must see the first
        got1, want1 = turn("Hello!")
        assert got1 == want1
        got2, want2 = turn("And then?")
        assert got2 == want2
        alone = expected(m, [history[0], {"role": "user", "content": "And then?"}], **kw).text
        assert want2 != alone  # the history changed the answer

        # /reset: the same question as the first gets the first answer
        term.send("/reset\n")
        term.expect("conversation cleared")
        term.expect(PROMPT)
        del history[1:]
        got3, _ = turn("Hello!")
        assert got3 == want1

        # Ctrl-C during a long reply: the reply stops, the prompt comes back
        term.send("/set max-tokens 1500\n")
        term.expect(PROMPT)
        term.send("Tell me a long story.\n")
        term.expect("Tell me a long story.\n")
        term.peek(r"\S", timeout=60)   # the first block is out
        t0 = time.monotonic()
        term.send("\x03")
        shown = term.expect(r"\[reply stopped\]", timeout=30)
        assert time.monotonic() - t0 < 20  # well before 1500 tokens
        term.expect(PROMPT)
        partial = shown.replace("^C", "")
        assert partial.endswith("\n")
        partial = partial[:-1]
        assert partial.strip()

        # the conversation goes on, the interrupted turn in the history as far as it was shown
        term.send("/set max-tokens 16\n")
        term.expect(PROMPT)
        history += [{"role": "user", "content": "Tell me a long story."},
                    {"role": "assistant", "content": partial}]
        got4, want4 = turn("Short one.")
        assert got4 == want4

        term.send("/exit\n")
        assert term.wait() == 0
        if os.environ.get("TIDE_SHOW_TRANSCRIPT"):
            print(term.log)
    finally:
        try:
            os.kill(term.pid, signal.SIGKILL)
            os.waitpid(term.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_chat_ctrl_d_leaves(gguf):
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONIOENCODING": "utf-8", "TERM": "dumb"}
    term = Terminal([sys.executable, "-m", "tide_cpp.cli", "chat", "-m", gguf["plain"],
                     "--device", "cpu", "--threads", "1"], env)
    term.expect(PROMPT)
    term.send("\x04")
    assert term.wait() == 0


def test_chat_piped(gguf, models):
    m = models["plain"]
    r = cli("chat", "-m", gguf["plain"], "--device", "cpu", "--threads", "1", "--max-tokens",
            "16", "--block-length", str(B), "--steps", str(B),
            input="Hello!\n/bogus\n/reset\n/exit\n")
    assert r.returncode == 0, r.stderr
    want = expected(m, [{"role": "user", "content": "Hello!"}], max_tokens=16, block_length=B,
                    steps=B).text
    assert want in r.stdout
    assert "unknown command /bogus" in r.stderr and "conversation cleared" in r.stderr


def test_cli_generate_visual(gguf, models):
    m = models["plain"]
    want = generation.generate(m, m.tokenize("Hello"), max_tokens=24, block_length=B, steps=4)
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONIOENCODING": "utf-8", "TERM": "xterm"}
    term = Terminal([sys.executable, "-m", "tide_cpp.cli", "generate", "-m", gguf["plain"],
                     "--device", "cpu", "--threads", "1", "-p", "Hello", "--visual",
                     "--max-tokens", "24", "--block-length", str(B), "--steps", "4"], env)
    assert term.wait() == 0
    raw = term.log
    assert "\u2591" in raw                      # masked positions drawn
    assert "\x1b[J" in raw                      # redrawn in place
    assert raw.count("\x1b[J") == want.stats["steps"]  # drawn at every step and at the end
    last = raw.rsplit("\x1b[J", 1)[1]
    assert last.startswith(want.text + "\n") and "tokens: 24 in" in last

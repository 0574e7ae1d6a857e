"""The shipped demo model (models/tide-demo.gguf) answers fixed questions through the engine, alone
and as the turns of one chat, and every residency policy and budget gives the same answer
(models/demo/README.md)."""

import os
import re
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEMO = os.path.join(ROOT, "models", "tide-demo.gguf")
sys.path.insert(0, os.path.join(ROOT, "models", "demo"))
import data  # noqa: E402  (the demo's chat rendering: the messages its training chats were)

# question -> the result the answer must give. The demo's generation settings: block 32,
# 32 steps, threshold 0.95, greedy (the engine's defaults; make run passes the same).
QUESTIONS = {
    "What is 37 plus 48?": 85,
    "What is 91 minus 27?": 64,
    "How many minutes are in 3 hours?": 180,
    "Add 15 and 26.": 41,
    "What is half of 64?": 32,
    "How many days are there in 9 weeks?": 63,
    "Double 23.": 46,
    "Convert 7 kilograms to grams.": 7000,
}
GEN = dict(max_tokens=32, block_length=32, steps=32, threshold=0.95, temperature=0.0)


def demo_model(**kw):
    from tide_cpp import Model
    return Model(DEMO, **kw)


def _ask(m, question, history=()):
    """The answer to question after the earlier (question, answer) turns of the chat."""
    r = m.create_chat_completion(messages=data.chat_messages(question, history), **GEN)
    return r["choices"][0]["message"]["content"]


def _numbers(text):
    return sorted(int(n) for n in re.findall(r"-?\d+", text))


def test_demo_answers_fixed_questions():
    with demo_model(device="cpu", policy="cpu") as m:
        for q, want in QUESTIONS.items():
            got = _ask(m, q)
            # the answer restates the question's numbers and gives the result, nothing else
            assert _numbers(got) == sorted(_numbers(q) + [want]), (q, got)
            assert got.endswith("."), (q, got)   # one sentence, stopped at EOS


@pytest.mark.parametrize("order", [1, -1])
def test_demo_holds_a_conversation(order):
    """Five questions as one chat (4 earlier turns: the range the demo was trained on), after
    the model's own answers: each is answered right, with the sentence it gets alone. (The
    model trained on single questions answered every second question with ".".)"""
    chat = list(QUESTIONS)[::order][:5]
    with demo_model(device="cpu", policy="cpu") as m:
        history = []
        for q in chat:
            got = _ask(m, q, history)
            assert _numbers(got) == sorted(_numbers(q) + [QUESTIONS[q]]), (len(history) + 1, q, got)
            assert got == _ask(m, q), (q, got)     # the same sentence as asked alone
            history.append((q, got))


def test_demo_answers_a_question_after_another():
    """The example of the chat bug: after the unit question, the subtraction used to get "."
    (single-question model), then "12 minus 7 is 85." (the first chat-trained one)."""
    with demo_model(device="cpu", policy="cpu") as m:
        first = _ask(m, "How many minutes are in 3 hours?")
        assert _ask(m, "What is 12 minus 7?", [("How many minutes are in 3 hours?", first)]) \
            == "12 minus 7 is 5."


def test_demo_known_sentence():
    with demo_model(device="cpu", policy="cpu") as m:
        assert _ask(m, "What is 37 plus 48?") == "37 plus 48 is 85."
        assert _ask(m, "How many minutes are in 3 hours?") == "There are 180 minutes in 3 hours."


@pytest.mark.parametrize("policy,budget", [("gpu", None), ("static", 4), ("swap", 4),
                                           ("tide", 2), ("tide", 8)])
def test_demo_same_answers_under_every_policy(policy, budget):
    with demo_model(device="sim", policy="cpu") as m:
        want = [_ask(m, q) for q in QUESTIONS]
    kw = dict(device="sim", policy=policy, refresh_interval=4)
    if budget is not None:
        kw["gpu_experts"] = budget
    with demo_model(**kw) as m:
        got = [_ask(m, q) for q in QUESTIONS]
        st = m.stats()
    assert got == want
    if policy in ("static", "tide"):
        assert st["host_expert_tokens"] > 0     # a small budget really leaves experts on the host


def test_demo_bench_chat_prompts(capsys):
    """tide-cli bench --chat: the prompts go through the chat template, so the demo answers
    (a raw prompt is outside what it was trained on) and tokens/s measures real tokens."""
    demo_model(device="cpu").close()
    from tide_cpp.cli import main
    rc = main(["bench", "-m", DEMO, "--device", "sim", "-t", "1", "--chat", "--policies",
               "cpu,tide", "--gpu-experts", "4", "--threshold", "0.999", "--warmup", "0",
               "-p", "What is 37 plus 48?", "-p", "How many minutes are in 3 hours?"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    rows = [l.split("|") for l in out.out.splitlines() if l.startswith("|") and "---" not in l]
    head, rows = [c.strip() for c in rows[0]], rows[1:]
    assert len(rows) == 2 and all(r[head.index("same tokens")].strip() == "yes" for r in rows)
    assert all(float(r[head.index("tokens/s")]) > 0 for r in rows)


def test_history_probe_counts_and_asks_alone_first():
    """evaluate.py --history-probe: every sum and difference asked under each kind of earlier
    turn, and asked alone it scores as the model does on single questions (not a history)."""
    import evaluate
    qs = data.held_out_set(40)
    arith = [q for q in qs if q[2] in ("add", "sub")]
    with demo_model(device="cpu", policy="cpu") as m:
        out = evaluate.history_probe(m, qs)
        alone = sum(evaluate.correct(_ask(m, q), a) for q, a, _ in arith)
    assert list(out) == ["none", "unit", "arith", "same"]
    assert all(asked == len(arith) and 0 <= right <= asked for right, asked in out.values())
    assert out["none"][0] == alone

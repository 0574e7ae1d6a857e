"""Score the demo model on held-out questions.

    python models/demo/evaluate.py models/tide-demo.gguf              # through the engine
    python models/demo/evaluate.py models/tide-demo.gguf --policies   # every policy and budget
    python models/demo/evaluate.py --reference models/demo/work/hf    # PyTorch reference decode

Through the engine it then asks the same questions as turns of chats (--chat-turns, default 5):
each question once at every position, after other held-out questions and the model's own
answers to them, and reports the accuracy per position. --history-probe asks the sums and
differences after one earlier turn of each kind (what a later turn's loss comes from).

A question counts as right when the answer holds exactly the numbers of the expected answer
(the operands or quantity it restates, and the result), in any order and any phrasing. The engine path runs tide_cpp.Model.create_chat_completion,
the same call `tide-cli chat` makes; the reference path is a small block-diffusion greedy decode
over tests/reference.py (no cache: every step re-runs the whole canvas, which the block-causal
mask makes equivalent), used while training, before the engine existed.
"""

import argparse
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

from data import chat_text, held_out_set  # noqa: E402

# The demo's generation settings (make run passes the same).
BLOCK_LENGTH = 32
STEPS = 32
THRESHOLD = 0.95
MAX_TOKENS = 32


def numbers(text):
    return sorted(int(n) for n in re.findall(r"-?\d+", text))


def correct(answer, expected):
    return numbers(answer) == numbers(expected)


# ---- reference decode (PyTorch, used during training) -------------------------------------------


def _transfer_schedule(n_masked, steps):
    """Tokens to commit at each step: n_masked spread evenly over steps, remainder first."""
    base, rem = divmod(n_masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def reference_generate(cfg, w, prompts, block_length, steps=None, threshold=THRESHOLD,
                       gen_length=MAX_TOKENS, eos_id=None, mask_id=None):
    """Greedy block-diffusion decode of a batch of prompts (lists of ids) -> lists of answer ids.

    Each prompt has its own canvas (prompt + gen_length masks, padded to a multiple of the block)
    and its own active block; canvases are right-padded to one length for the batched forward,
    which the block-causal mask makes invisible to every active block."""
    import torch
    import reference

    steps = steps or block_length
    B = block_length
    canv = []
    for p in prompts:
        n = -(-(len(p) + gen_length) // B) * B
        canv.append(list(p) + [mask_id] * (n - len(p)))
    total = max(len(c) for c in canv)
    x = torch.full((len(canv), total), eos_id, dtype=torch.long)
    for i, c in enumerate(canv):
        x[i, :len(c)] = torch.tensor(c)
    blk = [len(p) // B for p in prompts]
    step = [0] * len(prompts)
    sched = [None] * len(prompts)
    done = [False] * len(prompts)
    with torch.no_grad():
        while not all(done):
            logits = reference.forward(cfg, w, x, B)
            probs = torch.softmax(logits.float(), -1)
            conf, tok = probs.max(-1)
            for i in range(len(prompts)):
                if done[i]:
                    continue
                lo, hi = blk[i] * B, (blk[i] + 1) * B
                masked = (x[i, lo:hi] == mask_id).nonzero().flatten() + lo
                if sched[i] is None:
                    sched[i] = _transfer_schedule(len(masked), steps)
                want = sched[i][min(step[i], steps - 1)] if step[i] < steps else len(masked)
                c = conf[i, masked]
                pick = masked[c > threshold]
                if len(pick) < want:
                    pick = masked[torch.topk(c, min(want, len(masked)))[1]]
                x[i, pick] = tok[i, pick]
                step[i] += 1
                if not (x[i, lo:hi] == mask_id).any():
                    # block finished: stop at an EOS with no mask before it, or at the canvas end
                    row = x[i, len(prompts[i]):len(canv[i])].tolist()
                    if eos_id in row or hi >= len(canv[i]):
                        done[i] = True
                    blk[i] += 1
                    step[i] = 0
                    sched[i] = None
    out = []
    for i, p in enumerate(prompts):
        row = x[i, len(p):len(canv[i])].tolist()
        out.append(row[:row.index(eos_id)] if eos_id in row else row)
    return out


def evaluate_reference(cfg, w, tokenizer, n=200, block_length=BLOCK_LENGTH, steps=None,
                       batch=50, verbose=False):
    """(accuracy, [(question, expected, got)]) of the reference decode on n held-out questions."""
    from hf_checkpoint import special_token_ids

    ids = special_token_ids(cfg["vocab_size"])
    qs = held_out_set(n)
    rows = []
    for s in range(0, len(qs), batch):
        chunk = qs[s:s + batch]
        prompts = [tokenizer.encode(chat_text(q)).ids for q, _, _ in chunk]
        outs = reference_generate(cfg, w, prompts, block_length, steps,
                                  eos_id=ids["<|endoftext|>"], mask_id=ids["<|mask|>"])
        for (q, a, task), o in zip(chunk, outs):
            rows.append((q, a, tokenizer.decode(o), task))
    acc = sum(correct(g, a) for _, a, g, _ in rows) / len(rows)
    if verbose:
        for q, a, g, _ in rows:
            if not correct(g, a):
                print(f"  MISS {q!r}: {g!r} (want {a!r})")
    return acc, rows


def by_task(rows):
    out = {}
    for q, a, g, task in rows:
        r = out.setdefault(task, [0, 0])
        r[0] += correct(g, a)
        r[1] += 1
    return {t: f"{r[0]}/{r[1]}" for t, r in sorted(out.items())}


# ---- through the engine -------------------------------------------------------------------------


def engine_answers(model, questions, block_length=BLOCK_LENGTH, steps=STEPS,
                   threshold=THRESHOLD, max_tokens=MAX_TOKENS):
    out = []
    for q in questions:
        r = model.create_chat_completion(
            messages=[{"role": "user", "content": q}], max_tokens=max_tokens,
            block_length=block_length, steps=steps, threshold=threshold, temperature=0.0)
        out.append(r["choices"][0]["message"]["content"])
    return out


def chat_rotations(qs, turns):
    """Conversations of `turns` held-out questions each: every group of `turns` consecutive
    questions is asked in each of its `turns` rotations, so every question is asked once at
    every position of a chat (position 1 is the single-turn question)."""
    groups = [qs[i:i + turns] for i in range(0, len(qs) - turns + 1, turns)]
    return [g[r:] + g[:r] for g in groups for r in range(turns)]


def engine_chat_rows(model, qs, turns, block_length=BLOCK_LENGTH, steps=STEPS,
                     threshold=THRESHOLD, max_tokens=MAX_TOKENS):
    """[(position, question, expected, got, task)]: held-out questions asked as turns of a chat
    whose earlier turns are other held-out questions with the model's own answers, as in
    `tide-cli chat` (each answer is appended to the messages as the assistant's turn)."""
    rows = []
    for chat in chat_rotations(qs, turns):
        messages = []
        for pos, (q, a, task) in enumerate(chat, 1):
            messages.append({"role": "user", "content": q})
            r = model.create_chat_completion(
                messages=messages, max_tokens=max_tokens, block_length=block_length,
                steps=steps, threshold=threshold, temperature=0.0)
            got = r["choices"][0]["message"]["content"]
            messages.append({"role": "assistant", "content": got})
            rows.append((pos, q, a, got, task))
    return rows


def report_chat(rows, turns, verbose=False):
    """Accuracy per turn position of engine_chat_rows' rows, printed; the per-position list."""
    accs = []
    for pos in range(1, turns + 1):
        at = [(q, a, g, t) for p, q, a, g, t in rows if p == pos]
        acc = sum(correct(g, a) for _, a, g, _ in at) / len(at)
        accs.append(acc)
        print(f"  turn {pos}: accuracy {acc:.1%} on {len(at)} questions  {by_task(at)}")
        if verbose:
            for q, a, g, _ in at:
                if not correct(g, a):
                    print(f"    MISS {q!r}: {g!r} (want {a!r})")
    return accs


def history_probe(model, qs, block_length=BLOCK_LENGTH, steps=STEPS):
    """{kind: (right, asked)}: the addition and subtraction questions of qs asked alone and after
    one earlier turn whose answer is the expected one: a unit question ("unit"), another sum or
    difference ("arith"), or the same question ("same", its answer already in the context). Tells
    whether what a later turn loses comes from the history's content or from having one."""
    arith = [q for q in qs if q[2] in ("add", "sub")]
    units = [q for q in qs if q[2] == "unit"]
    earlier = {"none": lambda i, q: None, "unit": lambda i, q: units[i % len(units)],
               "arith": lambda i, q: arith[(i + 7) % len(arith)], "same": lambda i, q: q}
    out = {}
    for kind, pick in earlier.items():
        right = 0
        for i, q in enumerate(arith):
            h = pick(i, q)
            messages = [] if h is None else [{"role": "user", "content": h[0]},
                                             {"role": "assistant", "content": h[1]}]
            messages.append({"role": "user", "content": q[0]})
            r = model.create_chat_completion(
                messages=messages, max_tokens=MAX_TOKENS, block_length=block_length,
                steps=steps, threshold=THRESHOLD, temperature=0.0)
            right += correct(r["choices"][0]["message"]["content"], q[1])
        out[kind] = (right, len(arith))
    return out


# (policy, gpu_experts, prefetch_experts) checked by --policies; budgets are slots per MoE layer.
POLICY_GRID = [("cpu", None, 0), ("gpu", None, 0), ("static", 4, 0), ("static", 16, 0),
               ("swap", 4, 0), ("swap", 8, 0), ("tide", 2, 0), ("tide", 4, 0), ("tide", 16, 0),
               ("tide", 4, 4)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=os.path.join(ROOT, "models", "tide-demo.gguf"))
    ap.add_argument("--reference", action="store_true",
                    help="MODEL is an HF checkpoint folder; decode with tests/reference.py")
    ap.add_argument("-n", type=int, default=200, help="held-out questions (default 200)")
    ap.add_argument("--block-length", type=int, default=BLOCK_LENGTH)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--device", default="sim")
    ap.add_argument("--policy", default="tide")
    ap.add_argument("--gpu-experts", type=int, default=4)
    ap.add_argument("--refresh-interval", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="host threads (default: all)")
    ap.add_argument("--policies", action="store_true",
                    help="run every policy/budget of POLICY_GRID and check the answers agree")
    ap.add_argument("--chat-turns", type=int, default=5,
                    help="then ask the held-out questions as turns 1..N of chats whose earlier "
                    "turns are other held-out questions with the model's own answers, and report "
                    "the accuracy per turn (first policy only; 0: skip)")
    ap.add_argument("--history-probe", action="store_true",
                    help="only ask the addition and subtraction questions alone and after one "
                    "earlier turn (a unit question, another sum, the same question)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every miss")
    args = ap.parse_args(argv)

    if args.reference:
        import torch
        from tokenizers import Tokenizer
        import reference

        torch.set_num_threads(2)
        cfg, w = reference.load_checkpoint(args.model)
        w = {k: v.float() for k, v in w.items()}
        tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
        t0 = time.time()
        acc, rows = evaluate_reference(cfg, w, tok, args.n, args.block_length, args.steps,
                                       verbose=args.verbose)
        print(f"reference  B={args.block_length} steps={args.steps}: accuracy {acc:.1%} "
              f"on {len(rows)} held-out questions  {by_task(rows)}  ({time.time() - t0:.0f} s)")
        return 0

    import tide_cpp

    qs = held_out_set(args.n)
    if args.history_probe:
        with tide_cpp.Model(args.model, device=args.device, n_threads=args.threads) as m:
            for kind, (right, asked) in history_probe(m, qs, args.block_length, args.steps).items():
                where = "alone" if kind == "none" else f"after one turn ({kind})"
                print(f"{where:22s} accuracy {right / asked:.1%} ({right}/{asked})")
        return 0
    questions = [q for q, _, _ in qs]
    grid = POLICY_GRID if args.policies else [(args.policy, args.gpu_experts, 0)]
    first = None
    ok = True
    for policy, budget, prefetch in grid:
        kw = dict(device=args.device, policy=policy, refresh_interval=args.refresh_interval,
                  n_threads=args.threads, prefetch_experts=prefetch)
        if budget is not None:
            kw["gpu_experts"] = budget
        t0 = time.time()
        with tide_cpp.Model(args.model, **kw) as m:
            answers = engine_answers(m, questions, args.block_length, args.steps)
            st = m.stats()
        rows = [(q, a, g, t) for (q, a, t), g in zip(qs, answers)]
        acc = sum(correct(g, a) for _, a, g, _ in rows) / len(rows)
        same = "" if first is None else ("identical to the first" if answers == first
                                         else "DIFFERENT from the first")
        if first is None:
            first = answers
        elif answers != first:
            ok = False
        moved = st.get("experts_promoted", "?")
        host = st.get("host_expert_tokens", "?")
        dev = st.get("device_expert_tokens", "?")
        pf = f" prefetch={prefetch} (used {st['prefetch_used']})" if prefetch else ""
        print(f"{args.device:4s} {policy:6s} budget={str(budget):4s} accuracy {acc:.1%} "
              f"{by_task(rows)}  promoted={moved}{pf} pairs device/host={dev}/{host}  "
              f"({time.time() - t0:.0f} s) {same}")
        if args.verbose:
            for q, a, g, _ in rows:
                if not correct(g, a):
                    print(f"  MISS {q!r}: {g!r} (want {a!r})")
        if args.chat_turns > 1 and (policy, budget, prefetch) == grid[0]:
            t0 = time.time()
            with tide_cpp.Model(args.model, **kw) as m:
                chat = engine_chat_rows(m, qs, args.chat_turns, args.block_length, args.steps)
            print(f"{args.device:4s} {policy:6s} budget={str(budget):4s} chats of "
                  f"{args.chat_turns} turns (each question at every turn, the model's own "
                  f"answers as history, {time.time() - t0:.0f} s):")
            report_chat(chat, args.chat_turns, args.verbose)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

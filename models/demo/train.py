"""Train the demo model: LLaDA2.0's architecture, LLaDA2.0's masked block-diffusion objective.

    python models/demo/train.py --fresh                   # the recipe: one run, < 1 h, 1 core
    python models/demo/train.py                           # resume from work/state.pt
    python models/demo/train.py --export-only             # write the HF checkpoint from state
    python -m tide_cpp.convert models/demo/work/hf -o models/tide-demo.gguf --outtype bf16
    models/demo/reproduce.sh                              # the shipped model, train + convert

The forward pass is tests/reference.py's (the engine's oracle) over packed rows (packed.py: each
sequence cut at the end of its noised block, several per row, attending only within themselves),
with its MoE layer computed as grouped matmuls (moe_batched.py: the same routing and products),
both checked against the reference, so the model is trained by exactly the architecture the
engine runs. Conversations of 1-5 questions (--history): the earlier turns are correct questions
and answers; the last answer is the one learned, or with --learn every each answer of the chat
(Batcher._noised_chat). Objective, per learned answer:
one block b that holds answer tokens is the noised block; the blocks before it are clean (as the
engine's cache of committed blocks), the blocks after it are invisible to it under the
block-causal mask. t ~ U(0, 1), each answer token of block b is replaced by <|mask|> with
probability p = (1 - eps) t + eps (prompt tokens never), loss = cross-entropy on the masked
positions weighted by 1/p, summed and divided by the number of answer tokens in the noised
blocks of the batch. Answers end with <|endoftext|> padded to the end of their block, as the
released generate() leaves them. The block length is drawn per batch from 16 and 32 so the
model runs at the engine's default (32) and with smaller blocks.

Router: aux-loss-free balancing (DeepSeek-V3 / LLaDA2): after every step each MoE layer's
expert_bias moves by bias_rate * sign(mean load - load), so every expert is used.
Seeded and deterministic: the data stream, the masks and the initialization come from the seed.
"""

import argparse
import json
import math
import os
import queue
import random
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

# Threads that finish a parallel region spin a little (libgomp's GOMP_SPINCOUNT, 10000 turns, tens
# of microseconds), then sleep. A step runs thousands of small torch ops, each a parallel region:
# sleeping at once (OMP_WAIT_POLICY=PASSIVE, the earlier setting) paid a wake-up per op and doubled
# the step on a quiet two-core machine (2 threads: 0.24 -> 0.12 s, 150 steps), while the default
# long spin burns the time slice a partner thread needs when the machine is busy. With one other
# busy process sleeping at once is the faster (0.23 s against 0.47 with the short spin): set
# GOMP_SPINCOUNT=0 there. Only the waiting changes, not the arithmetic; with one thread (the
# recipe's default) nothing waits, so this is for --threads 2.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import hf_checkpoint as hfc  # noqa: E402
import moe_batched  # noqa: E402
import packed  # noqa: E402
import reference  # noqa: E402
from data import chat_text, history_turns, sample_chat  # noqa: E402
from tokenizer import build_tokenizer  # noqa: E402

WORK = os.path.join(HERE, "work")

# The demo architecture: LLaDA2.0-mini's shape, shrunk (1 dense layer, then MoE layers with a
# grouped sigmoid router, expert bias and one shared expert; QK-norm, partial RoPE 0.5, GQA).
CONFIG = dict(
    vocab_size=512,
    hidden_size=128,
    head_dim=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=5,
    first_k_dense_replace=1,
    intermediate_size=384,
    moe_intermediate_size=64,
    num_experts=32,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    num_shared_experts=1,
    routed_scaling_factor=2.5,
    max_position_embeddings=1024,
    partial_rotary_factor=0.5,
)
BLOCK_LENGTHS = (16, 32)
ROW_LENGTH = 64      # packed rows (packed.py): two blocks of 32; a longer sequence gets its own


def init_weights(cfg, seed):
    """f32 trainable weights by HF name: ~1/sqrt(fan_in) matrices, residual outputs scaled down
    by sqrt(2 * layers), unit norms, zero expert bias."""
    g = torch.Generator().manual_seed(seed)
    L = cfg["num_hidden_layers"]
    w = {}
    for name, shape, _ in hfc.tensor_shapes(cfg):
        if len(shape) == 1:
            w[name] = torch.zeros(shape) if name.endswith("expert_bias") else torch.ones(shape)
            continue
        std = 1.0 / math.sqrt(shape[1])
        if name == "model.word_embeddings.weight":
            std = 1.0
        elif name.endswith("attention.dense.weight") or name.endswith("down_proj.weight"):
            std /= math.sqrt(2 * L)
        elif name == "lm_head.weight":
            std *= 0.5
        w[name] = torch.randn(shape, generator=g) * std
    return w


# ---- the MoE layer: reference.moe's math, batched (moe_batched.py), with routing loads recorded --

_LOADS = {}


def _moe_recording(cfg, w, prefix, x, hits=None):
    h = {} if hits is None else hits
    out = moe_batched.moe(cfg, w, prefix, x, hits=h)
    _LOADS[prefix] = h
    return out


# ---- batches --------------------------------------------------------------------------------------


class Batcher:
    """Deterministic stream of packed batches (packed.py): each chat's sequence ends with its
    noised blocks (_noised_chat), the sequences packed into rows of ROW_LENGTH tokens (or of the
    longest one)."""

    def __init__(self, tokenizer, cfg, batch_size, seed, chat_batch_size=None, learn="last"):
        self.tok = tokenizer
        self.learn = learn          # "last": a chat's last answer is learned; "every": each one
        self.rng = random.Random(seed)
        self.g = torch.Generator().manual_seed(seed + 1)
        self.bs = batch_size
        self.chat_bs = chat_batch_size or batch_size   # batches with one earlier turn
        ids = hfc.special_token_ids(cfg["vocab_size"])
        self.eos, self.mask = ids["<|endoftext|>"], ids["<|mask|>"]

    def batch_size(self, turns):
        """Sequences in a batch whose chats have `turns` earlier turns. A turn adds about half a
        single question's tokens, so chats of k turns get chat_bs * 3 / (k + 2) sequences: a
        step costs about the same whatever k is (0.28-0.31 s on two cores of the AMD machine of
        models/demo/README.md, k = 0..4). Learning every answer, a turn also adds a noised block:
        chat_bs * 3 / (2 k + 1) chats."""
        if turns == 0:
            return self.bs
        if self.learn == "every":      # ~33 + 63 k tokens a chat at block 32
            return max(1, round(self.chat_bs * 3 / (2 * turns + 1)))
        return max(1, round(self.chat_bs * 3 / (turns + 2)))

    def _noised_chat(self, chat, B):
        """One chat's sequence: its clean tokens (group 0: the chat's text up to the start of its
        last noised block) followed by one noised block per learned turn (group j + 1 for turn
        j: the tokens of a block b_j holding that turn's answer, drawn at random, with the answer
        then <|endoftext|> to the block's end, as the engine leaves it). The noised copy of turn
        j reads the clean blocks before b_j, which are exactly what the engine has committed
        when it denoises b_j: the earlier turns' text, turn j's question and its answer so far.
        Returns (tokens, positions, groups, answer flags)."""
        history, q, a = chat
        chats = [(history[:j], *(history[j] if j < len(history) else (q, a)))
                 for j in range(len(history) + 1)]
        learned = chats if self.learn == "every" else chats[-1:]
        first_j = len(chats) - len(learned)
        texts = [chat_text(q_j, None, h_j) for h_j, q_j, _ in learned]
        texts += [chat_text(q_j, a_j, h_j) for h_j, q_j, a_j in learned]
        enc = [e.ids for e in self.tok.encode_batch(texts)]
        prompts, fulls = enc[:len(learned)], enc[len(learned):]
        whole = fulls[-1]                          # the whole chat; every turn's text is its prefix
        copies = []
        for p, f in zip(prompts, fulls):
            assert f[:len(p)] == p
            seq = f + [self.eos]
            seq += [self.eos] * (-len(seq) % B)    # EOS to the end of the last block
            b = self.rng.randint(len(p) // B, len(seq) // B - 1)   # a block with answer tokens
            assert whole[:b * B] == seq[:b * B]
            copies.append((seq, len(p), b))
        clean = max(b for _, _, b in copies) * B
        tokens, pos = whole[:clean], list(range(clean))
        group, answer = [0] * clean, [False] * clean
        for j, (seq, plen, b) in enumerate(copies, start=first_j + 1):
            span = range(b * B, (b + 1) * B)
            tokens += seq[b * B:(b + 1) * B]
            pos += span
            group += [j] * B
            answer += [i >= plen for i in span]
        return tokens, pos, group, answer

    def next(self, eps=1e-3):
        B = self.rng.choice(BLOCK_LENGTHS)
        turns = history_turns(self.rng)
        bs = self.batch_size(turns)
        chats = [sample_chat(self.rng, turns) for _ in range(bs)]
        seqs = [self._noised_chat(c, B) for c in chats]
        lengths = [len(tokens) for tokens, *_ in seqs]
        L = max([ROW_LENGTH] + lengths)
        place, rows = packed.pack(lengths, L)
        x = torch.full((rows, L), self.eos, dtype=torch.long)
        seg = torch.full((rows, L), -1, dtype=torch.long)   # padding: a sequence of its own
        pos = torch.zeros((rows, L), dtype=torch.long)
        group = torch.zeros((rows, L), dtype=torch.long)
        answer = torch.zeros((rows, L), dtype=torch.bool)
        p_mask = torch.ones((rows, L))
        t = torch.rand(sum(len(set(g) - {0}) for _, _, g, _ in seqs), generator=self.g)
        copy = 0                                       # one noise level per noised block
        for i, ((tokens, ps, gs, ans), (r, off)) in enumerate(zip(seqs, place)):
            n = len(tokens)
            x[r, off:off + n] = torch.tensor(tokens)
            seg[r, off:off + n] = i
            pos[r, off:off + n] = torch.tensor(ps)
            group[r, off:off + n] = torch.tensor(gs)
            answer[r, off:off + n] = torch.tensor(ans)
            for c in range(n - len(set(gs) - {0}) * B, n, B):
                p_mask[r, off + c:off + c + B] = (1 - eps) * t[copy] + eps
                copy += 1
        noise = (torch.rand(rows, L, generator=self.g) < p_mask) & answer
        labels = x.clone()
        x = x.masked_fill(noise, self.mask)
        return x, seg, pos, group, labels, noise, answer, p_mask, B


class Prefetcher:
    """A Batcher's batches made ahead on a thread: the tokenizer and the packing (Python, ~5% of
    a step) run while torch computes the step before, on the time its threads leave idle. The
    same batches in the same order. `state` is the stream's state after the last batch taken,
    what a resumed run must start from."""

    def __init__(self, batcher, depth=2):
        self.batcher = batcher
        self.state = (batcher.rng.getstate(), batcher.g.get_state())
        self.queue = queue.Queue(depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._produce, daemon=True)
        self.thread.start()

    def _produce(self):
        while not self.stop.is_set():
            item = (self.batcher.next(), (self.batcher.rng.getstate(), self.batcher.g.get_state()))
            while not self.stop.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass

    def next(self):
        batch, self.state = self.queue.get()
        return batch

    def close(self):
        """Stop the thread and wait for it: a thread still inside torch when the interpreter
        exits aborts the process ("terminate called without an active exception")."""
        self.stop.set()
        self.thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def loss_fn(cfg, w, x, seg, pos, group, labels, noise, answer, p_mask, B):
    logits = packed.forward(cfg, w, x, seg, pos, B, at=noise, group=group)  # masked tokens only
    ce = F.cross_entropy(logits, labels[noise], reduction="none")
    weight = p_mask[noise].reciprocal()
    return (ce * weight).sum() / answer.sum().clamp(min=1), (ce.detach().mean() if len(ce) else
                                                              torch.tensor(0.0))


# ---- export ---------------------------------------------------------------------------------------


def export_hf(cfg, w, tok_json, tok_cfg, out_dir):
    """Write the HF checkpoint (bf16, expert_bias f32), in the released layout."""
    weights = {}
    for name, _, dt in hfc.tensor_shapes(cfg):
        t = w[name].detach().float()
        weights[name] = t if dt == "f32" else t.to(torch.bfloat16)
    hfc.write_checkpoint(out_dir, cfg, weights, tok_json, tok_cfg, n_shards=2)
    return weights


def _weights(ap, option, text, count=None):
    """Comma-separated sampling weights of a command-line option, or an argparse error."""
    try:
        weights = tuple(float(x) for x in text.split(","))
    except ValueError:
        ap.error(f"{option} {text!r}: expected comma-separated numbers")
    if min(weights) < 0 or sum(weights) <= 0:
        ap.error(f"{option} {text!r}: weights must be >= 0 with a positive sum")
    if count is not None and len(weights) != count:
        ap.error(f"{option} {text!r}: expected {count} weights, got {len(weights)}")
    return weights


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=16000)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--bias-rate", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; part of the recipe, since 2 threads sum in another order "
                    "and give other weights (models/demo/README.md)")
    ap.add_argument("--save-every", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=2000)
    ap.add_argument("--eval-n", type=int, default=100)
    ap.add_argument("--work", default=WORK)
    ap.add_argument("--fresh", action="store_true", help="ignore a saved state")
    ap.add_argument("--init-from", help="start from the weights and expert bias of this state.pt "
                    "(a new stage: fresh optimizer, schedule and data stream)")
    ap.add_argument("--stop-at", type=int, help="stop (and save) at this step")
    ap.add_argument("--rope-theta", type=float, default=10000.0,
                    help="RoPE base (LLaDA2.0's is 600000; with only 16 rotary dims that leaves "
                    "too little short-range position precision to tell digits apart)")
    ap.add_argument("--curriculum", type=float, default=0.5,
                    help="fraction of additions/subtractions with small operands (data.CURRICULUM)")
    ap.add_argument("--answers", choices=("fixed", "varied"), default="fixed",
                    help="answer sentence patterns (data.ANSWER_STYLE)")
    ap.add_argument("--history", default="0.65,0.07,0.08,0.1,0.1",
                    help="comma-separated weights of 0, 1, 2, ... earlier chat turns before the "
                    "question, drawn per batch (data.HISTORY_WEIGHTS); '1': single-turn only")
    ap.add_argument("--chat-batch-size", type=int, default=24,
                    help="sequences in a batch with one earlier turn; fewer with more turns "
                    "(Batcher.batch_size), so a chat step costs about what a single-turn one does")
    ap.add_argument("--task-weights", default="0.32,0.40,0.06,0.06,0.16",
                    help="training mix of the tasks add,sub,double,half,unit "
                    "(data.TRAIN_TASK_WEIGHTS; the held-out set keeps data.TASK_WEIGHTS)")
    ap.add_argument("--learn", choices=("last", "every"), default="last",
                    help="the answers of a chat learned: its last one, or every one (a noised "
                    "block per turn, each reading the chat before it: Batcher._noised_chat)")
    ap.add_argument("--export-only", action="store_true")
    ap.add_argument("--bench", type=int, default=0, help="time N steps and exit")
    args = ap.parse_args(argv)

    import data
    data.ANSWER_STYLE = args.answers
    data.CURRICULUM = args.curriculum
    data.HISTORY_WEIGHTS = _weights(ap, "--history", args.history)
    data.TRAIN_TASK_WEIGHTS = _weights(ap, "--task-weights", args.task_weights, len(data.TASKS))
    reference.moe = _moe_recording     # here, not at import: tests import this module
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)   # index_put accumulate (embedding grads) etc.
    torch.manual_seed(args.seed)
    os.makedirs(args.work, exist_ok=True)
    cfg = hfc.make_config(**{**CONFIG, "rope_theta": int(args.rope_theta)
                             if float(args.rope_theta).is_integer() else args.rope_theta})
    tok_json, tok_cfg = build_tokenizer(cfg["vocab_size"])
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tok_json)

    w = init_weights(cfg, args.seed)
    # the experts as one tensor per layer and role; their HF names become views of them
    stacked = moe_batched.stack_experts(cfg, w, requires_grad=True)
    params = {k: v.requires_grad_() for k, v in w.items()
              if not k.endswith("expert_bias") and (".experts." not in k or k in stacked)}
    decay = [v for k, v in params.items() if v.dim() >= 2]
    no_decay = [v for k, v in params.items() if v.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8, fused=True)
    batcher = Batcher(tok, cfg, args.batch_size, args.seed, args.chat_batch_size, args.learn)
    step = 0
    log = []
    state_path = os.path.join(args.work, "state.pt")
    if args.init_from and not os.path.exists(state_path):
        st = torch.load(args.init_from, weights_only=False)
        with torch.no_grad():
            for k, v in st["w"].items():
                w[k].copy_(v)
        log = [{"init_from": args.init_from, "step": st["step"]}]
        print(f"initialized from {args.init_from} (step {st['step']})", flush=True)
    elif os.path.exists(state_path) and not args.fresh:
        st = torch.load(state_path, weights_only=False)
        with torch.no_grad():
            for k, v in st["w"].items():
                w[k].copy_(v)
        opt.load_state_dict(st["opt"])
        batcher.rng.setstate(st["rng"])
        batcher.g.set_state(st["g"])
        step, log = st["step"], st["log"]
        print(f"resumed at step {step}", flush=True)

    def save():
        # the experts' HF names are views of the stacked tensors (stack_experts): saved once, as
        # the stacked ones; loading copies into those, which fills the views
        weights = {k: v.detach().clone() for k, v in w.items() if v._base is None}
        torch.save({"w": weights, "opt": opt.state_dict(),
                    "rng": batches.state[0], "g": batches.state[1], "step": step,
                    "log": log, "config": cfg}, state_path + ".tmp")
        os.replace(state_path + ".tmp", state_path)

    def export():
        out = os.path.join(args.work, "hf")
        weights = export_hf(cfg, w, tok_json, tok_cfg, out)
        with open(os.path.join(args.work, "train_log.json"), "w") as f:
            json.dump({"args": vars(args), "log": log}, f, indent=1)
        return out, weights

    def evaluate(n):
        from evaluate import by_task, evaluate_reference
        wb = {k: v.detach().to(torch.bfloat16).float() if not k.endswith("expert_bias")
              else v.detach() for k, v in w.items()}         # what the bf16 checkpoint holds
        res = {}
        for B in (32, 16):
            acc, rows = evaluate_reference(cfg, wb, tok, n, block_length=B)
            res[B] = (acc, by_task(rows))
        return res

    if args.export_only:
        out, _ = export()
        print("wrote", out)
        return 0

    batches = Prefetcher(batcher)            # after a resume has set the stream's state
    moe_prefixes = [f"model.layers.{n}." for n in range(cfg["first_k_dense_replace"],
                                                         cfg["num_hidden_layers"])]
    E = cfg["num_experts"]
    t_start, tok_count, last_print, step0 = time.time(), 0, time.time(), step
    steps_total = args.bench or min(args.steps, args.stop_at or args.steps)
    try:
        while step < steps_total:
            lr = args.lr * min(1.0, (step + 1) / args.warmup) * (
                0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.steps))))
            for gp in opt.param_groups:
                gp["lr"] = lr
            x, seg, pos, group, labels, noise, answer, p_mask, B = batches.next()
            loss, ce = loss_fn(cfg, w, x, seg, pos, group, labels, noise, answer, p_mask, B)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0, foreach=True)
            opt.step()
            # aux-loss-free balancing of the router
            imbalance = []
            with torch.no_grad():
                for p in moe_prefixes:
                    h = _LOADS.get(p + "mlp.", _LOADS.get(p, {}))
                    load = torch.zeros(E)
                    for e, c in h.items():
                        load[e] = c
                    w[p + "mlp.gate.expert_bias"] += args.bias_rate * torch.sign(load.mean() - load)
                    imbalance.append((load.max() / load.mean().clamp(min=1e-9)).item())
            step += 1
            tok_count += x.numel()
            log.append({"step": step, "loss": round(loss.item(), 4), "ce": round(ce.item(), 4),
                        "B": B, "lr": lr, "max_load": round(max(imbalance), 2)})
            now = time.time()
            if now - last_print > 20 or step == steps_total:
                last_print = now
                el = now - t_start
                recent = [r for r in log[-50:] if "loss" in r]
                rl = sum(r["loss"] for r in recent) / len(recent)
                rc = sum(r["ce"] for r in recent) / len(recent)
                sps = el / max(1, step - step0)
                print(f"step {step}/{steps_total} loss {rl:.4f} ce {rc:.4f} lr {lr:.2e} "
                      f"gnorm {gn:.2f} max/mean load {max(imbalance):.2f} "
                      f"{tok_count / el:.0f} tok/s {sps:.2f} s/step "
                      f"eta {(steps_total - step) * sps / 60:.1f} min", flush=True)
            if args.bench:
                continue
            if step % args.save_every == 0 or step == steps_total:
                save()
            if step % args.eval_every == 0 or step == args.steps:
                t0 = time.time()
                res = evaluate(args.eval_n)
                log[-1]["eval"] = {str(B): acc for B, (acc, _) in res.items()}
                print(f"  eval step {step}: " + "  ".join(
                    f"B={B} {acc:.1%} {bt}" for B, (acc, bt) in res.items())
                    + f"  ({time.time() - t0:.0f} s)", flush=True)
                out, _ = export()
                print(f"  exported {out}", flush=True)
    finally:
        batches.close()
    print(f"trained steps {step0}..{step} in {(time.time() - t_start) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The demo trainer computes tests/reference.py's model (models/demo/README.md): its batched MoE
layer (moe_batched.py) gives reference.moe's routing, outputs, gradients and expert loads, with
the expert weights stacked or not; its packed forward (packed.py) gives reference.forward's
logits and gradients for every sequence of a row; its batches are what the objective says."""

import os
import sys

import pytest

torch = pytest.importorskip("torch")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "models", "demo"))

import hf_checkpoint as hfc  # noqa: E402
import moe_batched  # noqa: E402
import packed  # noqa: E402
import reference  # noqa: E402


def _weights(cfg, seed, stacked):
    """f32 leaves by HF name; with stacked, the experts as moe_batched.stack_experts keeps them
    (the HF names then views). Returns (w, the leaves)."""
    w = {k: v.float() for k, v in hfc.random_weights(cfg, seed=seed).items()}
    keys = moe_batched.stack_experts(cfg, w, requires_grad=True) if stacked else []
    leaves = {k: v for k, v in w.items()
              if "bias" not in k and (".experts." not in k or not stacked or k in keys)}
    for v in leaves.values():
        v.requires_grad_()
    return w, leaves


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_batched_moe_equals_reference(seed, stacked):
    cfg = hfc.SHAPES["base"]
    w, leaves = _weights(cfg, seed, stacked)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 17, cfg["hidden_size"], generator=g, requires_grad=True)
    layer = f"model.layers.{cfg['first_k_dense_replace']}."
    hits_ref, hits = {}, {}
    want = reference.moe(cfg, w, layer, x, hits=hits_ref)
    got = moe_batched.moe(cfg, w, layer, x, hits=hits)
    assert hits == hits_ref
    assert len(hits) > 1                                   # several experts really used
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    inputs = [x] + [v for k, v in leaves.items() if k.startswith(layer)]
    probe = torch.randn(want.shape, generator=g)
    g_want = torch.autograd.grad((want * probe).sum(), inputs, allow_unused=True)
    g_got = torch.autograd.grad((got * probe).sum(), inputs, allow_unused=True)
    for a, b in zip(g_want, g_got):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def _packed_rows(cfg, lengths, row_len, seed):
    """Random token sequences of the given lengths packed into rows: (sequences, ids, seg, pos)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, cfg["vocab_size"], (n,), generator=g) for n in lengths]
    place, rows = packed.pack(lengths, row_len)
    ids = torch.zeros((rows, row_len), dtype=torch.long)
    seg = torch.full((rows, row_len), -1, dtype=torch.long)
    pos = torch.zeros((rows, row_len), dtype=torch.long)
    for i, (s, (r, off)) in enumerate(zip(seqs, place)):
        ids[r, off:off + len(s)], seg[r, off:off + len(s)] = s, i
        pos[r, off:off + len(s)] = torch.arange(len(s))
    return seqs, ids, seg, pos


def test_pack_places_every_sequence_once_within_a_row():
    lengths = [32, 16, 64, 48, 16, 32, 32, 64, 16]
    place, rows = packed.pack(lengths, 64)
    used = {}
    for n, (r, off) in zip(lengths, place):
        assert 0 <= off and off + n <= 64
        for c in range(off, off + n):
            assert (r, c) not in used                      # no two sequences overlap
            used[r, c] = True
    assert rows == (sum(lengths) + 63) // 64               # these lengths pack without a gap
    with pytest.raises(ValueError, match="65 tokens"):
        packed.pack([32, 65], 64)


@pytest.mark.parametrize("block_length", [16, 32])
def test_packed_forward_equals_reference_per_sequence(block_length):
    """Each sequence of a packed row gets reference.forward's logits on that sequence alone, and
    the weights the same gradients; padding tokens change nothing."""
    cfg = hfc.SHAPES["base"]
    w, leaves = _weights(cfg, 3, stacked=True)
    B = block_length
    seqs, ids, seg, pos = _packed_rows(cfg, [2 * B, B, 3 * B, B, 2 * B], 4 * B, seed=4)
    assert (seg == -1).any()                               # some padding in the rows
    logits = packed.forward(cfg, w, ids, seg, pos, B)
    g = torch.Generator().manual_seed(5)
    probe = torch.randn(logits.shape, generator=g)
    want_loss = 0
    for i, s in enumerate(seqs):
        at = seg == i
        want = reference.forward(cfg, w, s, B)
        torch.testing.assert_close(logits[at], want, rtol=1e-5, atol=1e-5)
        want_loss = want_loss + (want * probe[at]).sum()
    got_loss = sum((logits[seg == i] * probe[seg == i]).sum() for i in range(len(seqs)))
    names = sorted(leaves)
    g_want = torch.autograd.grad(want_loss, [leaves[k] for k in names], allow_unused=True)
    g_got = torch.autograd.grad(got_loss, [leaves[k] for k in names], allow_unused=True)
    for k, a, b in zip(names, g_want, g_got):
        assert (a is None) == (b is None), k
        if a is not None:
            # float sums in another order over ~100 tokens: within 1e-5 of the gradient's scale
            assert (b - a).abs().max() <= 1e-5 * a.abs().max() + 1e-6, k
    # `at`: only the chosen tokens' logits, the same values
    at = (pos % 3 == 0) & (seg >= 0)
    torch.testing.assert_close(packed.forward(cfg, w, ids, seg, pos, B, at=at), logits[at].detach(),
                               rtol=1e-6, atol=1e-6)


def _trainer_batches(learn, n, seed=3, B=None):
    """n batches of the trainer's Batcher (chats of 0-3 earlier turns) and the Batcher."""
    import data
    import train
    from tokenizer import build_tokenizer
    from tokenizers import Tokenizer

    cfg = hfc.make_config(**train.CONFIG)
    tok = Tokenizer.from_str(build_tokenizer(cfg["vocab_size"])[0])
    saved = data.HISTORY_WEIGHTS, train.BLOCK_LENGTHS
    data.HISTORY_WEIGHTS = (0.4, 0.2, 0.2, 0.2)
    train.BLOCK_LENGTHS = (B,) if B else train.BLOCK_LENGTHS
    try:
        batcher = train.Batcher(tok, cfg, 12, seed=seed, chat_batch_size=6, learn=learn)
        return [batcher.next() for _ in range(n)], batcher, tok
    finally:
        data.HISTORY_WEIGHTS, train.BLOCK_LENGTHS = saved


@pytest.mark.parametrize("learn", ["last", "every"])
def test_training_batch_noises_only_the_answer_of_each_noised_block(learn):
    """Every packed sequence is the chat's clean tokens from position 0 up to the start of its
    last noised block, then one noised block per learned answer (whole blocks, their own
    positions); only answer tokens of those blocks are masked, each block at one noise level,
    and an answer ends with <|endoftext|> to the end of its block. "last": one noised block per
    sequence, right after the clean tokens (the sequence is the chat cut at its end)."""
    batches, batcher, tok = _trainer_batches(learn, 12)
    role, eos = tok.token_to_id("<role>"), batcher.eos
    turns_seen = set()
    for x, seg, pos, group, labels, noise, answer, p_mask, B in batches:
        assert noise.any() and not (noise & ~answer).any()
        assert (x[noise] == batcher.mask).all() and (x[~noise] == labels[~noise]).all()
        for i in range(int(seg.max()) + 1):
            at = seg == i
            g, p, a, lab = group[at], pos[at], answer[at], labels[at]
            clean = int((g == 0).sum())
            assert p[:clean].tolist() == list(range(clean)) and clean % B == 0
            assert not a[:clean].any() and (g[:clean] == 0).all()
            copies = g[clean:].view(-1, B)
            assert (copies == copies[:, :1]).all()             # whole blocks, one group each
            assert copies[:, 0].unique().numel() == len(copies)
            # the chat's questions: its text is the clean tokens, then the last noised block
            turns = (lab[:clean].tolist() + lab[-B:].tolist()).count(role) // 2
            if learn == "last":
                assert len(copies) == 1 and p.tolist() == list(range(len(p)))
            else:
                assert len(copies) == turns and copies[:, 0].tolist() == sorted(copies[:, 0])
                turns_seen.add(turns)
            for c in range(len(copies)):
                span = slice(clean + c * B, clean + (c + 1) * B)
                start = int(p[span][0])
                assert start % B == 0 and p[span].tolist() == list(range(start, start + B))
                assert a[span].any() and start <= clean
                said = lab[span][a[span]].tolist()
                if eos in said:                                # EOS to the block's end
                    assert set(said[said.index(eos):]) == {eos}
                assert p_mask[at][span][a[span]].unique().numel() == 1
                first = int(a[span].nonzero()[0, 0])
                assert first == 0 or lab[span][first - 1] == tok.token_to_id("</role>")
    if learn == "every":
        assert {1, 2, 3, 4} <= turns_seen                       # chats of 0-3 earlier turns


@pytest.mark.parametrize("B", [16, 32])
def test_every_answer_batch_gives_each_block_what_the_engine_gives_it(B):
    """learn="every": the packed forward's logits of each noised block equal reference.forward
    on that chat's clean blocks before it followed by that block alone: what the engine's
    cache and block hold when it denoises the block (2-layer model, random weights)."""
    import train
    cfg = hfc.make_config(**{**train.CONFIG, "num_hidden_layers": 2})
    w, _ = _weights(cfg, 6, stacked=True)
    (batch,), _, _ = _trainer_batches("every", 1, seed=11, B=B)
    x, seg, pos, group, labels, noise, answer, p_mask, _ = batch
    with torch.no_grad():
        logits = packed.forward(cfg, w, x, seg, pos, B, group=group)
        checked = 0
        for i in range(int(seg.max()) + 1):
            at = seg == i
            ids, g, p = x[at], group[at], pos[at]
            for copy in g[g > 0].unique():
                blk = g == copy
                start = int(p[blk][0])
                seq = torch.cat([ids[(g == 0) & (p < start)], ids[blk]])
                want = reference.forward(cfg, w, seq, B)[start:]
                torch.testing.assert_close(logits[at][blk], want, rtol=1e-4, atol=1e-4)
                checked += 1
    assert checked > int(seg.max()) + 1                       # more blocks than chats


def _conversations():
    import random
    import data
    rng = random.Random(7)
    return [data.sample_chat(rng, turns) for turns in (0, 1, 2, 3) for _ in range(3)]


def test_training_chats_render_as_the_engine_renders_them():
    """A training conversation (earlier turns, then the question) is the exact text, and the
    exact token ids, that create_chat_completion / tide-cli chat build for the same messages:
    from the trainer's tokenizer_config template and from the shipped GGUF."""
    import data
    from tokenizer import build_tokenizer
    from tokenizers import Tokenizer
    from tide_cpp import Model
    from tide_cpp.tokenizer import ChatTemplate, tokenizer_of

    tok_json, tok_cfg = build_tokenizer()
    trainer_tok = Tokenizer.from_str(tok_json)
    template = ChatTemplate(tok_cfg["chat_template"])
    with Model(os.path.join(ROOT, "models", "tide-demo.gguf"), device="cpu") as m:
        gguf_tok = tokenizer_of(m)          # what create_chat_completion applies
    for history, q, a in _conversations():
        msgs = data.chat_messages(q, history)
        text = data.chat_text(q, None, history)
        assert template.render(msgs, add_generation_prompt=True) == text
        assert gguf_tok.apply_chat_template(msgs, add_generation_prompt=True) == text
        assert gguf_tok.apply_chat_template(msgs, tokenize=True) == trainer_tok.encode(text).ids
        # the answer continues the prompt's tokens: the trainer's split of prompt and answer holds
        full = trainer_tok.encode(data.chat_text(q, a, history)).ids
        assert full[:len(trainer_tok.encode(text).ids)] == trainer_tok.encode(text).ids
    assert text.count("<role>HUMAN</role>") == 4 and text.count("<|role_end|>") == 7


def test_prefetched_batches_are_the_stream_and_resume_exactly():
    """The trainer's Prefetcher gives the Batcher's batches in order, and its saved state starts
    a new Batcher at the next batch (a resumed run sees the batches an unbroken one would)."""
    import train
    from tokenizer import build_tokenizer
    from tokenizers import Tokenizer

    cfg = hfc.make_config(**train.CONFIG)
    tok = Tokenizer.from_str(build_tokenizer(cfg["vocab_size"])[0])
    plain = train.Batcher(tok, cfg, 8, seed=5)
    want = [plain.next() for _ in range(4)]
    with train.Prefetcher(train.Batcher(tok, cfg, 8, seed=5)) as ahead:
        got = [ahead.next() for _ in range(3)]
    resumed = train.Batcher(tok, cfg, 8, seed=99)
    resumed.rng.setstate(ahead.state[0])
    resumed.g.set_state(ahead.state[1])
    got.append(resumed.next())
    for a, b in zip(want, got):
        assert a[-1] == b[-1] and all(torch.equal(x, y) for x, y in zip(a[:-1], b[:-1]))


def test_chat_batches_shrink_with_their_turns_and_the_task_mix_is_the_trainers():
    """A chat batch holds fewer sequences the more earlier turns it has (the recipe's 48 single
    questions, then 24/18/14/12), and sample() draws the trainer's task mix, not the held-out
    set's."""
    import random
    import data
    import train
    from tokenizer import build_tokenizer
    from tokenizers import Tokenizer

    cfg = hfc.make_config(**train.CONFIG)
    tok = Tokenizer.from_str(build_tokenizer(cfg["vocab_size"])[0])
    batcher = train.Batcher(tok, cfg, 48, seed=1, chat_batch_size=24)
    assert [batcher.batch_size(k) for k in range(5)] == [48, 24, 18, 14, 12]
    every = train.Batcher(tok, cfg, 96, seed=1, chat_batch_size=32, learn="every")
    assert [every.batch_size(k) for k in range(5)] == [96, 32, 19, 14, 11]   # k more noised blocks
    saved = data.TRAIN_TASK_WEIGHTS
    data.TRAIN_TASK_WEIGHTS = (0, 1, 0, 0, 0)
    try:
        rng = random.Random(2)
        answers = [data.sample(rng)[1] for _ in range(50)]
    finally:
        data.TRAIN_TASK_WEIGHTS = saved
    assert all(" minus " in a for a in answers), answers    # "{a} minus {b} is {c}." only
    held_out_tasks = {t for _, _, t in data.held_out_set(200)}
    assert held_out_tasks == set(data.TASKS)      # the held-out set keeps its own mix


def test_trainer_rejects_bad_weights():
    import train
    for argv in (["--task-weights", "1,2"], ["--history", "1,x"], ["--history", "-1,2"]):
        with pytest.raises(SystemExit) as e:
            train.main(argv + ["--export-only", "--work", os.devnull])
        assert e.value.code == 2

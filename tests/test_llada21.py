"""LLaDA2.1 decoding (token-to-token editing, `editing_threshold`) in tide_cpp/generation.py
against the reference without a cache (tests/reference_generate_editing.py).

As for 2.0: the schedule on `ReferenceModel` (full recompute) must give the reference's tokens,
forwards, edits and post steps exactly; the native engine (cache of finished blocks) must give the
reference's greedy tokens. Plus what a cache changes: a block enters the cache from a forward
over its final tokens.
"""

import numpy as np
import pytest

import reference_generate as rg
import reference_generate_editing as rge
from tide_cpp import generation
from tide_cpp.tokenizer import end_of_generation_ids

B = 8
TEXT = ("The quick brown fox jumps over the lazy dog. What is 37 plus 48? Hello, world! "
        "How are you today?")
# threshold / editing threshold: the model card's quality and speed presets, and stricter ones
SETTINGS = [(0.7, 0.5), (0.5, 0.0), (0.9, 0.3), (0.95, 0.9)]


@pytest.fixture(scope="module")
def tiny():
    return rg.tiny_model(seed=0)


@pytest.fixture(scope="module")
def tiny_eos():
    cfg, w, m = rg.tiny_model(seed=0)
    m.w = rg.bias_eos(cfg, w, 1.05, like=287)
    return cfg, m.w, m


def prompt_ids(m, n):
    ids = m.tokenize(TEXT)
    assert len(ids) >= n
    return ids[:n]


def run_both(cfg, w, m, ids, max_tokens, threshold, editing_threshold, **kw):
    kw.setdefault("block_length", B)
    kw.setdefault("max_post_steps", 16)
    ref = rge.generate(cfg, w, ids, max_tokens, mask_id=m.mask_token_id,
                       eos_id=end_of_generation_ids(m), threshold=threshold,
                       editing_threshold=editing_threshold, **kw)
    if hasattr(m, "reset_stats"):
        m.reset_stats()
    got = generation.generate(m, ids, max_tokens=max_tokens, threshold=threshold,
                              editing_threshold=editing_threshold, **kw)
    return ref, got


# ---- the schedule on the reference model -------------------------------------------------------

@pytest.mark.parametrize("n_prompt", [5, 8, 13])
@pytest.mark.parametrize("threshold,editing", SETTINGS)
def test_editing_equals_reference(tiny, n_prompt, threshold, editing):
    cfg, w, m = tiny
    ids = prompt_ids(m, n_prompt)
    ref, got = run_both(cfg, w, m, ids, 20, threshold, editing)
    assert got.tokens == ref["tokens"]
    assert got.stats["steps"] == ref["steps"]
    assert got.stats["blocks"] == ref["blocks"]
    assert got.stats["edits"] == ref["edits"]
    assert got.stats["post_steps"] == ref["post_steps"]
    assert all(f <= B + 16 + 1 for f in ref["forwards_per_block"])


def test_editing_happens_and_changes_the_answer(tiny):
    # The speed preset (editing 0.0) on a random model edits; the answer then differs from the
    # same threshold without editing (the 2.0 schedule with one step per token is the closest).
    cfg, w, m = tiny
    ids = prompt_ids(m, 8)
    ref, got = run_both(cfg, w, m, ids, 24, 0.5, 0.0)
    assert got.stats["edits"] > 0 and got.stats["post_steps"] > 0
    plain = generation.generate(m, ids, max_tokens=24, block_length=B, steps=B, threshold=0.5)
    assert "edits" not in plain.stats
    assert plain.tokens != got.tokens


@pytest.mark.parametrize("max_post_steps", [0, 1, 3])
def test_post_step_budget(tiny, max_post_steps):
    cfg, w, m = tiny
    ids = prompt_ids(m, 8)
    ref, got = run_both(cfg, w, m, ids, 16, 0.5, 0.0, max_post_steps=max_post_steps)
    assert got.tokens == ref["tokens"] and got.stats["steps"] == ref["steps"]
    assert got.stats["post_steps"] == ref["post_steps"] <= max_post_steps * got.stats["blocks"]
    if max_post_steps == 0:   # a block ends as soon as its last mask is filled
        assert got.stats["post_steps"] == 0


def test_steps_and_prompt_never_edited(tiny):
    cfg, w, m = tiny
    ids = prompt_ids(m, 13)
    seen = []
    got = generation.generate(m, ids, max_tokens=19, block_length=B, threshold=0.5,
                              editing_threshold=0.0, on_step=seen.append)
    assert len(seen) == got.stats["steps"]
    assert sum(len(s.edited) for s in seen) == got.stats["edits"] > 0
    prev = None
    for s in seen:
        assert np.all(s.edited >= 13)                       # the prompt is never edited
        assert np.all((s.edited >= s.block_start) & (s.edited < s.block_start + B))
        assert len(s.replaced) == len(s.edited) == len(s.edited_probs)
        assert np.all(s.canvas[s.edited] != s.replaced)      # an edit changes the token
        assert np.all(s.replaced != m.mask_token_id)         # ... of a filled position
        assert np.all(s.edited_probs >= 0.0)
        if prev is not None and prev.block == s.block:
            changed = np.nonzero(prev.canvas != s.canvas[:len(prev.canvas)])[0]
            assert set(changed) <= set(s.committed) | set(s.edited)
            assert np.all(prev.canvas[s.committed] == m.mask_token_id)
            assert np.all(prev.canvas[s.edited] == s.replaced)
        assert s.eog_token_ids == end_of_generation_ids(m)
        prev = s
    assert any(s.post_step for s in seen)
    # the same as plain values, for a live canvas elsewhere (a web page)
    import json
    for s in seen:
        ch = s.changes()
        assert json.loads(json.dumps(ch)) == ch
        assert [c["position"] for c in ch] == sorted(list(s.committed) + list(s.edited))
        for c in ch:
            assert c["token"] == s.canvas[c["position"]]
            assert (c["replaced"] is None) == (c["position"] in set(s.committed))


def test_blocks_enter_the_cache_with_their_final_tokens(tiny):
    cfg, w, m = tiny
    ids = prompt_ids(m, 5)
    m.reset_stats()
    got = generation.generate(m, ids, max_tokens=27, block_length=B, threshold=0.5,
                              editing_threshold=0.0, eos_early_stop=False)
    # every decoded block but the last was committed after its last step, with its final ids
    n = got.stats["blocks"]
    commits = [c for c in m.calls if c[0] == "commit"]
    assert len(commits) == n - 1 == got.stats["commits"]
    assert m.calls[-1][0] == "step"
    final = ids + got.tokens
    assert m._past == final[:len(m._past)] and len(m._past) == (n - 1) * B


def test_eos_ends_after_the_block(tiny_eos):
    cfg, w, m = tiny_eos
    ids = prompt_ids(m, 13)
    for early in (True, False):
        ref, got = run_both(cfg, w, m, ids, 40, 0.7, 0.5, eos_early_stop=early)
        assert got.tokens == ref["tokens"] and got.stats["steps"] == ref["steps"]
        assert ref["eos"] and got.finish_reason == "stop" and 0 < len(got.tokens) < 40


def test_role_end_ends_the_answer(tiny):
    # <|role_end|> ends every chat turn: an answer stops there, as at <|endoftext|>.
    cfg, w, m0 = tiny
    w2 = rg.bias_eos(cfg, w, 1.05, like=287, token="<|role_end|>")
    m = rg.ReferenceModel(cfg, w2, m0.metadata_string("tokenizer.huggingface.json"),
                          m0.metadata_string("tokenizer.chat_template"))
    role_end = m.tokenizer.token_to_id("<|role_end|>")
    assert end_of_generation_ids(m) == {m.eos_token_id, role_end}
    ids = prompt_ids(m, 13)
    for editing in (None, 0.5):
        if editing is None:
            ref = rg.generate(cfg, w2, ids, 40, mask_id=m.mask_token_id,
                              eos_id=end_of_generation_ids(m), block_length=B, steps=B)
            got = generation.generate(m, ids, max_tokens=40, block_length=B, steps=B)
        else:
            ref, got = run_both(cfg, w2, m, ids, 40, 0.7, editing)
        assert ref["eos"] and got.tokens == ref["tokens"]
        assert got.finish_reason == "stop" and 0 < len(got.tokens) < 40
        assert role_end not in got.tokens and "<|role_end|>" not in got.text
        full = ref["canvas"][13:]
        assert full[len(got.tokens)] == role_end


def test_sampling_seeded(tiny):
    cfg, w, m = tiny
    ids = prompt_ids(m, 13)
    kw = dict(max_tokens=16, block_length=B, temperature=1.0, top_p=0.9, threshold=0.7,
              editing_threshold=0.5)
    a = generation.generate(m, ids, seed=3, **kw)
    b = generation.generate(m, ids, seed=3, **kw)
    c = generation.generate(m, ids, seed=4, **kw)
    assert a.tokens == b.tokens and a.stats == {**b.stats, "seconds": a.stats["seconds"],
                                                "prefill_seconds": a.stats["prefill_seconds"],
                                                "tokens_per_second": a.stats["tokens_per_second"]}
    assert a.tokens != c.tokens


@pytest.mark.parametrize("kw,name", [
    (dict(editing_threshold=-0.1), "editing_threshold"),
    (dict(editing_threshold=1.5), "editing_threshold"),
    (dict(editing_threshold="0.5"), "editing_threshold"),
    (dict(editing_threshold=0.5, max_post_steps=-1), "max_post_steps"),
    (dict(editing_threshold=0.5, max_post_steps=2.0), "max_post_steps"),
])
def test_invalid_arguments(tiny, kw, name):
    cfg, w, m = tiny
    m.reset_stats()
    with pytest.raises(ValueError, match=name):
        generation.generate(m, [1, 2, 3], **kw)
    assert m.calls == []


def test_presets_are_the_model_cards():
    assert generation.PRESETS["quality"]["threshold"] == 0.7
    assert generation.PRESETS["quality"]["editing_threshold"] == 0.5
    assert generation.PRESETS["speed"]["threshold"] == 0.5
    assert generation.PRESETS["speed"]["editing_threshold"] == 0.0
    for p in generation.PRESETS.values():
        assert p["max_post_steps"] == 16 and p["block_length"] == 32


def test_cli_options_and_preset():
    import argparse

    from tide_cpp.commands import _options

    p = argparse.ArgumentParser()
    _options.add_generation_options(p)
    kw = _options.generation_kwargs(p.parse_args([]))
    assert kw["editing_threshold"] is None and kw["max_post_steps"] == 16
    kw = _options.generation_kwargs(p.parse_args(["--preset", "quality"]))
    assert (kw["threshold"], kw["editing_threshold"], kw["max_post_steps"],
            kw["block_length"]) == (0.7, 0.5, 16, 32)
    kw = _options.generation_kwargs(p.parse_args(["--preset", "speed", "--threshold", "0.6"]))
    assert (kw["threshold"], kw["editing_threshold"]) == (0.6, 0.0)
    kw = _options.generation_kwargs(p.parse_args(["--editing-threshold", "0.3",
                                                  "--max-post-steps", "4"]))
    assert (kw["threshold"], kw["editing_threshold"], kw["max_post_steps"]) == (0.95, 0.3, 4)


def test_chat_completion_passes_editing(tiny):
    cfg, w, m = tiny
    msgs = [{"role": "user", "content": "What is 37 plus 48?"}]
    seen = []
    out = m.create_chat_completion(msgs, max_tokens=12, block_length=B, threshold=0.5,
                                   editing_threshold=0.0, on_step=seen.append)
    assert sum(len(s.edited) for s in seen) > 0
    prompt = m.apply_chat_template(msgs)
    ref = generation.generate(m, m.tokenize(prompt), max_tokens=12, block_length=B,
                              threshold=0.5, editing_threshold=0.0)
    assert out["choices"][0]["message"]["content"] == ref.text


# ---- the native engine -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from tide_cpp.model import Model

    cfg, w, path = rg.write_tiny_gguf(tmp_path_factory.mktemp("engine21"), "tiny21")
    model = Model(path, device="cpu", n_threads=1)
    yield cfg, w, model
    model.close()


@pytest.mark.parametrize("n_prompt", [5, 8, 13, 16])
@pytest.mark.parametrize("threshold,editing", SETTINGS)
def test_engine_editing_equals_reference(engine, n_prompt, threshold, editing):
    cfg, w, model = engine
    ids = prompt_ids(model, n_prompt)
    ref, got = run_both(cfg, w, model, ids, 24, threshold, editing)
    assert got.tokens == ref["tokens"], (n_prompt, threshold, editing)
    assert got.stats["steps"] == ref["steps"]
    assert got.stats["edits"] == ref["edits"]


def test_engine_block_32_presets(engine):
    cfg, w, model = engine
    ids = prompt_ids(model, 19)
    for name, preset in generation.PRESETS.items():
        ref, got = run_both(cfg, w, model, ids, 40, **preset)
        assert got.tokens == ref["tokens"] and got.stats["steps"] == ref["steps"], name


def test_engine_seeded_sampling(engine):
    cfg, w, model = engine
    ids = prompt_ids(model, 13)
    kw = dict(max_tokens=24, block_length=B, temperature=0.8, top_p=0.95, threshold=0.7,
              editing_threshold=0.5)
    a = model.generate(ids, seed=7, **kw)
    b = model.generate(ids, seed=7, **kw)
    c = model.generate(ids, seed=8, **kw)
    assert a.tokens == b.tokens and a.stats["edits"] == b.stats["edits"]
    assert a.tokens != c.tokens


def test_cli_generate_with_a_preset(engine):
    import os
    import subprocess
    import sys

    cfg, w, model = engine
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    want = generation.generate(model, model.tokenize("Hello, world!"), max_tokens=20,
                               **{**generation.PRESETS["speed"], "block_length": B})
    assert want.stats["edits"] > 0
    r = subprocess.run([sys.executable, "-m", "tide_cpp.cli", "generate", "-m", model.path,
                        "--device", "cpu", "--threads", "1", "-p", "Hello, world!",
                        "--max-tokens", "20", "--preset", "speed", "--block-length", str(B)],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": root, "PYTHONIOENCODING": "utf-8"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.text + "\n"
    assert f"{want.stats['edits']} edits, {want.stats['post_steps']} post steps" in r.stderr


def test_visual_canvas_marks_edits(tiny):
    import io

    from tide_cpp.commands.generate import BOLD, EDITED, CanvasView

    cfg, w, m = tiny
    ids = prompt_ids(m, 8)
    frames = []
    out = io.StringIO()
    view = CanvasView(m.tokenizer, out)

    def on_step(info):
        frames.append((info, view._render(info)))

    generation.generate(m, ids, max_tokens=16, block_length=B, threshold=0.5,
                        editing_threshold=0.0, on_step=on_step)
    edited = [(i, styled) for i, (_, styled) in frames if len(i.edited)]
    assert edited
    for info, styled in edited:
        in_answer = [p for p in info.edited if p < info.prompt_length + info.max_tokens]
        if in_answer:   # an edited token of the answer is drawn in the edit style
            assert EDITED in styled
    plain_only = [s for i, (_, s) in frames if not len(i.edited) and len(i.committed)]
    assert all(EDITED not in s and BOLD in s for s in plain_only)

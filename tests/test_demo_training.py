"""The demo trainer's batched MoE layer (models/demo/moe_batched.py) computes reference.moe:
same routing, same outputs, same gradients, same expert loads (models/demo/README.md)."""

import os
import sys

import pytest

torch = pytest.importorskip("torch")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "models", "demo"))

import hf_checkpoint as hfc  # noqa: E402
import moe_batched  # noqa: E402
import reference  # noqa: E402


@pytest.mark.parametrize("seed", [0, 1])
def test_batched_moe_equals_reference(seed):
    cfg = hfc.SHAPES["base"]
    w = hfc.random_weights(cfg, seed=seed)
    w = {k: v.float().requires_grad_() for k, v in w.items()}
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 17, cfg["hidden_size"], generator=g, requires_grad=True)
    layer = f"model.layers.{cfg['first_k_dense_replace']}."
    hits_ref, hits = {}, {}
    want = reference.moe(cfg, w, layer, x, hits=hits_ref)
    got = moe_batched.moe(cfg, w, layer, x, hits=hits)
    assert hits == hits_ref
    assert len(hits) > 1                                   # several experts really used
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    inputs = [x] + [v for k, v in w.items() if k.startswith(layer) and "bias" not in k]
    probe = torch.randn(want.shape, generator=g)
    g_want = torch.autograd.grad((want * probe).sum(), inputs, allow_unused=True)
    g_got = torch.autograd.grad((got * probe).sum(), inputs, allow_unused=True)
    for a, b in zip(g_want, g_got):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


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

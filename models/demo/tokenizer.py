"""The demo model's tokenizer: byte-level BPE trained on the task's own text, LLaDA2 layout.

Same construction and layout as the test checkpoints (tests/hf_checkpoint.py) and the released
tokenizer: the Ling pre-tokenizer regex (digits split one per token), a byte-level BPE of
vocab_size - 28 entries, the 12 LLaDA2 added tokens (<|endoftext|> = EOS/PAD, <|mask|>, <role>,
</role>, <|role_end|>, ...) right after it, and 16 unused ids at the end, as the released
vocabulary is padded past its tokenizer. The chat template is the LLaDA2 one.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hf_checkpoint as hfc  # noqa: E402
from data import corpus  # noqa: E402


def build_tokenizer(vocab_size=512, n_lines=20000, seed=0):
    """(tokenizer_json: str, tokenizer_config: dict), deterministic: trained on data.corpus(),
    which is fixed whatever the training flags are."""
    return hfc.train_bpe_tokenizer(corpus(n_lines, seed), vocab_size, min_frequency=2)


if __name__ == "__main__":
    from tokenizers import Tokenizer
    from data import chat_text, sample
    import random

    tj, tc = build_tokenizer()
    tok = Tokenizer.from_str(tj)
    rng = random.Random(0)
    lens = []
    for _ in range(2000):
        q, a = sample(rng)
        p = tok.encode(chat_text(q)).ids
        full = tok.encode(chat_text(q, a)).ids
        lens.append((len(p), len(full) - len(p)))
    s = chat_text(q, a)
    print(s, tok.encode(s).tokens)
    print("prompt len max/mean", max(p for p, _ in lens), sum(p for p, _ in lens) / len(lens))
    print("answer len max/mean", max(a for _, a in lens), sum(a for _, a in lens) / len(lens))
    print("total max", max(p + a for p, a in lens))

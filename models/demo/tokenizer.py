"""The demo model's tokenizer: byte-level BPE trained on the task's own text, LLaDA2 layout.

Same construction and layout as the test checkpoints (tests/hf_checkpoint.py) and the released
tokenizer: the Ling pre-tokenizer regex (digits split one per token), a byte-level BPE of
vocab_size - 28 entries, the 12 LLaDA2 added tokens (<|endoftext|> = EOS/PAD, <|mask|>, <role>,
</role>, <|role_end|>, ...) right after it, and 16 unused ids at the end, as the released
vocabulary is padded past its tokenizer. The chat template is the LLaDA2 one.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hf_checkpoint as hfc  # noqa: E402
from data import corpus  # noqa: E402


def build_tokenizer(vocab_size=512, n_lines=20000, seed=0):
    """(tokenizer_json: str, tokenizer_config: dict), deterministic."""
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers,
                            trainers)

    n_bpe = vocab_size - hfc._N_PAD - len(hfc._SPECIAL_TOKENS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(hfc._SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(corpus(n_lines, seed), trainer=trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    i = 0
    while len(vocab) < n_bpe:   # the trainer may stop short: fill so added tokens get fixed ids
        filler = f"\u0120filler{i}"
        i += 1
        if filler not in vocab:
            vocab[filler] = len(vocab)
    tok = Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    for text, special in hfc._SPECIAL_TOKENS:
        t = AddedToken(text, special=special, normalized=False, single_word=False,
                       lstrip=False, rstrip=False)
        (tok.add_special_tokens if special else tok.add_tokens)([t])
    ids = hfc.special_token_ids(vocab_size)
    for text, want in ids.items():
        assert tok.token_to_id(text) == want, (text, tok.token_to_id(text), want)
    # The config (added_tokens_decoder, chat template, special token names) is the shared one.
    return tok.to_str(pretty=True), hfc.make_tokenizer_config(vocab_size)


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

"""Tokenizer and chat template (tide_cpp/tokenizer.py): from the tokenizer.json the converter
embeds, special ids from the metadata, the template rendered as transformers renders it."""

import os

import pytest
from tokenizers import Tokenizer as HFTokenizer

import hf_checkpoint as hc
import reference_generate as rg
from tide_cpp.tokenizer import ChatTemplate, TemplateError, Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = hc.make_config()["vocab_size"]
IDS = hc.special_token_ids(V)
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 37 plus 48? It is 85.",
    "Caf\u00e9, na\u00efve, \u00fcber, \u4f60\u597d, "
    "\u041f\u0440\u0438\u0432\u0435\u0442 \U0001F600",
    "def add(a, b):\n    return a + b\n\n\tTabs and  double  spaces ",
    "<role>HUMAN</role>Hi!<|role_end|><role>ASSISTANT</role>",
    "",
]


@pytest.fixture(scope="module")
def tok_json():
    return rg._tokenizer_cached(V)[0]


@pytest.fixture(scope="module")
def tok(tok_json):
    return Tokenizer(tok_json, chat_template=hc.CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    return rg.write_tiny_gguf(tmp_path_factory.mktemp("tok"), "tiny")[2]


def test_encode_as_the_original(tok, tok_json):
    hf = HFTokenizer.from_str(tok_json)
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids
        assert tok.decode(tok.encode(text)) == text


def test_special_tokens_in_text_become_their_ids(tok):
    ids = tok.encode("<role>HUMAN</role>Hi<|role_end|>")
    assert ids[0] == IDS["<role>"] and IDS["</role>"] in ids and ids[-1] == IDS["<|role_end|>"]
    assert tok.encode("<|mask|>") == [IDS["<|mask|>"]]


def test_special_ids(tok):
    assert tok.eos_token_id == IDS["<|endoftext|>"] == tok.pad_token_id
    assert tok.mask_token_id == IDS["<|mask|>"]
    assert tok.bos_token_id == IDS["<|startoftext|>"]
    assert tok.n_vocab == V - 16  # the tokenizer itself; the GGUF pads to vocab_size


def test_no_bos_added(tok):
    # LLaDA2: add_bos_token false, so add_special adds nothing
    assert tok.encode("Hello", add_special=True) == tok.encode("Hello")


def test_decode_skip_special(tok):
    ids = tok.encode("Hello") + [tok.eos_token_id]
    assert tok.decode(ids) == "Hello<|endoftext|>"
    assert tok.decode(ids, skip_special=True) == "Hello"
    # <think> is added but not special: it stays
    assert tok.decode(tok.encode("<think>x"), skip_special=True) == "<think>x"


def test_from_gguf_metadata(gguf_path, tok):
    g = Tokenizer.from_gguf(gguf_path)
    for text in TEXTS:
        assert g.encode(text) == tok.encode(text)
    assert (g.eos_token_id, g.mask_token_id, g.bos_token_id) == (
        IDS["<|endoftext|>"], IDS["<|mask|>"], IDS["<|startoftext|>"])
    assert g.chat_template_source == hc.CHAT_TEMPLATE


def test_model_delegates(gguf_path, tok):
    from tide_cpp.model import Model

    with Model(gguf_path, device="cpu", n_threads=1) as m:
        for text in TEXTS:
            ids = m.tokenize(text)
            assert list(ids) == tok.encode(text)
            assert m.detokenize(ids) == text
        msgs = [{"role": "user", "content": "Hi"}]
        assert m.apply_chat_template(msgs) == ("<role>HUMAN</role>Hi<|role_end|>"
                                               "<role>ASSISTANT</role>")


# ---- chat template ---------------------------------------------------------------------------

def test_llada2_template(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    want = ("<role>SYSTEM</role>Be brief.<|role_end|><role>HUMAN</role>Hi!<|role_end|>"
            "<role>ASSISTANT</role>Hello.<|role_end|><role>HUMAN</role>2+2?<|role_end|>")
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == want
    assert tok.apply_chat_template(msgs) == want + "<role>ASSISTANT</role>"
    ids = tok.apply_chat_template(msgs, tokenize=True)
    assert ids == tok.encode(want + "<role>ASSISTANT</role>")
    assert ids[0] == IDS["<role>"]


def test_template_variables_and_filters():
    t = ChatTemplate("{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}"
                     "{% endfor %}{{ eos_token }}{% if add_generation_prompt %}>{% endif %}",
                     bos_token="<s>", eos_token="</s>")
    assert t.render([{"role": "user", "content": "a\u00e9"}]) == '<s>"a\u00e9"</s>>'
    assert t.render([{"role": "user", "content": "x"}], add_generation_prompt=False) == '<s>"x"</s>'


def test_template_trims_blocks_like_transformers():
    t = ChatTemplate("{% for m in messages %}\n    {{ m.content }}\n{% endfor %}")
    assert t.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == \
        "    a\n    b\n"


def test_raise_exception():
    t = ChatTemplate("{% if messages[0]['role'] != 'user' %}"
                     "{{ raise_exception('first message must be the user') }}{% endif %}ok")
    assert t.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(TemplateError, match="first message must be the user"):
        t.render([{"role": "assistant", "content": "x"}])


def test_template_is_sandboxed():
    t = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TemplateError):
        t.render([{"role": "user", "content": "x"}])
    t = ChatTemplate("{% set _ = messages.append(1) %}")
    with pytest.raises(TemplateError):
        t.render([{"role": "user", "content": "x"}])


def test_bad_template_and_messages(tok):
    with pytest.raises(TemplateError):
        ChatTemplate("{% for %}")
    for bad in ([], None, "hello", [{"content": "no role"}], [3]):
        with pytest.raises(ValueError, match="messages"):
            tok.apply_chat_template(bad)


def test_openai_content_parts(tok):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                          {"type": "text", "text": "!"}]}]
    assert tok.apply_chat_template(msgs) == ("<role>HUMAN</role>Hi!<|role_end|>"
                                             "<role>ASSISTANT</role>")


def test_no_template():
    t = Tokenizer(rg._tokenizer_cached(V)[0])
    with pytest.raises(ValueError, match="chat template"):
        t.apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_tokenizer_json():
    with pytest.raises(ValueError, match="tokenizer"):
        Tokenizer.from_metadata(lambda key: None)


# ---- a GGUF without tokenizer.json: the byte-level BPE rebuilt from the GGML lists -----------

def _corpus():
    """Varied text: the training text line by line, unicode, digits, whitespace runs, code,
    special tokens inside text, and seeded random mixtures of all of these."""
    import random

    lines = hc._TRAIN_TEXT.splitlines() + TEXTS + [
        "   leading spaces", "trailing spaces   ", "\n\n\nnewlines\r\n\r\nCRLF\r", "\t\t tabs\t",
        "1234567890 3.14159 -42 1e10 0x1F 1,000,000 2024-12-01", "x=1;y=22;z=333",
        "I'm sure it's what you'd've done, they'll say. DON'T SHOUT'S",
        "\u00e9t\u00e9 \u00c9T\u00c9 stra\u00dfe \u0130stanbul \u0131 \u03a9\u03c9 "
        "\u05e9\u05dc\u05d5\u05dd "
        "\u0645\u0631\u062d\u0628\u0627 \u0928\u092e\u0938\u094d\u0924\u0947 \ud55c\uad6d\uc5b4",
        "emoji \U0001F600\U0001F44D\U0001F3FD family \U0001F468\u200d\U0001F469\u200d\U0001F467",
        "combining e\u0301 a\u0308 zero\u200bwidth nbsp\u00a0here",
        "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }\n",
        "    if x:\n        return {'k': [1, 2, 3]}  # comment\n",
        "<|mask|><|mask|>text<|endoftext|>more<think>inner</think><|role_end|>",
        "<role>SYSTEM</role>\ndetailed thinking off<|role_end|><role>HUMAN</role>",
        "!!!??? ... --- *** ### $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}}",
    ]
    pool = [c for line in lines for c in line] + [" ", "  ", "\n", "\t", "'s", "0", "9"]
    rng = random.Random(0)
    for n in range(400):
        lines.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 80))))
    return lines


def _ggml_lists(meta):
    return (meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"],
            meta["tokenizer.ggml.merges"], meta["tokenizer.ggml.pre"])


@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_ggml_lists_tokenize_as_the_original(gguf_path, which):
    from tide_cpp.tokenizer import read_gguf_metadata, tokenizer_json_from_ggml

    path = gguf_path if which == "tiny" else os.path.join(REPO, "models", "tide-demo.gguf")
    meta = read_gguf_metadata(path, arrays=("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    orig = HFTokenizer.from_str(meta["tokenizer.huggingface.json"])
    rebuilt = HFTokenizer.from_str(tokenizer_json_from_ggml(*_ggml_lists(meta)))
    corpus = _corpus()
    n_tokens = 0
    for text in corpus:
        a = orig.encode(text, add_special_tokens=False).ids
        b = rebuilt.encode(text, add_special_tokens=False).ids
        assert a == b, text
        assert rebuilt.decode(b, skip_special_tokens=False) == orig.decode(
            a, skip_special_tokens=False)
        n_tokens += len(a)
    assert len(corpus) > 400 and n_tokens > 10000
    assert rebuilt.get_vocab_size(with_added_tokens=True) == orig.get_vocab_size(
        with_added_tokens=True)


def test_bailingmoe2_split_is_the_checkpoints(tok_json):
    # the split regex used for tokenizer.ggml.pre = bailingmoe2 is the pre-tokenizer of the
    # tokenizer.json the LLaDA2 checkpoints ship (here: the test checkpoint's)
    import json

    from tide_cpp.tokenizer import PRE_TOKENIZER_SPLITS

    pre = json.loads(tok_json)["pre_tokenizer"]["pretokenizers"]
    assert pre[0]["type"] == "Split"
    assert pre[0]["pattern"]["Regex"] == PRE_TOKENIZER_SPLITS["bailingmoe2"]
    assert pre[1]["type"] == "ByteLevel" and pre[1]["use_regex"] is False


def test_from_metadata_without_tokenizer_json(gguf_path, tok):
    from tide_cpp.tokenizer import read_gguf_metadata

    meta = read_gguf_metadata(gguf_path, arrays=("tokenizer.ggml.tokens",
                                                 "tokenizer.ggml.merges"))
    del meta["tokenizer.huggingface.json"]
    g = Tokenizer.from_metadata(meta.get)
    for text in _corpus()[:60]:
        assert g.encode(text) == tok.encode(text)
    assert g.special_ids == tok.special_ids
    assert g.eog_token_ids == {IDS["<|endoftext|>"], IDS["<|role_end|>"]}


def test_from_model_without_tokenizer_json(gguf_path, tok):
    # a model whose GGUF has no tokenizer.json (llama.cpp's layout): the lists are read from
    # its file
    class Stub:
        path = gguf_path
        bos_token_id, eos_token_id = IDS["<|startoftext|>"], IDS["<|endoftext|>"]
        pad_token_id, mask_token_id = IDS["<|endoftext|>"], IDS["<|mask|>"]

        def metadata_string(self, key):
            return hc.CHAT_TEMPLATE if key == "tokenizer.chat_template" else None

    g = Tokenizer.from_model(Stub())
    for text in TEXTS:
        assert g.encode(text) == tok.encode(text)
    assert g.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True) == \
        tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)


@pytest.mark.parametrize("key,value,match", [
    ("tokenizer.ggml.pre", "qwen2", "tokenizer.ggml.pre"),
    ("tokenizer.ggml.model", "llama", "tokenizer.ggml.model"),
    ("tokenizer.ggml.merges", ["a b c"], "tokenizer.ggml.merges"),
    ("tokenizer.ggml.token_type", [1, 1], "tokenizer.ggml.token_type"),
])
def test_ggml_lists_refused(gguf_path, key, value, match):
    from tide_cpp.tokenizer import read_gguf_metadata

    meta = read_gguf_metadata(gguf_path, arrays=("tokenizer.ggml.tokens",
                                                 "tokenizer.ggml.merges"))
    del meta["tokenizer.huggingface.json"]
    meta[key] = value
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_metadata(meta.get)


def test_read_gguf_metadata_agrees_with_gguf_py(gguf_path):
    from gguf import GGUFReader

    from tide_cpp.tokenizer import read_gguf_metadata

    mine = read_gguf_metadata(gguf_path, arrays=("tokenizer.ggml.tokens",))
    theirs = GGUFReader(gguf_path)
    assert "tokenizer.ggml.merges" not in mine            # string arrays only when asked
    for key, f in theirs.fields.items():
        if key.startswith("GGUF.") or key == "tokenizer.ggml.merges":
            continue
        want = f.contents()
        got = mine[key]
        assert got == (pytest.approx(want) if isinstance(want, float) else want), key


def test_read_gguf_metadata_bad_files(tmp_path, gguf_path):
    from tide_cpp.tokenizer import read_gguf_metadata

    p = tmp_path / "x.gguf"
    p.write_bytes(b"NOPE" + bytes(40))
    with pytest.raises(ValueError, match="not a GGUF"):
        read_gguf_metadata(p)
    with open(gguf_path, "rb") as f:
        head = f.read(2000)
    p.write_bytes(head)
    with pytest.raises(ValueError, match="cut short"):
        read_gguf_metadata(p, arrays=("tokenizer.ggml.tokens",))


# ---- end of generation ---------------------------------------------------------------------

def test_end_of_generation_ids(tok_json):
    eos, role_end = IDS["<|endoftext|>"], IDS["<|role_end|>"]
    recorded = Tokenizer(tok_json, eot_token_id=IDS["<|number_end|>"])
    assert recorded.eog_token_ids == {eos, IDS["<|number_end|>"]}
    # a file converted before the EOT key: <|endoftext|> and, present here, <|role_end|>
    assert Tokenizer(tok_json).eog_token_ids == {eos, role_end}


def test_engine_stops_at_role_end_key(gguf_path):
    from tide_cpp.model import Model
    from tide_cpp.tokenizer import end_of_generation_ids

    with Model(gguf_path, device="cpu", n_threads=1) as m:
        assert end_of_generation_ids(m) == {IDS["<|endoftext|>"], IDS["<|role_end|>"]}


def test_bailingmoe2_split_equals_lings_original_spelling():
    # llama.cpp reads tokenizer.ggml.pre = bailingmoe2 with the regex it took from Ling's
    # tokenizer.json, spelled with possessive quantifiers and a single newline; it must split
    # every text exactly as the spelling used here.
    from tokenizers import Regex, pre_tokenizers

    from tide_cpp.tokenizer import PRE_TOKENIZER_SPLITS

    ling = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}"
            r"| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+")
    ours = pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS["bailingmoe2"]), "isolated")
    theirs = pre_tokenizers.Split(Regex(ling), "isolated")
    corpus = _corpus() + ["\n\n  x", "a\r\n\r\n b", "it'S I'LL we'Ve", "  \n \n\t\nz"]
    for text in corpus:
        assert ours.pre_tokenize_str(text) == theirs.pre_tokenize_str(text), text


def _without_tokenizer_json(src, dst):
    """A copy of the GGUF src without tokenizer.huggingface.json (as llama.cpp's files are)."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(src)
    w = GGUFWriter(dst, r.get_field("general.architecture").contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture",
                                              "tokenizer.huggingface.json"):
            continue
        if key == "general.alignment":
            w.add_custom_alignment(f.contents())
        elif f.types[0] == GGUFValueType.ARRAY:
            w.add_key_value(key, f.contents(), GGUFValueType.ARRAY, sub_type=f.types[1])
        else:
            w.add_key_value(key, f.contents(), f.types[0])
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_engine_runs_a_file_without_tokenizer_json(gguf_path, tmp_path, tok):
    from tide_cpp.model import Model

    bare = _without_tokenizer_json(gguf_path, str(tmp_path / "bare.gguf"))
    with Model(bare, device="cpu", n_threads=1) as m, \
            Model(gguf_path, device="cpu", n_threads=1) as full:
        assert m.metadata_string("tokenizer.huggingface.json") is None
        for text in TEXTS:
            assert m.tokenize(text) == tok.encode(text)
        msgs = [{"role": "user", "content": "What is 37 plus 48?"}]
        a = m.create_chat_completion(msgs, max_tokens=16, block_length=8, steps=8)
        b = full.create_chat_completion(msgs, max_tokens=16, block_length=8, steps=8)
        assert a["choices"][0]["message"] == b["choices"][0]["message"]
        assert m.tokenizer.eog_token_ids == full.tokenizer.eog_token_ids


def test_ggml_lists_of_a_larger_vocabulary():
    # a 4096-entry byte-level BPE (about 3800 merges) trained on this repository's own source
    # and documents, rebuilt from the lists the converter writes: the same ids on its training
    # files and the varied corpus
    import glob

    from tide_cpp.convert.tokenizer_meta import tokenizer_meta
    from tide_cpp.tokenizer import tokenizer_json_from_ggml

    files = sorted(f for pat in ("tide_cpp/*.py", "convert/*.py", "docs/*.md", "README.md")
                   for f in glob.glob(os.path.join(REPO, pat)))
    texts = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            texts.append(fh.read())
    tj, tc = hc.train_bpe_tokenizer(texts, 4096)
    meta = tokenizer_meta(tj, tc, 4096, hc.make_config(vocab_size=4096))
    assert len(meta["tokenizer.ggml.merges"]) > 2000
    orig = HFTokenizer.from_str(tj)
    rebuilt = HFTokenizer.from_str(tokenizer_json_from_ggml(*_ggml_lists(meta)))
    for text in _corpus() + texts:
        assert (orig.encode(text, add_special_tokens=False).ids
                == rebuilt.encode(text, add_special_tokens=False).ids), text[:80]

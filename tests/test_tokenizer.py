"""Tokenizer and chat template (tide_cpp/tokenizer.py): from the tokenizer.json the converter
embeds, special ids from the metadata, the template rendered as transformers renders it."""

import pytest
from tokenizers import Tokenizer as HFTokenizer

import hf_checkpoint as hc
import reference_generate as rg
from tide_cpp.tokenizer import ChatTemplate, TemplateError, Tokenizer

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

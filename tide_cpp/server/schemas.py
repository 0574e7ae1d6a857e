"""Request bodies of /v1/chat/completions and /v1/completions, checked field by field.

Field names and meanings are OpenAI's, so the official client and the tools built on it work
unchanged. Every field a client sets is checked, and a bad one is a 400 naming it (`APIError`
from errors.py); fields this server does not know are ignored, as llama-server and vLLM do, because
clients send their own extras. Features the engine does not have (n > 1, logprobs, tools, JSON
mode) are refused by name rather than silently ignored.

The diffusion settings travel as extra body fields (block_length, steps, threshold, top_k,
minimal_topk, eos_early_stop), with the server's command-line values as defaults;
`denoise_events: true` asks the stream for the canvas of every step (the web page uses it).
"""

import json
import math
from dataclasses import dataclass, field

from .errors import APIError, invalid

ROLES = ("system", "developer", "user", "assistant")
MAX_STOPS = 4


@dataclass
class CompletionRequest:
    """What a completion request asks for, checked; `generation` holds the keyword arguments of
    tide_cpp.generation.stream except the prompt."""

    kind: str                       # "chat" or "text"
    messages: list = None           # chat: [{"role", "content": str}]
    prompt: object = None           # text: a str or a list of token ids
    stream: bool = False
    include_usage: bool = False
    stops: list = field(default_factory=list)
    generation: dict = field(default_factory=dict)
    denoise_events: bool = False
    model: str = None


def _not_json(name):
    raise ValueError(f"{name} is not a JSON value")


def parse_json(raw):
    """The body as a JSON object, or a 400 saying what is wrong with it."""
    try:
        body = json.loads(raw, parse_constant=_not_json)
    except UnicodeDecodeError:
        raise APIError(400, "request body is not UTF-8 text", code="invalid_json") from None
    except ValueError as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return body


# ---- field checks ----------------------------------------------------------------------------

def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(body, name, low=None, high=None):
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise invalid(name, f"expected an integer, got {json.dumps(v)}")
    if low is not None and v < low:
        raise invalid(name, f"must be >= {low}, got {v}")
    if high is not None and v > high:
        raise invalid(name, f"must be <= {high}, got {v}")
    return v


def _num(body, name, low, high, low_open=False):
    v = body.get(name)
    if v is None:
        return None
    if not _is_num(v):
        raise invalid(name, f"expected a number, got {json.dumps(v)}")
    if v > high or v < low or (low_open and v == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise invalid(name, f"must be in {bound}, got {v}")
    return float(v)


def _bool(body, name):
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise invalid(name, f"expected true or false, got {json.dumps(v)}")
    return v


def _str(body, name):
    v = body.get(name)
    if v is not None and not isinstance(v, str):
        raise invalid(name, f"expected a string, got {json.dumps(v)}")
    return v


def _refuse(body, name, allowed, why):
    """Fields for features the engine lacks: only their 'off' values are accepted."""
    if name in body and body[name] not in allowed:
        raise invalid(name, why)


def _content(v, where):
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, list):  # OpenAI's content parts: text only
        out = []
        for j, part in enumerate(v):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise invalid(f"{where}[{j}]", "only parts of type 'text' are supported")
            if not isinstance(part.get("text"), str):
                raise invalid(f"{where}[{j}].text", "expected a string")
            out.append(part["text"])
        return "".join(out)
    raise invalid(where, "expected a string or a list of text parts")


def _messages(body):
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise invalid("messages", "expected a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(where, "expected an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise invalid(f"{where}.role", f"expected one of {', '.join(ROLES)}, got "
                                           f"{json.dumps(role)}")
        if m.get("tool_calls"):
            raise invalid(f"{where}.tool_calls", "tool calls are not supported")
        # developer is OpenAI's newer name for system; the chat templates know only system
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content(m.get("content"), f"{where}.content")})
    return out


def _prompt(body):
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]   # a batch of one
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(_is_int(t) for t in p):
        return p
    raise invalid("prompt", "expected a string, a list of one string, or a non-empty list of "
                            "token ids (one prompt per request)")


def _stops(body):
    s = body.get("stop")
    if s is None:
        return []
    if isinstance(s, str):
        s = [s]
    if not isinstance(s, list) or not all(isinstance(x, str) for x in s):
        raise invalid("stop", "expected a string or a list of strings")
    if len(s) > MAX_STOPS:
        raise invalid("stop", f"at most {MAX_STOPS} stop strings, got {len(s)}")
    return [x for x in s if x]


def _generation(body, defaults):
    g = dict(defaults)
    mt = _int(body, "max_completion_tokens", low=1)
    mt = _int(body, "max_tokens", low=1) if mt is None else mt
    if mt is not None:
        g["max_tokens"] = mt
    for name, value in (("temperature", _num(body, "temperature", 0.0, 2.0)),
                        ("top_p", _num(body, "top_p", 0.0, 1.0, low_open=True)),
                        ("top_k", _int(body, "top_k", low=0, high=2**31 - 1)),
                        ("block_length", _int(body, "block_length", low=1, high=4096)),
                        ("steps", _int(body, "steps", low=1, high=4096)),
                        ("threshold", _num(body, "threshold", 0.0, 1.0, low_open=True)),
                        ("minimal_topk", _int(body, "minimal_topk", low=1, high=2**31 - 1)),
                        ("eos_early_stop", _bool(body, "eos_early_stop"))):
        if value is not None:
            g[name] = value
    seed = _int(body, "seed")
    if seed is not None:
        g["seed"] = seed % (1 << 64)   # OpenAI's seeds may be negative; the engine's are 64-bit
    if g["steps"] > g["block_length"]:
        if body.get("steps") is not None:
            raise invalid("steps", f"{g['steps']} exceeds block_length {g['block_length']}: a "
                                   "step commits at least one token")
        g["steps"] = g["block_length"]   # the server's default steps, shortened to the block
    return g


def parse_completion(body, kind, defaults):
    """A checked CompletionRequest from a decoded body. kind: "chat" or "text"; defaults: the
    server's generation settings (keyword arguments of tide_cpp.generation.generate)."""
    _str(body, "model")   # any name is served by the one model; "user" is not read at all
    _refuse(body, "n", (None, 1), "only n = 1 is supported")
    _refuse(body, "best_of", (None, 1), "only best_of = 1 is supported")
    _refuse(body, "logprobs", (None, False, 0), "logprobs are not supported")
    _refuse(body, "top_logprobs", (None, 0), "logprobs are not supported")
    _refuse(body, "echo", (None, False), "echo is not supported")
    _refuse(body, "suffix", (None, ""), "suffix (insertion) is not supported")
    _refuse(body, "logit_bias", (None, {}), "logit_bias is not supported")
    _refuse(body, "tools", (None, []), "tools are not supported")
    _refuse(body, "functions", (None, []), "functions are not supported")
    rf = body.get("response_format")
    if rf is not None and rf != {"type": "text"}:
        raise invalid("response_format", "only {\"type\": \"text\"} is supported")
    for name in ("presence_penalty", "frequency_penalty"):
        _num(body, name, -2.0, 2.0)   # accepted (clients send 0) and, like llama.cpp's, unused
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise invalid("stream_options", "expected an object")
    include_usage = bool(_bool(so or {}, "include_usage"))
    req = CompletionRequest(
        kind=kind,
        stream=bool(_bool(body, "stream")),
        include_usage=include_usage,
        stops=_stops(body),
        generation=_generation(body, defaults),
        denoise_events=bool(_bool(body, "denoise_events")),
        model=body.get("model"),
    )
    if kind == "chat":
        req.messages = _messages(body)
    else:
        req.prompt = _prompt(body)
    return req

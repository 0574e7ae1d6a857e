"""Server-sent events as OpenAI streams them: `data: {json}` per chunk, `data: [DONE]` last.

Named events (`event: NAME`) carry what OpenAI's format has no place for (the denoising canvas,
the answer's figures); clients that only read `data:` lines without a name, as the `openai`
package and EventSource's onmessage do, never see them."""

import json

DONE = b"data: [DONE]\n\n"


def event(data, name=None):
    """One event, as bytes. data: a JSON-serializable object."""
    head = f"event: {name}\n" if name else ""
    return (head + "data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":"))
            + "\n\n").encode("utf-8")


HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",   # a reverse proxy in front must not hold the stream back
}

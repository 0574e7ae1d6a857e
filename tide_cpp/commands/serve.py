"""tide-cli serve -m MODEL: an OpenAI-compatible HTTP server with a live web page.

The model, residency and generation options are generate's (_options.py); a request's fields
override the generation ones. Needs the server extra: pip install 'tide_cpp[server]'."""

import os
import signal
import sys
import threading

from . import _options
from ..server.errors import MAX_BODY_BYTES   # no FastAPI import: the extra may be absent
from ..units import parse_bytes


def add_parser(subparsers):
    p = subparsers.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API, with a web page",
        description="Serve one model over OpenAI's API (/v1/chat/completions, /v1/completions, "
                    "/v1/models, /health) and a web page at / that draws the denoising live. "
                    "Requests queue and run one at a time; request fields override the "
                    "generation options below.",
        epilog="example: tide-cli serve -m models/tide-demo.gguf --device sim --policy tide "
               "--gpu-experts 4, then open http://127.0.0.1:8080/")
    _options.add_model_options(p)
    _options.add_residency_options(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 "
                        "for every interface)")
    s.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    s.add_argument("--api-key", default=os.environ.get("TIDE_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/ (default: $TIDE_API_KEY; "
                        "none: open)")
    s.add_argument("--model-alias", default=None, metavar="NAME",
                   help="the model's name in the API (default: the file name without .gguf)")
    s.add_argument("--max-queue", type=int, default=16, metavar="N",
                   help="requests that may wait behind the running one; more get 503 "
                        "(default: 16)")
    s.add_argument("--max-request-bytes", default=str(MAX_BODY_BYTES), metavar="SIZE",
                   help="refuse request bodies larger than this with 413 (default: 32MiB; "
                        "1MiB, 500kB, ... also accepted)")
    s.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000) call the API "
                        "from a browser; repeat for several, '*' for any (default: none, only "
                        "this server's own page; llama-server allows any)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, let running requests finish for up to S seconds, then "
                        "cancel them (default: 30)")
    _options.add_generation_options(p)
    return p


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, whose stop (SIGTERM, SIGINT) also stops the engine: no new jobs,
        queued and running ones finish within the timeout, then are cancelled at their next
        step, so every open stream ends with its own last event instead of being cut."""

        def __init__(self, app, host, port, timeout):
            self.engine = app.state.engine
            self.timeout = timeout
            # uvicorn's own deadline is a backstop behind the engine's: streams end first
            super().__init__(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                            timeout_graceful_shutdown=timeout + 10))

        def handle_exit(self, sig, frame):
            if not self.should_exit:
                self.engine.stop_accepting()
                threading.Thread(target=self.engine.close, args=(self.timeout,),
                                 daemon=True).start()
            super().handle_exit(sig, frame)

    return Server


def run(args):
    try:
        from tide_cpp.server.app import create_app
        _Server = _server_class()
    except ImportError as e:
        return _options.error(f"{e.name or e}: the server needs its extra: "
                              "pip install 'tide_cpp[server]'")
    if not 0 <= args.port <= 65535:
        return _options.error(f"--port: {args.port} is not a port number")
    if args.max_queue < 0:
        return _options.error(f"--max-queue: {args.max_queue} is negative")
    try:
        max_body = parse_bytes(args.max_request_bytes)
    except ValueError as e:
        return _options.error(f"--max-request-bytes: {e}")
    if max_body < 1:
        return _options.error(f"--max-request-bytes: {args.max_request_bytes} is not positive")
    for origin in args.cors_origin:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            return _options.error(f"--cors-origin: {origin!r} is not an origin "
                                  "(scheme://host[:port], e.g. http://localhost:3000, or '*')")
    try:
        model = _options.load_model(args)
    except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: TideError (file, GPU)
        return _options.error(e)
    alias = args.model_alias or os.path.splitext(os.path.basename(args.model))[0]
    with model:
        try:
            app = create_app(model, alias, _options.generation_kwargs(args),
                             api_key=args.api_key or None, max_queue=args.max_queue,
                             max_body_bytes=max_body, cors_origins=args.cors_origin)
        except ValueError as e:
            return _options.error(e)
        print(f"tide-cli serve: {alias} ({model.policy} on {model.device}) at "
              f"http://{args.host}:{args.port}/  (OpenAI API under /v1)", file=sys.stderr,
              flush=True)
        server = _Server(app, args.host, args.port, args.shutdown_timeout)
        # uvicorn re-raises the signal it caught once it has shut down, under the handler in
        # place before it started: with this one, a stop by SIGTERM/SIGINT is a clean exit (0)
        # rather than death by the signal.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        server.run()
        if not server.started:
            return _options.error(f"could not listen on {args.host}:{args.port}")
    return 0

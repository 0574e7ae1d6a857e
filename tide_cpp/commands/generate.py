"""tide-cli generate -m MODEL -p PROMPT: one answer, streamed block by block, then statistics.

--chat wraps the prompt in the model's chat template; --visual redraws the canvas live as masks
turn into tokens; --trace FILE.npz saves the routing of every forward for tide-cli plan."""

import shutil
import sys

from . import _options

MASK_CHAR = "\u2591"  # light shade: a position still masked
DIM, BOLD, RESET = "\x1b[2m", "\x1b[1m", "\x1b[0m"
EDITED = "\x1b[1;4m"  # bold underlined: a token that replaced another (LLaDA2.1 editing)


def add_parser(subparsers):
    p = subparsers.add_parser(
        "generate", help="generate one answer to a prompt, streamed block by block",
        description="Generate an answer with block diffusion, stream it block by block and "
                    "print the statistics (tokens/s, tokens per forward, expert traffic).",
        epilog="example: tide-cli generate -m models/tide-demo.gguf --chat -p 'What is 37 plus "
               "48?' --policy tide --gpu-experts 4")
    _options.add_prompt_cache_option(_options.add_model_options(p))
    _options.add_residency_options(p)
    g = _options.add_prompt_options(p, many=False)
    _options.add_system_option(g, "with --chat: a system message before the prompt")
    o = p.add_argument_group("output")
    o.add_argument("--visual", action="store_true",
                   help="redraw the canvas live: masked positions dim, new tokens bold, "
                        "edited tokens bold and underlined")
    _options.add_trace_option(o, output=True)
    o.add_argument("--no-stats", dest="stats", action="store_false",
                   help="do not print the statistics at the end")
    _options.add_generation_options(p)
    return p


def _prompt_text(args):
    if args.prompt is None or args.prompt == "-":
        if sys.stdin.isatty() and args.prompt is None:
            raise ValueError("prompt: give -p PROMPT (or pipe it on standard input)")
        return sys.stdin.read()
    return args.prompt


class CanvasView:
    """Draws the generated part of the canvas and redraws it in place after every step."""

    def __init__(self, tokenizer, out):
        self.tok = tokenizer
        self.out = out
        self.rows = 0

    def _render(self, info):
        P = info.prompt_length
        end = min(len(info.canvas), P + info.max_tokens)
        ids = info.canvas[P:end]
        style = {int(c) - P: BOLD for c in info.committed}
        style.update({int(c) - P: EDITED for c in getattr(info, "edited", ())})
        eog = getattr(info, "eog_token_ids", None) or {info.eos_token_id}
        plain, styled = [], []
        run = []  # consecutive decoded tokens of one style, decoded together (multi-byte chars)

        def flush():
            if run:
                t = self.tok.decode([ids[i] for i in run], skip_special=True)
                plain.append(t)
                s = style.get(run[0])
                styled.append(s + t + RESET if s else t)
                run.clear()

        for i, t in enumerate(ids):
            if t == info.mask_token_id:
                flush()
                plain.append(MASK_CHAR)
                styled.append(DIM + MASK_CHAR + RESET)
            elif t in eog:
                flush()
                break   # the answer ends here; what follows is discarded
            else:
                if run and style.get(i) != style.get(run[-1]):
                    flush()
                run.append(i)
        flush()
        return "".join(plain), "".join(styled)

    def _rows(self, text):
        width = max(1, shutil.get_terminal_size((80, 24)).columns)
        return sum(max(1, -(-len(line) // width)) for line in text.split("\n"))

    def draw(self, plain, styled):
        w = self.out.write
        if self.rows:
            if self.rows > 1:
                w(f"\x1b[{self.rows - 1}A")
            w("\r\x1b[J")
        w(styled)
        self.out.flush()
        self.rows = self._rows(plain)

    def on_step(self, info):
        self.draw(*self._render(info))


def run(args):
    from tide_cpp import generation
    from tide_cpp.tokenizer import tokenizer_of

    try:
        text = _prompt_text(args)
        model = _options.load_model(args, trace=bool(args.trace))
    except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: TideError (file, GPU)
        return _options.error(e)
    out = sys.stdout
    with model:
        try:
            tok = tokenizer_of(model)
            if args.chat:
                messages = ([{"role": "system", "content": args.system}] if args.system else [])
                messages.append({"role": "user", "content": text})
                prompt = tok.apply_chat_template(messages, tokenize=True)
            else:
                prompt = tok.encode(text)
            kw = _options.generation_kwargs(args)
            visual = args.visual and out.isatty()
            view = CanvasView(tok, out) if visual else None
            _options.load_prompt_cache(model, args)
            st = generation.stream(model, prompt, on_step=view.on_step if view else None, **kw)
        except ValueError as e:
            return _options.error(e)
        try:
            for delta in st:
                if not visual:
                    out.write(delta)
                    out.flush()
        except KeyboardInterrupt:
            st.close()
            out.write("\n")
            print("interrupted", file=sys.stderr)
            return 130
        g = st.generation
        _options.save_prompt_cache(model, args)
        if visual:  # the final answer, in plain text
            view.draw(g.text, g.text)
        out.write("\n")
        out.flush()
        if args.trace:
            model.save_trace(args.trace)
        if args.stats:
            for line in _options.stats_lines(g.stats, model.stats()):
                print(line, file=sys.stderr)
            print(_options.context_line(model), file=sys.stderr)
            if args.trace:
                print(f"trace: {args.trace}", file=sys.stderr)
    return 0

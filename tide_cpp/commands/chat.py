"""tide-cli chat -m MODEL [-s SYSTEM]: a multi-turn chat in the terminal, as llama.cpp's and
ollama's: the conversation goes through the model's chat template, replies stream block by
block, /reset forgets the conversation, /exit or Ctrl-D leaves, Ctrl-C stops a reply."""

import signal
import sys
import threading

from . import _options

HELP = """commands:
  /reset   forget the conversation (the system message stays)
  /set     show the generation settings; /set NAME VALUE changes one (/set max-tokens 64)
  /exit    leave (also /quit, /bye, Ctrl-D)
  /help    this text
Ctrl-C stops the reply in progress."""


def add_parser(subparsers):
    p = subparsers.add_parser(
        "chat", help="chat with a model in the terminal (multi-turn, streamed)",
        description="Chat with a model: multi-turn through its chat template, replies streamed "
                    "block by block. /reset forgets the conversation, /exit or Ctrl-D leaves, "
                    "Ctrl-C stops the reply in progress.")
    _options.add_prompt_cache_option(_options.add_model_options(p))
    _options.add_residency_options(p)
    g = p.add_argument_group("chat")
    _options.add_system_option(g, "system message that opens the conversation")
    g.add_argument("--stats", action="store_true",
                   help="print the statistics of every reply")
    _options.add_generation_options(p, max_tokens=512)
    return p


class Chat:
    """The conversation: history of messages and one reply at a time."""

    def __init__(self, model, system=None, out=sys.stdout, err=sys.stderr, stats=False,
                 after_reply=None, **kw):
        from tide_cpp.tokenizer import tokenizer_of

        self.model = model
        self.tok = tokenizer_of(model)
        self.system = system
        self.kw = kw
        self.out, self.err = out, err
        self.show_stats = stats
        self.after_reply = after_reply  # called after every reply (the prompt cache)
        self.reset()

    def reset(self):
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text):
        """Stream the answer to a user message; keep the history consistent whatever happens:
        an interrupted reply is kept as far as it was shown."""
        from tide_cpp import generation

        self.history.append({"role": "user", "content": text})
        try:
            prompt = self.tok.apply_chat_template(self.history, tokenize=True)
            st = generation.stream(self.model, prompt, **self.kw)
        except ValueError as e:  # the conversation no longer fits, a bad option
            self.history.pop()
            print(f"error: {e}" + (" (/reset starts over)" if len(self.history) > 1 else ""),
                  file=self.err)
            return None
        except KeyboardInterrupt:  # before the first step: as if never asked
            self.history.pop()
            print("\n[reply stopped]", file=self.err)
            return None
        shown = []
        try:
            for delta in st:
                shown.append(delta)
                self.out.write(delta)
                self.out.flush()
        except KeyboardInterrupt:
            st.close()
            self.out.write("\n")
            self.out.flush()
            print("[reply stopped]", file=self.err)
            self.history.append({"role": "assistant", "content": "".join(shown)})
            return None
        self.out.write("\n")
        self.out.flush()
        g = st.generation
        self.history.append({"role": "assistant", "content": g.text})
        if self.after_reply:
            self.after_reply()
        if self.show_stats:
            for line in _options.stats_lines(g.stats):
                print(line, file=self.err)
        return g


# /set NAME VALUE: the generation knobs, by their option names
_SETTABLE = {"max_tokens": int, "block_length": int, "steps": int, "threshold": float,
             "temperature": float, "top_k": int, "top_p": float, "seed": int,
             "minimal_topk": int, "eos_early_stop": lambda v: v.lower() in ("1", "true", "on"),
             "editing_threshold": float, "max_post_steps": int}


def _set(chat, model, words, err):
    from tide_cpp import generation

    if not words:
        for k in _SETTABLE:
            print(f"  {k.replace('_', '-')} = {chat.kw.get(k)}", file=err)
        return
    name = words[0].lstrip("-").replace("-", "_")
    if name not in _SETTABLE or len(words) != 2:
        print(f"usage: /set NAME VALUE with NAME one of "
              f"{', '.join(k.replace('_', '-') for k in _SETTABLE)}", file=err)
        return
    value = None if words[1].lower() == "none" else words[1]
    try:
        value = None if value is None else _SETTABLE[name](value)
        kw = {**chat.kw, name: value}
        generation.check_params(model, [], **kw)
    except ValueError as e:
        print(f"error: {e}", file=err)
        return
    chat.kw = kw
    print(f"{name.replace('_', '-')} = {value}", file=err)


def _read_line(prompt):
    try:
        return input(prompt)
    except KeyboardInterrupt:  # at the prompt: drop the line, ask again
        print("^C  (Ctrl-D or /exit leaves)")
        return ""


def run(args):
    # Ctrl-C ends the turn (KeyboardInterrupt), whatever the parent did with SIGINT: a shell's
    # background job or nohup starts us with it ignored, and Python then keeps it ignored.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    try:
        model = _options.load_model(args)
    except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: TideError (file, GPU)
        return _options.error(e)
    kw = _options.generation_kwargs(args)
    with model:
        try:
            _options.load_prompt_cache(model, args)
            chat = Chat(model, system=args.system, stats=args.stats,
                        after_reply=lambda: _options.save_prompt_cache(model, args), **kw)
            from tide_cpp import generation
            generation.check_params(model, [], **kw)  # bad options fail now, not at the 1st turn
        except ValueError as e:
            return _options.error(e)
        print(f"tide.cpp chat: {args.model} ({getattr(model, 'device', '?')}, "
              f"{_options.context_line(model)}). /help for commands, Ctrl-D to leave.",
              file=sys.stderr)
        while True:
            try:
                line = _read_line(">>> ")
            except EOFError:  # Ctrl-D
                print()
                break
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                cmd = text.split()[0].lower()
                if cmd in ("/exit", "/quit", "/bye"):
                    break
                if cmd in ("/reset", "/clear"):
                    chat.reset()
                    print("conversation cleared", file=sys.stderr)
                elif cmd == "/set":
                    _set(chat, model, text.split()[1:], sys.stderr)
                elif cmd in ("/help", "/?"):
                    print(HELP, file=sys.stderr)
                else:
                    print(f"unknown command {cmd}; /help lists them", file=sys.stderr)
                continue
            chat.reply(line)
    return 0

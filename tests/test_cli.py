"""tide-cli as a whole: every subcommand answers --help, the options the subcommands share are one
definition (same help, same choices), and the tide_cpp modules import one way (no circle)."""

import ast
import os

import pytest

from tide_cpp.cli import COMMANDS, build_parser

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
NAMES = [c.replace("_", "-") for c in COMMANDS]


def subparsers():
    parser = build_parser()
    (action,) = [a for a in parser._actions if a.dest == "command"]
    return action.choices


@pytest.mark.parametrize("name", NAMES)
def test_help_exits_0(name, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([name, "--help"])
    assert e.value.code == 0
    assert f"usage: tide-cli {name}" in capsys.readouterr().out


def test_every_command_is_there():
    assert sorted(subparsers()) == sorted(NAMES)


def test_shared_options_are_one_definition():
    """An option in several subcommands means the same everywhere: the same help text (up to its
    default) and the same choices; --device auto is cuda-else-cpu in all of them."""
    seen = {}
    for name, p in subparsers().items():
        if name == "convert":
            continue  # the converter's own command line (also python -m tide_cpp.convert)
        for a in p._actions:
            for flag in a.option_strings:
                if flag in ("-h", "--help"):
                    continue
                help_ = (a.help or "").split(" (default:")[0]
                seen.setdefault(flag, {})[name] = (help_, tuple(a.choices or ()))
    for flag in ("--model", "--device", "--threads", "--gpu-experts", "--refresh-interval",
                 "--prefetch-experts", "--max-tokens", "--block-length", "--steps",
                 "--threshold", "--prompt", "--repeat", "--taus", "--hw-profile",
                 "--device-memory", "--popularity", "--chat"):
        assert len(seen[flag]) >= 2, (flag, seen[flag])  # really shared
        if flag in ("--model", "--prompt", "--repeat", "--taus", "--hw-profile", "--chat"):
            continue  # the same definition, its help says what it is for in this subcommand
        assert len(set(seen[flag].values())) == 1, (flag, seen[flag])
    assert "auto (cuda when a GPU is usable, else cpu)" in seen["--device"]["bench"][0]


def _imports(path, package, nested=False):
    """Modules of `package` that the module at path imports when it is imported (top level; with
    nested, also the imports inside functions, which run later)."""
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    mod = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
    pkg = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
    out = set()
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree) if nested else tree.body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:  # `from . import _lib` imports _lib, `from .model import X` .model
                sub = f"{base}.{a.name}"
                out.add(sub if _is_module(sub) else base)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return mod, {n for n in out if n.split(".")[0] == package}


def _is_module(name):
    path = os.path.join(ROOT, *name.split("."))
    return os.path.exists(path + ".py") or os.path.exists(os.path.join(path, "__init__.py"))


def import_graph(package="tide_cpp", nested=False):
    graph = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
        for f in files:
            if f.endswith(".py"):
                mod, deps = _imports(os.path.join(dirpath, f), package, nested)
                graph[mod] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def find_cycle(graph):
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("nested", [False, True])
def test_no_import_circle(nested):
    """Dependencies go one way, even through the imports deferred into functions."""
    graph = import_graph(nested=nested)
    assert "tide_cpp.model" in graph["tide_cpp.commands.plan"] or nested is False
    assert "tide_cpp.convert.hf_to_gguf" in graph
    assert find_cycle(graph) is None


def test_device_auto_is_cuda_else_cpu_in_bench(tiny_gguf, capsys):
    """bench's --device auto is Model's: cuda when usable, else cpu (with a word on what cpu means
    for a comparison of policies)."""
    from tide_cpp import _lib
    from tide_cpp.cli import main
    from tide_cpp.model import resolve_device
    path, _, _ = tiny_gguf("base", "f32")
    want = "cuda" if _lib.cuda_available()[0] else "cpu"
    assert resolve_device("auto") == want
    rc = main(["bench", "-m", path, "-t", "1", "--policies", "cpu,tide", "--gpu-experts", "2",
               "--max-tokens", "4", "--block-length", "4", "--steps", "4", "--warmup", "0",
               "-p", "Hi"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert f"device {want}," in out.out
    assert ("--device sim simulates a device" in out.err) == (want == "cpu")

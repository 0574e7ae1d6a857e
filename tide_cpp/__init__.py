"""tide.cpp: exact, fast inference of LLaDA2.0 MoE diffusion LLMs on one GPU plus its host."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import tide_cpp` must not load the native library (the converter and the CLI's help
    # work without a build).
    if name == "Model":
        from .model import Model
        return Model
    if name == "TideError":
        from ._lib import TideError
        return TideError
    raise AttributeError(name)


__all__ = ["Model", "TideError", "__version__"]

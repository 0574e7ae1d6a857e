"""Hugging Face LLaDA2.0 checkpoint -> GGUF (CONTRACTS.md §1): `convert(src, out, outtype)`.

Modules, one job each: source (find the files, Hub download), safetensors_reader (headers,
slices of rows), hparams (config.json -> llada2.* keys), tensor_map (names, shapes, order),
quant (storage types, encoding), tokenizer_meta (tokenizer.* keys), hf_to_gguf (streaming
writer), cli (command line); llama_layout rewrites a GGUF of ours in llama.cpp's layout
(merged experts; `python -m tide_cpp.convert.llama_layout`)."""


def __getattr__(name):
    # Lazy, so that `tide_cpp.convert.cli` (tide-cli's parser) does not import numpy and gguf.
    if name == "convert":
        from .hf_to_gguf import convert
        return convert
    if name == "ConvertError":
        from .errors import ConvertError
        return ConvertError
    raise AttributeError(name)


__all__ = ["convert", "ConvertError"]

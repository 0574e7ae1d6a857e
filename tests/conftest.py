"""Shared fixtures: tiny checkpoints (tests/hf_checkpoint.py) converted to GGUF, built once per
test run in a temporary folder and only for the (shape, outtype) pairs a test asks for."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(shape="base", seed=0) -> (dir, config, weights): an HF folder of a tiny
    random LLaDA2.0 (hf_checkpoint.SHAPES), written once per test run."""
    import hf_checkpoint as hfc

    root = tmp_path_factory.mktemp("tiny_ckpt")
    cache = {}

    def get(shape="base", seed=0):
        key = (shape, seed)
        if key not in cache:
            d = str(root / f"{shape}-{seed}")
            cfg, w = hfc.make_checkpoint(d, shape=shape, seed=seed)
            cache[key] = (d, cfg, w)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_gguf(tiny_checkpoint, tmp_path_factory):
    """tiny_gguf(shape="base", outtype="f32", seed=0) -> (gguf path, config, weights)."""
    from tide_cpp.convert import convert

    root = tmp_path_factory.mktemp("tiny_gguf")
    cache = {}

    def get(shape="base", outtype="f32", seed=0):
        key = (shape, outtype, seed)
        if key not in cache:
            d, cfg, w = tiny_checkpoint(shape, seed)
            path = str(root / f"{shape}-{seed}-{outtype}.gguf")
            convert(d, path, outtype=outtype, progress=False)
            cache[key] = (path, cfg, w)
        return cache[key]

    return get

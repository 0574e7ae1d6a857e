"""Build hook of the package: `pip install .`, an sdist and a wheel all build the native library
with the Makefile (`make lib`, the one description of the build) and ship it inside tide_cpp/.

The CUDA backend is compiled when nvcc is found, as `make` does; TIDE_CUDA=0 builds the CPU-only
library (much faster), TIDE_CUDA=1 insists on CUDA. Everything else is in pyproject.toml."""

import os
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:   # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

ROOT = os.path.dirname(os.path.abspath(__file__))


def make_lib():
    for tool in ("make", os.environ.get("CC", "cc")):
        if shutil.which(tool) is None:
            sys.exit(f"tide_cpp: building the native library (libtide.so) needs make and a C "
                     f"compiler; {tool!r} was not found")
    # one job per core: nvcc over the CUDA sources is most of an install's time
    cmd = ["make", "-C", ROOT, f"-j{os.cpu_count() or 1}", "lib"]
    cuda = os.environ.get("TIDE_CUDA")
    if cuda is not None:
        if cuda not in ("0", "1"):
            sys.exit(f"tide_cpp: TIDE_CUDA={cuda!r}, expected 0 (CPU only) or 1 (with CUDA)")
        cmd.append(f"CUDA={cuda}")
    print("tide_cpp: " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


class BuildPy(build_py):
    """Builds tide_cpp/libtide.so first, so the package data copied next includes it."""

    def run(self):
        make_lib()
        super().run()


class BinaryDistribution(Distribution):
    """The wheel holds a native library: a platform wheel, not a pure-Python one."""

    def has_ext_modules(self):
        return True


class BdistWheel(bdist_wheel):
    """libtide.so is loaded with ctypes, not as a CPython extension: any Python 3 on the
    platform can use the same wheel."""

    def get_tag(self):
        return "py3", "none", super().get_tag()[2]


setup(cmdclass={"build_py": BuildPy, "bdist_wheel": BdistWheel}, distclass=BinaryDistribution)

"""pip install from a clean copy of the repository, in a fresh virtual environment, gives a working
package: the sdist carries the sources `make lib` needs, the wheel built from it holds the native
library (a platform wheel usable by any Python 3), and tide-cli answers from outside the tree.

CPU-only (TIDE_CUDA=0) to keep it short; needs make, a C compiler and the package index (pip
fetches the build backend and the dependencies, from its cache when it can)."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "models", "tide-demo.gguf")

pytestmark = pytest.mark.slow


def _run(cmd, cwd, env=None, timeout=900):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-3000:]}\n"
                               f"{r.stderr[-3000:]}")
    return r.stdout


def _clean_copy(dest):
    """The repository's files as a fresh clone would have them (tracked and new, not ignored:
    no build/, no libtide.so, no .venv)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    r = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT,
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip("not a git checkout")
    for rel in r.stdout.decode().split("\0"):
        src = os.path.join(ROOT, rel)
        if rel and os.path.isfile(src):
            os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def test_sdist_wheel_install_in_fresh_venv(tmp_path):
    for tool in ("make", "cc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    src = tmp_path / "clone"
    _clean_copy(src)
    assert not (src / "tide_cpp" / "libtide.so").exists()
    env = {**os.environ, "TIDE_CUDA": "0"}
    env.pop("TIDE_LIB", None)

    sdist = _run([sys.executable, "-c", "from setuptools import build_meta as b; "
                  "print(b.build_sdist('dist'))"], cwd=src).split()[-1]
    sdist = src / "dist" / sdist
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "wheel", "-q", "--no-deps", "-w", str(tmp_path / "wheels"), str(sdist)],
         cwd=tmp_path, env=env)
    (wheel,) = (tmp_path / "wheels").iterdir()
    assert wheel.name.endswith("-py3-none-linux_" + os.uname().machine + ".whl"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    for want in ("tide_cpp/libtide.so", "tide_cpp/server/web/index.html",
                 "tide_cpp/server/app.py", "tide_cpp/commands/serve.py"):
        assert want in names, f"{want} missing from {wheel.name}"

    _run([*pip, "install", "-q", str(wheel)], cwd=tmp_path, env=env)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    out = _run([str(venv / "bin" / "tide-cli"), "generate", "-m", DEMO, "--chat", "-p",
                "What is 37 plus 48?", "--device", "cpu", "--no-stats"], cwd=outside)
    assert out.strip() == "37 plus 48 is 85."
    where = _run([str(venv / "bin" / "python"), "-c",
                  "import sys, tide_cpp, tide_cpp._lib as l; l.lib(); "
                  "print(tide_cpp.__file__); print('torch' in sys.modules)"], cwd=outside)
    path, torch_loaded = where.split()
    assert path.startswith(str(venv)) and torch_loaded == "False"

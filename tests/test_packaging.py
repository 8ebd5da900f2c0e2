"""The built wheel installs only ``ranapass``: ``kernels`` and ``cost_model`` live inside it.

Hugging Face's ``kernels`` package owns the top-level name ``kernels`` (transformers imports it),
so a wheel that shipped a top-level ``kernels`` would break other installs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                              ".hypothesis", ".cache", ".whl", "tests", "benchmarks", "examples")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src") / "ranapass"
    shutil.copytree(ROOT, src, ignore=SKIP)  # build from a copy: nothing is written into the checkout
    out = src.parent / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "-w", str(out), "--no-deps",
                    "--no-build-isolation", "-q"], check=True, capture_output=True)
    (path,) = out.glob("ranapass-*.whl")
    return path


def test_wheel_top_level_is_only_ranapass(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"ranapass"}
    for module in ("ranapass/kernels/reference.py", "ranapass/cost_model/flops.py",
                   "ranapass/cost_model/model_flops.py", "ranapass/cli/eval.py"):
        assert module in names
    dist_info = next(t for t in top if t.endswith(".dist-info"))
    top_level = f"{dist_info}/top_level.txt"
    if top_level in names:
        assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["ranapass"]

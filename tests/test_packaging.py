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


def _fresh_python(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT.parent)


def test_kernels_import_neither_sympy_nor_transformers():
    """``import ranapass`` is lazy (PEP 562): the kernels, imported alone, load no heavy dependency."""
    _fresh_python("import sys, ranapass.kernels, ranapass.kernels.configs, ranapass.kernels.reference\n"
                  "heavy = {'sympy', 'transformers'} & set(sys.modules)\n"
                  "assert not heavy, heavy")


def test_kernels_import_nothing_else_of_ranapass():
    _fresh_python("import sys, ranapass.kernels.neuron_adapter, ranapass.kernels.rank_adapter\n"
                  "other = [m for m in sys.modules if m.startswith('ranapass.') and not m.startswith('ranapass.kernels')]\n"
                  "assert not other, other")


def test_public_names_resolve_lazily():
    import ranapass

    assert set(ranapass.__all__) <= set(dir(ranapass))
    for name in ranapass.__all__:
        assert getattr(ranapass, name) is not None
    import ranapass.attach  # noqa: F401  (binds the submodule on the package: the name stays the function)

    assert callable(ranapass.attach) and callable(ranapass.diff)
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        ranapass.nothing_here  # noqa: B018


def test_binding_adapters_registers_the_ops():
    """What lowers adapters imports the op module: ``torch.ops.ranapass.*`` exist without ``import ranapass.kernels.ops``."""
    _fresh_python("import torch, ranapass.fx_pass\n"
                  "assert torch.ops.ranapass.rank_adapter.default and torch.ops.ranapass.gated_neuron_adapter.default")

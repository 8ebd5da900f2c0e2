"""Run the kernel tests under Triton's CPU interpreter, in a subprocess.

``TRITON_INTERPRET=1`` must be set before any ``@triton.jit`` kernel is defined, and it changes what
those kernels are for the whole process; so the kernel tests (test_kernels_adapters.py) run here in a
child pytest with the variable set from the start, and the rest of the suite imports the ops normally.
The fast suite runs its fixed cases (every launcher, a few seconds); the full suite also its random
properties (marked ``slow``, minutes).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ranapass.kernels.capabilities import has_cuda, has_triton, triton_interpret

KERNEL_TESTS = Path(__file__).with_name("test_kernels_adapters.py")

pytestmark = [
    pytest.mark.skipif(not has_triton(), reason="triton is not installed"),
    pytest.mark.skipif(has_cuda() or triton_interpret(), reason="the kernel tests run directly in this process"),
]


def _run_interpreted(marker: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "-m", marker, str(KERNEL_TESTS)],
        env=env, capture_output=True, text=True, timeout=1200, cwd=KERNEL_TESTS.parents[2])
    assert proc.returncode == 0, f"kernel tests failed under TRITON_INTERPRET=1:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    last = proc.stdout.splitlines()[-1]
    assert " passed" in last and "skipped" not in last, proc.stdout[-2000:]


def test_fixed_kernel_cases_under_triton_interpreter():
    _run_interpreted("not slow")


@pytest.mark.slow
def test_random_kernel_properties_under_triton_interpreter():
    _run_interpreted("slow")

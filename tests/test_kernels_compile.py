"""The decode kernels compile for the GPU (sm_90), on a machine without one.

Triton's interpreter runs a kernel as Python, so it misses what only the GPU compiler rejects (such a
bug once cost a GPU run) and says nothing about the code the GPU would run. Triton compiles
ahead of time for a named target with its bundled ptxas, so every kernel variant the launchers can
produce is compiled here for an H100/H200, and the one-token weight loads are checked to be 16-byte
vector loads (``LDG.E.EF.128``, evict-first) in the machine code, as the bandwidth needs.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from ranapass.capabilities import has_triton, triton_interpret

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not has_triton() or triton_interpret(), reason="needs triton's compiler (not the interpreter)"),
]

if has_triton() and not triton_interpret():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ranapass.kernels.masked_gemv import (
        PROLOGUE_GATED,
        PROLOGUE_NEURON,
        PROLOGUE_RANK,
        masked_gemv_kernel,
        split_sum_kernel,
    )
    from ranapass.kernels.rank_adapter import router_kernel

TARGET = ("cuda", 90, 32)


def _compile(kernel, pointers: dict[str, str], const: dict, num_warps: int):
    """Compile ``kernel`` for sm_90; integer arguments are declared divisible by 16 (as Triton
    specializes them at run time for Llama-sized shapes), except the token count T."""
    names = kernel.arg_names
    sig = {a: pointers.get(a, "i32") for a in names}
    sig.update({a: "constexpr" for a in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names) if a not in const and a != "T"}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(a),): v for a, v in const.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget(*TARGET), options={"num_warps": num_warps})


def _sass(compiled) -> str | None:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if tool is None:
        return None
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"ranapass_{compiled.metadata.hash}.cubin")
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    try:
        return subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(path)


GEMV_CASES = [  # (prologue, tokens, weight dtype, block_k, block_n, warps)
    (PROLOGUE_RANK, 1, "bf16", 64, 128, 2),
    (PROLOGUE_NEURON, 1, "bf16", 64, 128, 2),
    (PROLOGUE_GATED, 1, "bf16", 64, 128, 2),
    (PROLOGUE_NEURON, 1, "fp16", 64, 128, 2),
    (PROLOGUE_NEURON, 1, "fp32", 64, 128, 2),
    (PROLOGUE_RANK, 8, "bf16", 16, 128, 4),
    (PROLOGUE_GATED, 4, "bf16", 16, 128, 4),
] if has_triton() and not triton_interpret() else []


@pytest.mark.parametrize("prologue, tokens, dtype, block_k, block_n, warps", GEMV_CASES)
def test_masked_gemv_compiles(prologue, tokens, dtype, block_k, block_n, warps):
    a = "*fp32" if prologue == PROLOGUE_RANK else f"*{dtype}"
    compiled = _compile(masked_gemv_kernel,
                        {"a_ptr": a, "b_ptr": a, "thr_ptr": "*fp32", "w_ptr": f"*{dtype}", "out_ptr": "*fp32"},
                        {"IN_SPLITS": 8, "PROLOGUE": prologue, "ACTIVATION": 0, "BLOCK_T": tokens,
                         "BLOCK_K": block_k, "BLOCK_M": block_n, "INTERPRETER": False}, warps)
    sass = _sass(compiled)
    if tokens == 1 and dtype == "bf16" and sass is not None:
        assert "LDG.E.EF.128" in sass, "one-token weight loads are not 16-byte evict-first vector loads"


@pytest.mark.parametrize("tokens, dtype, block_r, block_k, warps", [(1, "bf16", 32, 256, 4), (8, "bf16", 32, 32, 4),
                                                                    (1, "fp32", 32, 256, 4)])
def test_router_compiles(tokens, dtype, block_r, block_k, warps):
    compiled = _compile(router_kernel, {"x_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "zpart_ptr": "*fp32"},
                        {"BLOCK_T": tokens, "BLOCK_R": block_r, "BLOCK_K": block_k}, warps)
    sass = _sass(compiled)
    if tokens == 1 and dtype == "bf16" and sass is not None:
        assert "LDG.E.EF.128" in sass, "router weight loads are not 16-byte evict-first vector loads"


def test_split_sum_compiles():
    _compile(split_sum_kernel, {"part_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16"},
             {"SPLITS": 64, "HAS_BIAS": True, "BLOCK_S": 64, "BLOCK": 128, "INTERPRETER": False}, 4)

"""The decode kernels compile for the GPU (sm_90), on a machine without one.

Triton's interpreter runs a kernel as Python, so it misses what only the GPU compiler rejects (such a
bug once cost a GPU run) and says nothing about the code the GPU would run. Triton compiles
ahead of time for a named target with its bundled ptxas, so every kernel variant the launchers can
produce is compiled here for an H100/H200, and the machine code is checked where the speed or the
correctness rests on it: the one-token weight loads are 16-byte vector loads (``LDG.E.EF.128``,
evict-first), and the fused split sum takes its ticket with one atomic per program, after a GPU-scope
release fence, and reads the other programs' partials past L1.

Inductor's analysis of which arguments a user kernel writes (it clones what it believes written) is
checked too: only the outputs and workspaces, never the weights.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from ranapass.kernels.capabilities import has_cuda, has_triton, triton_interpret

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


def _sass(compiled) -> str:
    """The SASS of ``compiled``. Without ``cuobjdump`` the test fails on a CUDA machine (the checks must
    run there) and skips elsewhere, after its PTX checks."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if tool is None:
        message = "cuobjdump not found (neither triton's bundled one nor the CUDA toolkit's): no SASS checks"
        if has_cuda():
            pytest.fail(message)
        pytest.skip(message)
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"ranapass_{compiled.metadata.hash}.cubin")
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    try:
        return subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.remove(path)


GEMV_CASES = [  # (prologue, tokens, weight dtype, block_k, block_n, warps, fused sum, prefetch, grouped)
    (PROLOGUE_RANK, 1, "bf16", 64, 64, 1, True, False, False),  # the one-token defaults (configs.py)
    (PROLOGUE_RANK, 1, "bf16", 64, 64, 1, True, False, True),   # gate and up in one launch
    (PROLOGUE_NEURON, 1, "bf16", 64, 64, 1, True, True, False),
    (PROLOGUE_NEURON, 1, "bf16", 64, 64, 1, True, True, True),  # two neuron adapters on one input
    (PROLOGUE_GATED, 1, "bf16", 64, 64, 1, True, True, False),
    (PROLOGUE_RANK, 1, "bf16", 32, 64, 1, True, False, False),
    (PROLOGUE_NEURON, 1, "bf16", 32, 64, 1, True, True, False),
    (PROLOGUE_RANK, 1, "bf16", 64, 128, 2, True, False, False),
    (PROLOGUE_NEURON, 1, "bf16", 64, 128, 2, True, True, False),
    (PROLOGUE_GATED, 1, "bf16", 32, 128, 2, True, False, False),
    (PROLOGUE_RANK, 1, "bf16", 128, 128, 4, True, True, False),
    (PROLOGUE_NEURON, 1, "bf16", 64, 128, 2, False, False, False),
    (PROLOGUE_NEURON, 1, "fp16", 64, 256, 4, True, False, False),
    (PROLOGUE_NEURON, 1, "fp32", 32, 64, 1, True, False, False),
    (PROLOGUE_RANK, 8, "bf16", 16, 128, 4, True, True, False),
    (PROLOGUE_RANK, 8, "bf16", 16, 128, 4, False, False, True),
    (PROLOGUE_GATED, 4, "bf16", 16, 128, 4, False, False, False),
] if has_triton() and not triton_interpret() else []


@pytest.mark.parametrize("prologue, tokens, dtype, block_k, block_n, warps, fused, prefetch, grouped", GEMV_CASES)
def test_masked_gemv_compiles(prologue, tokens, dtype, block_k, block_n, warps, fused, prefetch, grouped):
    a = "*fp32" if prologue == PROLOGUE_RANK else f"*{dtype}"
    w = f"*{dtype}"
    compiled = _compile(masked_gemv_kernel,
                        {"a_ptr": a, "b_ptr": a, "thr_ptr": "*fp32", "w_ptr": w, "bias_ptr": w, "part_ptr": "*fp32",
                         "ticket_ptr": "*i32", "y_ptr": w, "thr2_ptr": "*fp32", "w2_ptr": w, "bias2_ptr": w,
                         "y2_ptr": w, "ticket2_ptr": "*i32"},
                        {"IN_SPLITS": 8, "PROLOGUE": prologue, "ACTIVATION": 0, "HAS_BIAS": True, "FUSED_SUM": fused,
                         "PREFETCH": prefetch, "BLOCK_T": tokens, "BLOCK_K": block_k, "BLOCK_M": block_n,
                         "BLOCK_S": 16, "GROUPED": grouped, "PDL": True, "INTERPRETER": False}, warps)
    ptx = compiled.asm["ptx"]
    assert "griddepcontrol.launch_dependents" in ptx and "griddepcontrol.wait" in ptx
    sass = _sass(compiled)
    if tokens == 1 and dtype == "bf16":
        assert "LDG.E.EF.128" in sass, "one-token weight loads are not 16-byte evict-first vector loads"
    atomics = [line for line in sass.splitlines() if "ATOM" in line]
    if not fused:
        assert not atomics
        return
    assert len(atomics) == 1 and "ATOMG.E.ADD" in atomics[0], atomics
    at = sass.index(atomics[0])
    assert any("MEMBAR" in ln and "GPU" in ln for ln in sass[:at].splitlines()[-8:]), \
        "no GPU-scope release fence right before the ticket atomic"
    assert ".STRONG.GPU" in sass[at:], "the last program's partial loads may hit a stale L1"


@pytest.mark.parametrize("tokens, dtype, block_r, block_k, warps, pdl", [
    (1, "bf16", 16, 512, 4, True), (1, "bf16", 16, 512, 4, False), (1, "bf16", 32, 256, 4, True),
    (8, "bf16", 32, 32, 4, True), (1, "fp32", 16, 512, 4, True)])
def test_router_compiles(tokens, dtype, block_r, block_k, warps, pdl):
    compiled = _compile(router_kernel,
                        {"x_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "b2_ptr": f"*{dtype}", "zpart_ptr": "*fp32",
                         "ticket_ptr": "*i32"},
                        {"BLOCK_T": tokens, "BLOCK_R": block_r, "BLOCK_K": block_k, "PDL": pdl, "EARLY_B": pdl},
                        warps)
    assert ("griddepcontrol.wait" in compiled.asm["ptx"]) == pdl
    if tokens == 1 and dtype == "bf16":
        sass = _sass(compiled)
        assert "LDG.E.EF.128" in sass, "router weight loads are not 16-byte evict-first vector loads"


def test_split_sum_compiles():
    _compile(split_sum_kernel, {"part_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16"},
             {"SPLITS": 64, "HAS_BIAS": True, "BLOCK_S": 64, "BLOCK": 128, "INTERPRETER": False}, 4)


def test_inductor_sees_only_outputs_and_workspaces_written(monkeypatch):
    """Inductor clones every argument it believes a user kernel writes: the weights must not be among them."""
    import torch
    from torch._higher_order_ops import triton_kernel_wrap

    from ranapass.kernels import masked_gemv as mg
    from ranapass.kernels import rank_adapter as ra
    from ranapass.kernels.configs import KernelConfig
    from ranapass.kernels.neuron_adapter import neuron_adapter, neuron_adapter_pair

    analyse = getattr(triton_kernel_wrap, "identify_accessed_tensors", None)
    if analyse is None:  # torch < 2.13
        analyse = getattr(triton_kernel_wrap, "identify_mutated_tensors", None)
    if analyse is None:
        pytest.skip("this torch has no analysis of user Triton kernels' writes")

    class Sm90:  # the analysis asks the active driver for a target; there is no GPU here
        def get_current_target(self):
            return GPUTarget(*TARGET)

    launches = []

    def record(kernel):
        def run(*args, **kwargs):
            named = dict(zip(kernel.arg_names, args))
            named.update({k: v for k, v in kwargs.items() if k in kernel.arg_names})
            launches.append((kernel, named))
        return _Grid(run)

    monkeypatch.setattr(mg, "launch", record)
    monkeypatch.setattr(ra, "launch", record)
    monkeypatch.setattr(triton.runtime.driver, "_active", Sm90())
    x, thr = torch.randn(1, 64), torch.rand(64)
    ra.rank_adapter(x, torch.randn(32, 64), torch.randn(32, 48), thr[:32], torch.randn(48),
                    config=(KernelConfig(32, 16, 2), KernelConfig(16, 16, 2)))
    neuron_adapter(x, torch.randn(64, 48), thr, None, config=KernelConfig(16, 16, 2, fused_sum=False))
    ra.rank_adapter_pair(x, (torch.randn(32, 64), torch.randn(32, 48), thr[:32], None),
                         (torch.randn(24, 64), torch.randn(24, 40), thr[:24], None),
                         config=(KernelConfig(32, 16, 2), KernelConfig(16, 16, 2)))
    neuron_adapter_pair(x, (torch.randn(64, 48), thr, None), (torch.randn(64, 40), thr.flip(0), None),
                        config=KernelConfig(16, 16, 2))
    written = {}
    for kernel, named in launches:
        result = analyse(kernel, named, {})
        rw = getattr(result, "read_writes", None)
        names = {dep.name for dep in rw.writes} if rw is not None else set(result)
        written.setdefault(kernel.fn.__name__, []).append(sorted(names))
    assert written == {"router_kernel": [["ticket_ptr", "zpart_ptr"]] * 2,
                       "masked_gemv_kernel": [["part_ptr", "ticket_ptr", "y_ptr"], ["part_ptr"]]
                       + [["part_ptr", "ticket2_ptr", "ticket_ptr", "y2_ptr", "y_ptr"]] * 2,
                       "split_sum_kernel": [["out_ptr"]]}


class _Grid:
    def __init__(self, run):
        self.run = run

    def __getitem__(self, grid):
        return self.run

"""How close can one kernel come to the floor of the kernel-time bar? A kernel that only reads the bytes.

The bar divides an op's time by its floor, the bytes it must read over the copy bandwidth. A launch
also pays latencies the floor does not count: its programs start, their first loads travel to
memory and back, the last ones finish. This measures them at each op's byte count with a Triton
kernel that does nothing but stream that many contiguous bytes and sum them (the best of a small
sweep of load widths, loads per program and warps), timed like the ops: back to back in one CUDA
graph over rotating copies (no call finds its bytes in L2), launched with programmatic dependent
launch where the ops are. ``stream after input``: the same kernel when each program first loads a
small input that its big loads wait on, as a masked GEMV's loads wait on their mask. ``two streams``
(rank ops): the router's bytes (B and x), then the rest in a second launch that waits for the first
and streams after an input: the shape of a rank op, two dependent launches, without its arithmetic.
"""

from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

from common import copies_for, time_graph
from ranapass.kernels.launch import pdl_launch, pdl_supported
from ranapass.kernels.primitives import launch_dependents, wait_for_prior_grid

__all__ = ["stream_kernel", "read_floor"]

BLOCKS = (1024, 2048, 4096)  # bf16 elements per load
ITERS = (1, 2, 4, 8)         # loads per program, all issued before the first add needs one
WARPS = (1, 4)
INPUT = 64                   # elements of the small input each program loads first (``INPUT_FIRST``)


@triton.jit
def stream_kernel(w_ptr, x_ptr, out_ptr, N, BLOCK: tl.constexpr, ITERS: tl.constexpr, INPUT: tl.constexpr,
                  INPUT_FIRST: tl.constexpr, PDL: tl.constexpr):
    """``out[p] = sum(w[p * ITERS * BLOCK :][: ITERS * BLOCK])`` in fp32 (program p of cdiv(N, ITERS * BLOCK))."""
    launch_dependents(PDL)
    wait_for_prior_grid(PDL)
    pid = tl.program_id(0)
    if INPUT_FIRST:  # the big loads wait for a small input (all ones), as a masked GEMV's wait for its mask
        x = tl.load(x_ptr + pid * INPUT + tl.arange(0, INPUT)).to(tl.float32)
        N = tl.where(tl.sum(x) != 0.0, N, 0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in tl.static_range(ITERS):
        offs = (pid * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(w_ptr + offs, mask=offs < N, other=0.0, eviction_policy="evict_first").to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


class _Stream:
    """Rotating bf16 copies of ``nbytes`` and the launches that read them."""

    def __init__(self, nbytes: int):
        self.n = nbytes // 2
        self.ws = [torch.randn(self.n, device="cuda").to(torch.bfloat16) for _ in range(copies_for(nbytes))]
        most = triton.cdiv(self.n, min(BLOCKS))
        self.x = torch.ones(most * INPUT, device="cuda", dtype=torch.bfloat16)
        self.out = torch.empty(most, device="cuda", dtype=torch.float32)
        self.pdl = pdl_supported(self.x.device)

    def launch(self, w: torch.Tensor, block: int, iters: int, warps: int, input_first: bool = False) -> None:
        stream_kernel[(triton.cdiv(self.n, block * iters),)](
            w, self.x, self.out, self.n, BLOCK=block, ITERS=iters, INPUT=INPUT, INPUT_FIRST=input_first,
            PDL=self.pdl, num_warps=warps, **pdl_launch(self.pdl))

    def time(self, *cfg, input_first: bool = False) -> float:
        return time_graph([lambda w=w: self.launch(w, *cfg, input_first) for w in self.ws], min_calls=64, reps=7)

    def check(self) -> None:
        """The kernel reads every byte: its sums add up to torch's (fp32, loose)."""
        w = self.ws[0]
        self.launch(w, BLOCKS[0], 2, 4, True)
        got = self.out[: triton.cdiv(self.n, 2 * BLOCKS[0])].double().sum().item()
        want = w.double().sum().item()
        if abs(got - want) > 1e-3 * w.double().abs().sum().item():
            raise RuntimeError(f"stream_kernel summed {got}, torch {want}")


def _best(s: _Stream, input_first: bool = False) -> tuple[float, tuple[int, int, int]]:
    """The fastest (block, loads per program, warps) over ``s``'s bytes, with at least a program per SM."""
    return min((s.time(b, i, w, input_first=input_first), (b, i, w))
               for b, i, w in itertools.product(BLOCKS, ITERS, WARPS) if triton.cdiv(s.n, b * i) >= 132)


def _two_streams(first: _Stream, second: _Stream) -> float:
    """Microseconds per pair: ``first``, then ``second`` after an input, each at its own best config."""
    c1, c2 = _best(first)[1], _best(second, input_first=True)[1]
    n = max(len(first.ws), len(second.ws))
    return time_graph([lambda i=i: (first.launch(first.ws[i % len(first.ws)], *c1),
                                    second.launch(second.ws[i % len(second.ws)], *c2, True)) for i in range(n)],
                      min_calls=64, reps=7)


def read_floor(bw: float, ops: list[dict]) -> list[dict]:
    """For each op row (``model``, ``unit``, ``kernel``, ``us``, ``floor_us``, and for a rank op
    ``router_bytes``): the best stream over its bytes, the stream after an input, ``torch.sum`` over
    them and, for a rank op, two dependent streams split where its launches split, with their t/floor."""
    rows = []
    for op in ops:
        nbytes = int(op["floor_us"] * 1e-6 * bw * 1e9)
        s = _Stream(nbytes)
        s.check()
        t_stream, (b, i, w) = _best(s)
        t_input = s.time(b, i, w, input_first=True)
        t_sum = time_graph([lambda c=c: c.sum() for c in s.ws], min_calls=64, reps=7)
        del s
        t_two = math.nan
        if op.get("router_bytes"):
            t_two = _two_streams(_Stream(op["router_bytes"]), _Stream(nbytes - op["router_bytes"]))
        floor = op["floor_us"]
        rows.append({"model": op["model"], "unit": op["unit"], "op": op["kernel"], "mbytes": nbytes / 1e6,
                     "floor_us": floor, "op_us": op["us"], "op_ratio": op["us"] / floor,
                     "stream_us": t_stream, "stream_ratio": t_stream / floor,
                     "stream_cfg": f"{b} x {i} per program, {w} warp{'s' if w > 1 else ''}",
                     "after_input_us": t_input, "after_input_ratio": t_input / floor,
                     "two_streams_us": t_two, "two_streams_ratio": t_two / floor,
                     "torch_sum_us": t_sum, "torch_sum_ratio": t_sum / floor})
        torch.cuda.empty_cache()
    return rows

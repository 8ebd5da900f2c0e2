"""A built adapter under test on the GPU: random weights of one unit shape, its op calls, its float64 reference.

Shared by the timing script (bench_kernels.py) and the GPU correctness tests (tests/kernels/test_gpu.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import ranapass.kernels.ops  # noqa: F401  (registers torch.ops.ranapass.*)
from common import UnitShape, copies_for
from ranapass.kernels import configs as C
from ranapass.kernels.launch import direct_launch
from ranapass.kernels.neuron_adapter import gated_neuron_adapter, neuron_adapter, ticket_buffer
from ranapass.kernels.rank_adapter import rank_adapter

__all__ = ["BuiltAdapter", "TOL", "thresholds_for", "clear_of", "copies", "pair_op"]

OPS = torch.ops.ranapass
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
"""Largest relative error ``||y - ref|| / ||ref||`` against the float64 reference, per dtype."""
MARGIN = 1e-4  # in checks, thresholds stay this far (relative) from every score (fp32 sums differ by ~1e-6)


def thresholds_for(scores: torch.Tensor, density: float) -> torch.Tensor:
    """One threshold per column keeping about ``density`` of ``scores: [N, k]`` (their |.| quantile)."""
    k = scores.shape[-1]
    if density >= 1.0:
        return torch.zeros(k, device=scores.device)
    if density <= 0.0:
        return torch.full((k,), math.inf, device=scores.device)
    return torch.quantile(scores.abs().float().flatten()[:2**24], 1.0 - density).expand(k).clone()


def clear_of(thr: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Move thresholds that sit within MARGIN of one of ``scores`` just above it, so no mask decision can
    differ between the kernel (fp32 sums) and the float64 reference."""
    mag = scores.abs().float()
    for _ in range(20):
        near = ((mag - thr).abs() <= MARGIN * torch.maximum(mag, thr)).any(0)
        if not near.any():
            break
        thr = torch.where(near, thr * (1 + 3 * MARGIN), thr)
    return thr


class BuiltAdapter:
    """An adapter of one unit shape built from random tensors, the dense linear it replaces, and its op calls."""

    def __init__(self, u: UnitShape, dtype: torch.dtype, gen: torch.Generator):
        self.u, self.dtype = u, dtype
        dev = "cuda"
        if u.kind == "rank":
            self.B = (torch.randn(u.rank, u.n, device=dev, generator=gen) * u.n ** -0.5).to(dtype)
            self.At = (torch.randn(u.rank, u.m, device=dev, generator=gen) * u.rank ** -0.5).to(dtype)
        else:
            self.Wt = (torch.randn(u.n, u.m, device=dev, generator=gen) * u.n ** -0.5).to(dtype)
            # kept across calls, as a bound adapter keeps it; a static input under CUDA graphs, as the
            # backend's registered buffers are
            self.tickets = ticket_buffer(u.m, dev)
            torch._dynamo.mark_static_address(self.tickets)
        self.W = (torch.randn(u.m, u.n, device=dev, generator=gen) * u.n ** -0.5).to(dtype)  # dense twin
        self.bias = None
        self.thr = None

    def inputs(self, T: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Fresh random input(s) for T tokens: x, or (gate, up) for a gated unit."""
        if self.u.gated:
            return (torch.randn(T, self.u.n, device="cuda", generator=gen).mul_(2).to(self.dtype),
                    torch.randn(T, self.u.n, device="cuda", generator=gen).to(self.dtype))
        return (torch.randn(T, self.u.n, device="cuda", generator=gen).to(self.dtype),)

    def scores(self, inp: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """What the mask thresholds, in float64: z = B x, x, or act(gate)*up (rounded like torch)."""
        if self.u.kind == "rank":
            return inp[0].double() @ self.B.double().t()
        if self.u.gated:
            return (F.silu(inp[0]) * inp[1]).double()
        return inp[0].double()

    def calibrate(self, density: float, gen: torch.Generator) -> None:
        self.thr = thresholds_for(self.scores(self.inputs(256, gen)), density)

    def op(self, inp: tuple[torch.Tensor, ...], decode: bool = False) -> torch.Tensor:
        """The op, or with ``decode`` its opaque ``*_decode`` op (what a compiled graph calls under CUDA
        graphs with Inductor's PDL on, ops.py)."""
        suffix = "_decode" if decode else ""
        if self.u.kind == "rank":
            return getattr(OPS, "rank_adapter" + suffix)(inp[0], self.B, self.At, self.thr, self.bias)
        if self.u.gated:
            return getattr(OPS, "gated_neuron_adapter" + suffix)(inp[0], inp[1], self.Wt, self.thr, self.bias,
                                                                  self.tickets, "silu")
        return getattr(OPS, "neuron_adapter" + suffix)(inp[0], self.Wt, self.thr, self.bias, self.tickets)

    def launch(self, inp, config) -> torch.Tensor:
        """The launcher with an explicit tile config (sweeps)."""
        with direct_launch():
            if self.u.kind == "rank":
                return rank_adapter(inp[0], self.B, self.At, self.thr, self.bias, config=config)
            if self.u.gated:
                return gated_neuron_adapter(inp[0], inp[1], self.Wt, self.thr, self.bias, "silu", config=config,
                                            tickets=self.tickets)
            return neuron_adapter(inp[0], self.Wt, self.thr, self.bias, config=config, tickets=self.tickets)

    def union_config(self, T: int):
        """The explicit decode config that makes the launcher run the union kernels for T tokens."""
        if self.u.kind == "rank":
            return C.rank_adapter_configs(self.u.n, self.u.rank, self.u.m, T)
        return C.masked_gemv_config(self.u.n, self.u.m, T)

    def union(self, inp: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The row-skipping union kernels for several tokens (the op takes masked GEMMs there)."""
        return self.launch(inp, self.union_config(inp[0].shape[0]))

    def dense(self, inp: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Plain ``F.linear`` of the same shape (for a gated unit without its SiLU·mul, which the op pays)."""
        return F.linear(inp[0], self.W)

    def reference(self, inp: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """float64 reference of the op (the mask from float64 scores; thresholds keep clear of them)."""
        s = self.scores(inp)
        v = torch.where(s.abs() >= self.thr.double(), s, 0.0)
        y = v @ (self.At if self.u.kind == "rank" else self.Wt).double()
        return y + self.bias.double() if self.bias is not None else y

    def kept_rows(self, inp: tuple[torch.Tensor, ...]) -> tuple[float, int]:
        """(mean kept fraction per token, rows kept by the union of the tokens)."""
        s = self.scores(inp)
        keep = (s.abs() >= self.thr.double()) & (s != 0)
        return keep.float().mean().item(), int(keep.any(0).sum().item())

    def weight_bytes(self) -> int:
        es = torch.finfo(self.dtype).bits // 8
        return (self.u.rank * (self.u.n + self.u.m) if self.u.kind == "rank" else self.u.n * self.u.m) * es

    def must_read(self, inp: tuple[torch.Tensor, ...]) -> int:
        """Bytes a call must read: B in full, the kept rows of At/Wt (union), inputs, thresholds."""
        es = torch.finfo(self.dtype).bits // 8
        _, rows = self.kept_rows(inp)
        T = inp[0].shape[0]
        if self.u.kind == "rank":
            return (self.u.rank * self.u.n + rows * self.u.m + T * self.u.n) * es + 4 * self.u.rank
        return (rows * self.u.m + len(inp) * T * self.u.n) * es + 4 * self.u.n


def copies(u: UnitShape, dtype, gen, density) -> list[BuiltAdapter]:
    """Enough adapters of one shape (thresholds shared) that cycling over them finds no weight in L2."""
    first = BuiltAdapter(u, dtype, gen)
    first.calibrate(density, gen)
    units = [first]
    for _ in range(copies_for(first.weight_bytes()) - 1):
        c = BuiltAdapter(u, dtype, gen)
        c.thr = first.thr
        units.append(c)
    return units


def pair_op(first: BuiltAdapter, second: BuiltAdapter, x: torch.Tensor,
            op=OPS.rank_adapter_pair) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rank units on one input through ``rank_adapter_pair`` (gate and up), or its decode op."""
    return op(x, first.B, first.At, first.thr, first.bias, second.B, second.At, second.thr, second.bias)

"""Tile sizes of the decode kernels, chosen in Python from the token count and the weight shape.

Keyed ``@triton.autotune`` inside a triton_op may be ignored by Inductor (all shapes get one config),
so the launchers pick a config here. Decode (``T <= DECODE_MAX_TOKENS``) runs the Triton kernels;
more tokens (prefill) run cuBLAS GEMMs with the same masks (prefill.py). The reduction dimension is
split so the grid has about ``TARGET_PROGRAMS`` programs: enough loads in flight on every SM of an
H100/H200 (132 SMs), while each weight row is still read by one program only.

The tiles were picked from a sweep on the GPU (benchmarks/bench_kernels.py --sweep; figures in
benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses

import triton

__all__ = ["KernelConfig", "DECODE_MAX_TOKENS", "TARGET_PROGRAMS", "router_config", "masked_gemv_config",
           "rank_adapter_configs", "auto_splits"]

DECODE_MAX_TOKENS = 8
TARGET_PROGRAMS = 528  # 4 per SM on a 132-SM H100/H200


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of one decode launch (the token tile is T rounded up to a power of two).

    Args:
        block_k: reduction rows (inputs or ranks) per step.
        block_n: outputs per program (ranks for the router, output features for the masked GEMV).
        splits: programs that share one output tile's reduction (fp32 partials, summed in order).
        num_warps, num_stages: Triton launch parameters.
        prefetch: masked GEMV only: request the next chunk's rows before multiplying this one.
    """

    block_k: int
    block_n: int
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 1
    prefetch: bool = True

    def __post_init__(self) -> None:
        for name in ("block_k", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16, got {v}")
        if self.splits < 1:
            raise ValueError(f"KernelConfig.splits must be >= 1, got {self.splits}")


def auto_splits(out_tiles: int, k: int, block_k: int, target: int = TARGET_PROGRAMS) -> int:
    """Split the reduction so the grid has about ``target`` programs, each with >= 1 block of K."""
    return max(1, min(target // max(out_tiles, 1), triton.cdiv(k, block_k)))


def router_config(n: int, nB: int) -> KernelConfig:
    """Decode tiles of ``z = x B^T`` (``B: [nB, n]``)."""
    block_n, block_k = 32, 256
    return KernelConfig(block_k, block_n, auto_splits(triton.cdiv(nB, block_n), n, block_k))


def masked_gemv_config(K: int, m: int) -> KernelConfig:
    """Decode tiles of ``y = (keep * v) W`` (``W: [K, m]``, K maskable rows)."""
    block_n, block_k = 128, 128
    return KernelConfig(block_k, block_n, auto_splits(triton.cdiv(m, block_n), K, block_k))


def rank_adapter_configs(n: int, nB: int, m: int) -> tuple[KernelConfig, KernelConfig]:
    """(router, masked GEMV) decode configs of a rank adapter with ``B: [nB, n]`` and ``At: [nB, m]``."""
    return router_config(n, nB), masked_gemv_config(nB, m)

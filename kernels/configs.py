"""Tile sizes of the decode kernels, chosen in Python from the token count and the weight shape.

Keyed ``@triton.autotune`` inside a triton_op may be ignored by Inductor (all shapes get one config),
so the launchers pick a config here. One decode token runs the Triton kernels (``use_kernels``); more
tokens run cuBLAS GEMMs with the same masks (masked_gemm.py). The reduction dimension is
split so the grid has about ``TARGET_PROGRAMS`` programs: enough loads in flight on every SM of an
H100/H200 (132 SMs), while each weight row is still read by one program only.

The one-token tiles are the best of a sweep on an H200 (benchmarks/bench_kernels.py --sweep; figures
in benchmarks/RESULTS.md); the tiles for several tokens (explicit configs only) are untuned.
"""

from __future__ import annotations

import dataclasses

import triton

__all__ = ["KernelConfig", "DECODE_MAX_TOKENS", "ROW_SKIP_MAX_TOKENS", "TARGET_PROGRAMS", "router_config",
           "masked_gemv_config", "rank_adapter_configs", "auto_splits", "use_kernels"]

DECODE_MAX_TOKENS = 8
"""The most tokens the Triton decode kernels take."""
ROW_SKIP_MAX_TOKENS = 1
"""By default the row-skipping kernels run up to this many tokens. With independent per-token masks of
density d the union of T tokens keeps ``1 - (1 - d)^T`` of the rows (0.89 at d = 2/3 and T = 2, 0.99
at T = 4), so several tokens save few bytes, and the union kernels measured slower than dense there
(benchmarks/RESULTS.md); cuBLAS's GEMM over the masked inputs reads the dense bytes at dense speed. An
explicit config still runs the kernels up to ``DECODE_MAX_TOKENS``."""
TARGET_PROGRAMS = 2048  # ~16 short programs per SM on a 132-SM H100/H200: loads in flight while others wait


def use_kernels(T: int, config: object | None) -> bool:
    """Whether T tokens run the Triton decode kernels (else the masked GEMMs of masked_gemm.py)."""
    limit = DECODE_MAX_TOKENS if config is not None else ROW_SKIP_MAX_TOKENS
    return 0 < T <= limit


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of one decode launch (the token tile is T rounded up to a power of two).

    Args:
        block_k: reduction rows (inputs or ranks) per step.
        block_n: outputs per program (ranks for the router, output features for the masked GEMV).
        splits: programs that share one output tile's reduction (fp32 partials, summed in order).
        num_warps, num_stages: Triton launch parameters.
    """

    block_k: int
    block_n: int
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 1

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


def router_config(n: int, nB: int, T: int = 1) -> KernelConfig:
    """Decode tiles of ``z = x B^T`` (``B: [nB, n]``) for T tokens."""
    block_n, block_k = 32, 256 if T == 1 else max(32, 256 // triton.next_power_of_2(T))
    return KernelConfig(block_k, block_n, auto_splits(triton.cdiv(nB, block_n), n, block_k, 528))


def masked_gemv_config(K: int, m: int, T: int = 1) -> KernelConfig:
    """Decode tiles of ``y = (keep * v) W`` (``W: [K, m]``, K maskable rows) for T tokens."""
    block_n, block_k, warps = (128, 64, 2) if T == 1 else (128, max(16, 64 // triton.next_power_of_2(T)), 4)
    return KernelConfig(block_k, block_n, auto_splits(triton.cdiv(m, block_n), K, block_k), warps)


def rank_adapter_configs(n: int, nB: int, m: int, T: int = 1) -> tuple[KernelConfig, KernelConfig]:
    """(router, masked GEMV) decode configs of a rank adapter with ``B: [nB, n]`` and ``At: [nB, m]``."""
    return router_config(n, nB, T), masked_gemv_config(nB, m, T)

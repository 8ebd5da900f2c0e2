"""Block sizes of the adapter kernels, chosen in Python from static shape regimes.

Keyed ``@triton.autotune`` inside a triton_op may be ignored by Inductor (all shapes get one config),
so the launchers pick a config here from the token count regime and the weight shape:

- decode (``T <= DECODE_MAX_TOKENS``): one 16-token tile (the smallest ``tl.dot`` tile); the reduction
  dimension is split so the grid has about ``TARGET_PROGRAMS`` programs, enough to keep every SM's
  loads in flight on an H100/H200 (132 SMs) while a weight row is still read by one program only;
- prefill: GEMM tiles, no split, so the kernel writes ``y`` directly.

The decode tiles were picked from a sweep on an H100 (benchmarks/bench_kernels.py --sweep; the
figures are in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses

import triton

__all__ = ["KernelConfig", "DECODE_MAX_TOKENS", "TARGET_PROGRAMS", "rank_adapter_configs", "masked_gemv_config",
           "router_config"]

DECODE_MAX_TOKENS = 16
TARGET_PROGRAMS = 528  # 4 per SM on a 132-SM H100/H200


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of one launch.

    Args:
        block_t: tokens per tile: >= 16 (``tl.dot``'s minimum), or 1 (one token, fp32 multiply-add, no MMA).
        block_k: reduction (input or rank) rows per step.
        block_n: outputs per tile (ranks for the router, output features for the masked GEMV).
        splits: how many programs share one output tile's reduction (fp32 partials, summed in order).
        num_warps, num_stages: Triton launch parameters.
    """

    block_t: int
    block_k: int
    block_n: int
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_t", "block_k", "block_n"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1) or (v < 16 and not (name == "block_t" and v == 1)):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16 (block_t may be 1), got {v}")
        if self.splits < 1:
            raise ValueError(f"KernelConfig.splits must be >= 1, got {self.splits}")


def _splits(out_tiles: int, k: int, block_k: int) -> int:
    """Split the reduction so the grid has about TARGET_PROGRAMS programs, each with >= 1 block of K."""
    return max(1, min(TARGET_PROGRAMS // max(out_tiles, 1), triton.cdiv(k, block_k)))


def router_config(T: int, n: int, nB: int) -> KernelConfig:
    """Tiles of ``z = x B^T`` (``B: [nB, n]``)."""
    if T <= DECODE_MAX_TOKENS:
        block_n, block_k = 32, 256
        return KernelConfig(16, block_k, block_n, _splits(triton.cdiv(nB, block_n), n, block_k), 4, 3)
    return KernelConfig(64, 64, 128, 1, 4, 3)


def masked_gemv_config(T: int, K: int, m: int) -> KernelConfig:
    """Tiles of ``y = (keep * v) W`` (``W: [K, m]``, K maskable rows)."""
    if T <= DECODE_MAX_TOKENS:
        block_n, block_k = 128, 64
        return KernelConfig(16, block_k, block_n, _splits(triton.cdiv(m, block_n), K, block_k), 4, 3)
    return KernelConfig(64, 64, 128, 1, 4, 3)


def rank_adapter_configs(T: int, n: int, nB: int, m: int) -> tuple[KernelConfig, KernelConfig]:
    """(router, masked GEMV) configs of a rank adapter with ``B: [nB, n]`` and ``At: [nB, m]``."""
    return router_config(T, n, nB), masked_gemv_config(T, nB, m)

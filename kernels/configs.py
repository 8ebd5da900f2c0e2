"""Tile sizes of the decode kernels, chosen in Python from the token count and the weight shape.

Keyed ``@triton.autotune`` inside a triton_op may be ignored by Inductor (all shapes get one config),
so the launchers pick a config here. One decode token runs the Triton kernels (``use_kernels``); more
tokens run cuBLAS GEMMs with the same masks (masked_gemm.py). The reduction dimension is
split so the grid has at most ``TARGET_PROGRAMS`` programs: enough loads in flight on every SM of an
H100/H200 (132 SMs), while each weight row is still read by one program only.

The one-token rules: 64-row x 64-column masked-GEMV tiles, one warp, about ``TARGET_PROGRAMS``
programs, the split sum fused, and the prefetch on where a split has several chunks and the prologue
is not the rank one; the router takes 16 ranks x 512 inputs, 4 warps and up to 528 programs. They are the winners
of checked sweeps at the Llama-2-7B and Llama-3-8B unit shapes (``benchmarks/bench_kernels.py --tune``;
the sweeps and their figures are in benchmarks/RESULTS.md, "Where the kernel rules come from").
Shapes in ``TUNED`` (filled by ``--tune`` or ``benchmarks/common.load_tuned``) take their own tiles
instead. The tiles for several tokens (explicit configs only) are untuned.
"""

from __future__ import annotations

import dataclasses

import triton

__all__ = ["KernelConfig", "MIN_BLOCK", "DECODE_MAX_TOKENS", "ROW_SKIP_MAX_TOKENS", "TARGET_PROGRAMS", "TUNED",
           "router_config", "masked_gemv_config", "rank_adapter_configs", "auto_splits", "use_kernels"]

DECODE_MAX_TOKENS = 8
"""The most tokens the Triton decode kernels take."""
ROW_SKIP_MAX_TOKENS = 1
"""By default the row-skipping kernels run up to this many tokens. With independent per-token masks of
density d the union of T tokens keeps ``1 - (1 - d)^T`` of the rows (0.89 at d = 2/3 and T = 2, 0.99
at T = 4), so several tokens save few bytes, and the union kernels measured slower than dense there
(benchmarks/RESULTS.md); cuBLAS's GEMM over the masked inputs reads the dense bytes at dense speed. An
explicit config still runs the kernels up to ``DECODE_MAX_TOKENS``."""
MIN_BLOCK = 16
"""The smallest tile edge a config may have; it bounds how many output tiles, and so tickets, a launch
can have (``neuron_adapter.ticket_buffer``)."""
TARGET_PROGRAMS = 16 * 132  # 16 short programs per SM of a 132-SM H100/H200: loads in flight while others wait


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
        fused_sum: masked GEMV only: the last split of each output tile sums the partials (one
            launch); False: a second launch, ``split_sum_kernel``, sums them.
        prefetch: masked GEMV only: request the next chunk's masked input while this chunk's weight
            rows are in flight (pays when a split has several chunks; costs registers).
    """

    block_k: int
    block_n: int
    splits: int = 1
    num_warps: int = 4
    num_stages: int = 1
    fused_sum: bool = True
    prefetch: bool = False

    def __post_init__(self) -> None:
        for name in ("block_k", "block_n"):
            v = getattr(self, name)
            if v < MIN_BLOCK or v & (v - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= {MIN_BLOCK}, got {v}")
        if self.splits < 1:
            raise ValueError(f"KernelConfig.splits must be >= 1, got {self.splits}")


def auto_splits(out_tiles: int, k: int, block_k: int, target: int = TARGET_PROGRAMS) -> int:
    """Split the reduction into at most ``target / out_tiles`` splits, each with >= 1 block of K.

    Each program walks its split's blocks one after another, so the kernel waits for the split with
    the most blocks: of the split counts that give the fewest blocks per split, take the smallest (the
    fewest partials to sum): 32 blocks go to 11 splits of at most 3 blocks, not 10 with two of 4
    (the gain at Llama-2-7B q/k/v is in benchmarks/RESULTS.md).
    """
    blocks = triton.cdiv(k, block_k)
    most = max(1, min(target // max(out_tiles, 1), blocks))
    return triton.cdiv(blocks, triton.cdiv(blocks, most))


TUNED: dict[tuple[str, int, int], KernelConfig] = {}
"""One-token tiles measured best at a shape, ahead of the rules: ``("router", n, nB)`` and
``("gemv", K, m)`` -> config."""


def router_config(n: int, nB: int, T: int = 1) -> KernelConfig:
    """Decode tiles of ``z = x B^T`` (``B: [nB, n]``) for T tokens."""
    if T == 1:
        if ("router", n, nB) in TUNED:
            return TUNED["router", n, nB]
        return KernelConfig(512, 16, auto_splits(triton.cdiv(nB, 16), n, 512, 528), 4)
    block_k = max(32, 256 // triton.next_power_of_2(T))
    return KernelConfig(block_k, 32, auto_splits(triton.cdiv(nB, 32), n, block_k, 528))


def masked_gemv_config(K: int, m: int, T: int = 1, rank: bool = False) -> KernelConfig:
    """Decode tiles of ``y = (keep * v) W`` (``W: [K, m]``, K maskable rows) for T tokens.

    ``rank``: the rank adapter's GEMV, whose masked input sums the router's partials; it never
    prefetches (its prologue loads one row per router split: too many registers a thread; RESULTS.md).
    """
    if T == 1:
        if ("gemv", K, m) in TUNED:
            return TUNED["gemv", K, m]
        splits = auto_splits(triton.cdiv(m, 64), K, 64)
        return KernelConfig(64, 64, splits, 1, prefetch=not rank and triton.cdiv(K, 64) >= 2 * splits)
    # several tokens (union kernels): the split sum in a second launch (faster than fused there; RESULTS.md)
    block_k = max(16, 64 // triton.next_power_of_2(T))
    return KernelConfig(block_k, 128, auto_splits(triton.cdiv(m, 128), K, block_k), 4, fused_sum=False)


def rank_adapter_configs(n: int, nB: int, m: int, T: int = 1) -> tuple[KernelConfig, KernelConfig]:
    """(router, masked GEMV) decode configs of a rank adapter with ``B: [nB, n]`` and ``At: [nB, m]``."""
    return router_config(n, nB, T), masked_gemv_config(nB, m, T, rank=True)

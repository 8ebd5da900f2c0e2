"""The decode tile rules (kernels/configs.py): how the reduction is split."""

from __future__ import annotations

import itertools

import triton

from ranapass.kernels.configs import TARGET_PROGRAMS, auto_splits, masked_gemv_config


def test_auto_splits_gives_the_fewest_blocks_per_split_with_the_fewest_splits():
    for tiles, blocks in itertools.product([1, 9, 64, 96, 172, 192, 224, 4000], [1, 2, 7, 32, 64, 172, 224]):
        splits = auto_splits(tiles, blocks * 64, 64)
        most = max(1, min(TARGET_PROGRAMS // tiles, blocks))  # the most splits the grid may have
        assert 1 <= splits <= most
        per = triton.cdiv(blocks, splits)
        assert per == triton.cdiv(blocks, most), (tiles, blocks, splits)  # no split walks more blocks than needed
        assert splits == 1 or triton.cdiv(blocks, splits - 1) > per, (tiles, blocks, splits)  # and no extra partials


def test_auto_splits_at_llama_shapes():
    # Llama-2-7B q/k/v rank GEMV (2048 ranks, 12288 outputs): 11 splits of at most 3 blocks, not 10 with some of 4
    assert masked_gemv_config(2048, 12288, rank=True).splits == 11
    assert masked_gemv_config(4096, 4096).splits == 32  # o: 2 blocks a split
    assert masked_gemv_config(14336, 4096).splits == 32  # Llama-3-8B down: 7 blocks a split

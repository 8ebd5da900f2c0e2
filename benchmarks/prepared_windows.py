"""The protocol's token windows as one file, for a machine without the texts (the GPU machine).

``calibration_spread.py prepare --out DIR`` writes ``DIR/windows.safetensors``: the protocol's calibration
windows, a pool of further calibration windows (the calibration draws), and each text's evaluation windows.
The benchmarks read it with ``--prepared DIR``; without it they make the same windows from the texts here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import ranapass

TEXTS = {"python-docs": 32, "debian-handbook": 16}
"""Evaluation windows per text (the protocol's, as in benchmarks/quality.py)."""
PROTOCOL = "protocol"
WINDOWS_FILE = "windows.safetensors"


def prepare(out: Path, replicas: int, windows: int, window: int, model: str) -> None:
    """The token windows of every replica and of the evaluation texts, in one file."""
    _, tokenizer = ranapass.load_model(model)
    tensors = {PROTOCOL: ranapass.calibration_windows(tokenizer, num_windows=windows, window=window),
               "pool": ranapass.calibration_windows(tokenizer, num_windows=windows * replicas, window=window)}
    for text, count in TEXTS.items():
        tensors[f"eval:{text}"] = ranapass.evaluation_windows(tokenizer, text, num_windows=count, window=window)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{WINDOWS_FILE}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"replicas": str(replicas)})
    tmp.replace(out / WINDOWS_FILE)


def replicas(tensors: dict[str, torch.Tensor], count: int) -> dict[str, tuple[torch.Tensor, int]]:
    """``{replica: (calibration windows, sampling seed)}``: the protocol's, then ``count`` disjoint draws."""
    pool = tensors["pool"]
    return {PROTOCOL: (tensors[PROTOCOL], 0)} | {f"draw{k}": (pool[k::count], k) for k in range(count)}


def protocol_windows(tokenizer, prepared: Path | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The protocol's 32 calibration windows and each text's evaluation windows, from the texts or ``prepared``."""
    if prepared is not None:
        tensors = load_file(str(prepared / WINDOWS_FILE))
        return tensors[PROTOCOL], {t: tensors[f"eval:{t}"] for t in TEXTS}
    return (ranapass.calibration_windows(tokenizer, num_windows=32, window=512),
            {t: ranapass.evaluation_windows(tokenizer, t, num_windows=n, window=512) for t, n in TEXTS.items()})

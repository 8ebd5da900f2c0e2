"""Shared pieces of the GPU benchmarks: model shapes, the budget-0.56 sizing, timing and checking helpers.

Timing follows reference/gpu_teal_kernel.md: a CUDA graph of many back-to-back calls that cycle over
enough weight copies that no call finds its weights in L2, replayed several times; the median per
call is reported. Bandwidth is the device-to-device copy of 2 GiB, bytes read plus bytes written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import sys
from collections.abc import Callable, Sequence

import torch

from ranapass.cost_model import flops
from ranapass.kernels import configs

# ------------------------------------------------------------------------------------------ shapes
@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The linear shapes of one Llama-architecture model (out x in)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def qkv_out(self) -> int:
        return self.hidden + 2 * self.kv_heads * self.head_dim


LLAMA2_7B = ModelShape("Llama-2-7B", 4096, 11008, 32, 32, 32, 32000)
LLAMA3_8B = ModelShape("Llama-3-8B", 4096, 14336, 32, 32, 8, 128256)
SMOLLM2_135M = ModelShape("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, tie_embeddings=True)


@dataclasses.dataclass(frozen=True)
class UnitShape:
    """One adapted unit of a block: ``kind`` is "rank" (B [rank, n], At [rank, m]) or "neuron" (Wt [n, m])."""

    name: str
    kind: str
    n: int
    m: int
    rank: int = 0
    gated: bool = False

    def flops(self, kept_fraction: float) -> float:
        if self.kind == "rank":
            return flops.per_token(flops.rank_adapter(self.m, self.n, self.rank, kept_fraction * self.rank))
        return flops.per_token(flops.neuron_adapter(self.m, self.n, kept_fraction * self.n))

    def dense_flops(self) -> float:
        return flops.per_token(flops.dense_linear(self.m, self.n))


def block_units(shape: ModelShape, rank_fraction: float = 0.5) -> list[UnitShape]:
    """The adapted units of one block: rank adapters on q/k/v (grouped), gate and up; neuron adapters on o
    and down (down gated: its input is ``silu(gate) * up``). Rank ``nB = rank_fraction * hidden``."""
    h, i = shape.hidden, shape.intermediate
    r = int(rank_fraction * h)
    return [UnitShape("qkv", "rank", h, shape.qkv_out, r), UnitShape("o", "neuron", h, h),
            UnitShape("gate", "rank", h, i, r), UnitShape("up", "rank", h, i, r),
            UnitShape("down", "neuron", i, h, gated=True)]


def kept_fraction_for_budget(units: Sequence[UnitShape], budget: float) -> float:
    """The one kept fraction (of ranks or inputs, every unit alike) whose FLOPs are ``budget`` x dense."""
    dense = sum(u.dense_flops() for u in units)
    at0 = sum(u.flops(0.0) for u in units)
    at1 = sum(u.flops(1.0) for u in units)
    f = (budget * dense - at0) / (at1 - at0)
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"budget {budget} is out of reach with these ranks (kept fraction {f:.3f})")
    return f


# ------------------------------------------------------------------------------------------ environment
def env_info() -> dict:
    """Card, versions, date and the exact command, for RESULTS.md."""
    import triton

    p = torch.cuda.get_device_properties(0)
    info = {"card": p.name, "sms": p.multi_processor_count, "l2_mib": p.L2_cache_size / 2**20,
            "memory_gib": round(p.total_memory / 2**30, 1), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv])}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def copy_bandwidth(gib: float = 2.0, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written), median of ``reps``."""
    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e-3)
    del src, dst
    return 2 * n / sorted(ts)[len(ts) // 2] / 1e9


def l2_bytes() -> int:
    return torch.cuda.get_device_properties(0).L2_cache_size


def copies_for(bytes_per_call: int) -> int:
    """Weight copies to rotate so no call finds its weights in L2 (at least 3x L2 in all)."""
    return max(2, math.ceil(3 * l2_bytes() / max(bytes_per_call, 1)))


def time_graph(fns: Sequence[Callable[[], object]], min_calls: int = 96, reps: int = 15) -> float:
    """Median microseconds per call of ``fns`` (one per weight copy), replayed from one CUDA graph."""
    n = len(fns)
    calls = n * max(1, math.ceil(min_calls / n))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % n]()
    g.replay()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / calls)
    del g
    return sorted(ts)[len(ts) // 2]


def poison_allocator() -> None:
    """Fill free cached blocks with 0xFF bytes (NaN in every float dtype), so unwritten outputs show."""
    big = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda").fill_(0xFF)
    small = [torch.empty(2**20 - 512 * i, dtype=torch.uint8, device="cuda").fill_(0xFF) for i in range(32)]
    del big, small


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """``||y - ref|| / ||ref||`` in float64; inf when ``y`` holds a NaN or inf."""
    if not torch.isfinite(y).all():
        return math.inf
    den = ref.double().norm().item()
    return (y.double() - ref.double()).norm().item() / max(den, 1e-300)


def markdown_table(rows: Sequence[dict], cols: Sequence[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


# ------------------------------------------------------------------------------------------ tuned tiles
def save_tuned(path, table: dict) -> None:
    """Write ``{("gemv"|"router", a, b): KernelConfig}`` (configs.TUNED's form) as JSON."""
    rows = [{"stage": k[0], "shape": [k[1], k[2]], "config": dataclasses.asdict(c)} for k, c in table.items()]
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


def load_tuned(path) -> dict:
    """Read a table written by :func:`save_tuned` into ``configs.TUNED``; returns what was read."""
    with open(path) as f:
        table = {(r["stage"], *r["shape"]): configs.KernelConfig(**r["config"]) for r in json.load(f)}
    configs.TUNED.update(table)
    return table


@contextlib.contextmanager
def pdl_off():
    """Launch without programmatic dependent launch (``RANAPASS_PDL=0``) inside the block."""
    before = os.environ.get("RANAPASS_PDL")
    os.environ["RANAPASS_PDL"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["RANAPASS_PDL"]
        else:
            os.environ["RANAPASS_PDL"] = before

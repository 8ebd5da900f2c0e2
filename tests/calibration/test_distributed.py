"""Data-parallel profiles: two gloo processes on CPU give the single-process profile; failures are refused clearly."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

from ranapass import distributed
from ranapass.calibrate import candidate_linears, collect
from ranapass.data import split_holdout
from ranapass.profiling import Profile, ProfileOptions, profile
from tiny_models import tiny_llama, token_windows

pytestmark = pytest.mark.slow  # spawns gloo process groups: seconds per test

OPTIONS = ProfileOptions(batch_size=2, sample_tokens=64, gradient_windows=3)
WINDOWS = dict(n=10, length=32)   # 8 calibrated in 4 batches (2 per process), 2 held out
BUDGETS = (0.5, 0.7)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stats(model, windows):
    """The calibration statistics ``profile`` collects with ``OPTIONS``."""
    data, _ = split_holdout(windows, OPTIONS.holdout_windows)
    return collect(model, data, linears=candidate_linears(model), batch_size=OPTIONS.batch_size,
                   sample_tokens=OPTIONS.sample_tokens, gradient_data=data[:OPTIONS.gradient_windows], seed=OPTIONS.seed)


def _worker(rank: int, world: int, port: int, folder: str, scenario: str) -> None:
    """One process of a ``world``-process group: profile the tiny model; record the outcome under ``folder``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANAPASS_DIST_TIMEOUT="20")
    torch.set_num_threads(1)
    out = Path(folder)
    try:
        assert distributed.init_from_env() and distributed.rank() == rank
        model = tiny_llama(seed=1 if scenario == "mismatch" and rank == 1 else 0)
        windows = token_windows(**WINDOWS)
        if scenario == "dies" and rank == 1:
            calls = []

            def die(module, args):
                calls.append(1)
                if len(calls) > 2:   # site discovery and the first batch ran
                    os._exit(3)
            model.model.layers[0].register_forward_pre_hook(die)
        if scenario == "same":
            (out / f"stats{rank}.pkl").write_bytes(pickle.dumps(_stats(model, windows)))
        prof = profile(model, windows, options=OPTIONS, cache=out / f"cache{rank}")
        prof.save(out / f"profile{rank}")
    except Exception as e:   # noqa: BLE001  (reported to the test through a file)
        (out / f"error{rank}.txt").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        distributed.shutdown()


def _run(tmp_path: Path, scenario: str, world: int = 2) -> list[int]:
    """Run ``world`` workers; their exit codes."""
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(tmp_path), scenario)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        if p.is_alive():
            p.kill()
            pytest.fail(f"a worker of scenario {scenario!r} hung")
    return [p.exitcode for p in procs]


def _saved_profiles(folder: Path) -> list[Path]:
    return [p.parent for p in folder.glob("**/profile.json")]


def test_two_processes_give_the_single_process_profile(tmp_path):
    assert _run(tmp_path, "same") == [0, 0]
    for r in range(2):
        assert not (tmp_path / f"error{r}.txt").exists(), (tmp_path / f"error{r}.txt").read_text()
    model, windows = tiny_llama(seed=0), token_windows(**WINDOWS)

    # Statistics: sums equal up to float64 summation order; sampled rows and counts exactly.
    single = _stats(model, windows)
    for r in range(2):
        parallel = pickle.loads((tmp_path / f"stats{r}.pkl").read_bytes())
        assert [s.members for s in parallel.sites] == [s.members for s in single.sites]
        for a, b in zip(parallel.sites, single.sites):
            assert a.tokens == b.tokens
            assert torch.equal(a.sample, b.sample)
            if b.gram is not None:
                assert torch.allclose(a.gram, b.gram, rtol=1e-10, atol=0)
        assert parallel.grad_sq.keys() == single.grad_sq.keys()
        for m in single.grad_sq:
            assert torch.allclose(parallel.grad_sq[m], single.grad_sq[m], rtol=1e-10, atol=0)

    # Only rank 0 wrote the cache; both ranks hold the same profile, which plans like the single-process one.
    assert len(_saved_profiles(tmp_path / "cache0")) == 1
    assert _saved_profiles(tmp_path / "cache1") == []
    reference = profile(model, windows, options=OPTIONS, cache=False)
    profiles = [Profile.load(tmp_path / f"profile{r}", model) for r in range(2)]
    profiles.append(Profile.load(_saved_profiles(tmp_path / "cache0")[0], model))
    for prof in profiles:
        assert prof.meta["processes"] == 2
        assert [u.name for u in prof.units] == [u.name for u in reference.units]
        for u, v in zip(prof.units, reference.units):
            assert u.curves.keys() == v.curves.keys()
            for kind in u.curves:
                assert torch.allclose(torch.from_numpy(u.curves[kind].error), torch.from_numpy(v.curves[kind].error),
                                      rtol=1e-6, atol=1e-12)
        for budget in BUDGETS:
            mine, theirs = prof.plan(budget), reference.plan(budget)
            assert [(u.name, u.kind, getattr(u.adapter, "rank", None)) for u in mine.units] == \
                   [(u.name, u.kind, getattr(u.adapter, "rank", None)) for u in theirs.units]
            assert mine.expected_flops() == pytest.approx(theirs.expected_flops(), rel=1e-9)


def test_mismatched_models_are_refused_on_every_rank(tmp_path):
    _run(tmp_path, "mismatch")
    for r in range(2):
        message = (tmp_path / f"error{r}.txt").read_text().splitlines()[0]
        assert message.startswith("RanapassError: the processes disagree on the model weights' fingerprint")
    assert _saved_profiles(tmp_path) == []


def test_a_dead_process_fails_the_others_clearly_and_nothing_is_saved(tmp_path):
    codes = _run(tmp_path, "dies")
    assert codes[1] == 3
    message = (tmp_path / "error0.txt").read_text().splitlines()[0]
    assert message.startswith("DistributedError: rank 0 of 2: combining")
    assert "Another process died or did not arrive within 20 s" in message
    assert _saved_profiles(tmp_path) == []


def test_python_dash_m_ranapass_runs_the_command_line():
    result = subprocess.run([sys.executable, "-m", "ranapass", "profile", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--device-map" in result.stdout


def test_one_process_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.init_from_env()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.gather_ordered([(2, "b"), (0, "a"), (2, "c")]) == ["a", "b", "c"]
    assert distributed.everyone(True) and not distributed.everyone(False)
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="RANAPASS_DIST_TIMEOUT must be a number"):
        distributed.timeout_seconds()

"""Statistics and candidates follow the model's device and dtype; profiles report time per stage and GPU memory."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ranapass import timing
from ranapass.calibrate import candidate_linears, collect
from ranapass.candidates import calibrated_sites
from ranapass.cli import main
from ranapass.hooks import forward_hooks
from ranapass.profiling import ProfileOptions, profile
from tiny_models import tiny_llama, token_windows


def _inputs_by_hand(model, windows, linears, batch_size):
    """Every input row each linear saw over ``windows`` (batched as calibration batches them), in float64."""
    seen = {name: [] for name in linears}

    def record(name):
        def pre(module, args):
            seen[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
        return pre

    with forward_hooks([(m.module, record(n)) for n, m in linears.items()], pre=True), torch.no_grad():
        for i in range(0, len(windows), batch_size):
            model(input_ids=windows[i:i + batch_size])
    return {n: torch.cat(rows) for n, rows in seen.items()}


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.bfloat16, 1e-5)])
def test_statistics_follow_the_weights_and_match_a_reference(dtype, rtol):
    model = tiny_llama().to(dtype)
    windows = token_windows(6, length=32)
    linears = candidate_linears(model)
    stats = collect(model, windows, linears=linears, batch_size=2, sample_tokens=60, rank_min_aspect=0.0,
                    gradient_data=windows[:2])
    inputs = _inputs_by_hand(model, windows, linears, 2)
    for site in stats.sites:
        weight = linears[site.members[0]].weight
        x = inputs[site.members[0]]
        assert site.gram.dtype == torch.float64 and site.gram.device == weight.device
        torch.testing.assert_close(site.gram, x.t() @ x, rtol=rtol, atol=rtol * float(x.square().sum(1).max()))
        assert site.tokens == x.shape[0] == 6 * 32
        # 3 batches of ceil(60 / 3) rows, each one of the inputs, kept in the activations' dtype
        assert [s.dtype for s in site.samples] == [dtype] * 3 and site.sample.shape == (60, x.shape[1])
        assert site.sample.dtype == torch.float32
        hits = (torch.cat(site.samples).double()[:, None, :] == x[None]).all(-1).any(1)
        assert bool(hits.all())
    for name, g in stats.grad_sq.items():
        assert g.dtype == torch.float64 and g.device == linears[name].weight.device
        assert g.shape == (linears[name].out_features,) and bool((g > 0).all())


def test_gradient_weights_match_a_reference():
    model = tiny_llama().double()
    windows = token_windows(3, length=64)
    linears = candidate_linears(model)
    stats = collect(model, windows, linears=linears, sample_tokens=8, gradient_data=windows)
    outputs = {}

    def keep(name):
        def fwd(module, args, out):
            out.retain_grad()
            outputs[name] = out
        return fwd

    sums = dict.fromkeys(linears, 0.0)
    with forward_hooks([(m.module, keep(n)) for n, m in linears.items()]):
        for w in windows:
            logits = model(input_ids=w[None]).logits[0, :-1].float()  # as the calibration's loss computes it
            torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").backward()
            for name, out in outputs.items():
                sums[name] = sums[name] + out.grad.reshape(-1, out.shape[-1]).square().sum(0)
    for name in linears:
        torch.testing.assert_close(stats.grad_sq[name], sums[name] / (3 * 64), rtol=1e-6, atol=1e-12)


def test_sampling_depends_on_the_seed_only():
    windows = token_windows(4, length=64)
    runs = []
    for dtype, seed in ((torch.float32, 0), (torch.float32, 0), (torch.float64, 0), (torch.float32, 1)):
        model = tiny_llama().to(dtype)
        stats = collect(model, windows, linears=candidate_linears(model), sample_tokens=10, seed=seed)
        runs.append(stats.sites[0].sample.double())
    assert torch.equal(runs[0], runs[1])
    torch.testing.assert_close(runs[0], runs[2], rtol=1e-5, atol=1e-6)  # same rows, other precision
    assert not torch.equal(runs[0], runs[3])


def test_candidates_release_the_statistics_and_keep_host_bases():
    model = tiny_llama().to(torch.bfloat16)
    linears = candidate_linears(model)
    stats = collect(model, token_windows(6), linears=linears, sample_tokens=64)
    watch = timing.Stopwatch()
    sites = calibrated_sites(stats, linears, "relative", 0.5, watch)
    assert all(s.gram is None and not s.samples for s in stats.sites)
    bases = [u.basis for s in sites for u in s.separate + ([s.stacked] if s.stacked else []) if u.basis is not None]
    assert bases and all(b.dtype == torch.float32 and b.device.type == "cpu" for b in bases)
    assert {"gram_factor", "output_pca", "rank_curves", "neuron_curves"} <= set(watch.seconds)


def test_stopwatch_nests_and_adds():
    watch = timing.Stopwatch([torch.device("cpu")])
    for _ in range(2):
        with watch.stage("outer"), watch.stage("inner"):
            pass
    assert list(watch.seconds) == ["outer", "outer.inner"]
    assert watch.seconds["outer"] >= watch.seconds["outer.inner"] >= 0.0


def test_peak_gpu_memory_reads_cuda_devices_only(monkeypatch):
    assert timing.peak_gpu_memory([torch.device("cpu")]) is None
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: {0: 5, 1: 7}[torch.device(d).index])
    assert timing.peak_gpu_memory([torch.device("cuda:0"), torch.device("cuda:1"), torch.device("cpu")]) == 7


def test_profile_meta_has_timings_and_peak_memory():
    options = ProfileOptions(sample_tokens=128, gradient_windows=2)
    meta = profile(tiny_llama(), token_windows(8), options=options, cache=False).meta
    timings = meta["timings"]
    for stage in ("statistics", "gradients", "candidates", "candidates.gram_factor", "candidates.output_pca",
                  "candidates.rank_curves", "candidates.neuron_curves"):
        assert timings[stage] >= 0.0
    assert meta["peak_gpu_memory_bytes"] is None and meta["devices"] == ["cpu"]  # no CUDA device here
    free = profile(tiny_llama(), None, cache=False).meta
    assert set(free["timings"]) == {"candidates"} and "peak_gpu_memory_bytes" in free


CALIB = ["--calib-windows", "10", "--calib-window-len", "32", "--error-weighting", "relative"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cli_profile_on_a_device_and_dtype(dtype, capsys, tiny_llama_dir, text_dir, isolated_cache):
    model = ["--model", str(tiny_llama_dir), "--text", str(text_dir), "--device", "cpu", "--dtype", dtype]
    assert main(["profile", *model, *CALIB, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["device"] == "cpu" and rep["dtype"] == dtype
    assert rep["meta"]["timings"]["statistics"] >= 0.0 and "peak_gpu_memory_bytes" in rep["meta"]
    assert all(math.isfinite(c["predicted_error"]) for c in rep["curve"])
    assert main(["profile", *model, *CALIB]) == 0
    out = capsys.readouterr().out
    assert f"on cpu in {dtype}" in out and "seconds by stage: statistics" in out


def test_cli_eval_and_plan_take_the_device_options(capsys, tiny_llama_dir, text_dir, isolated_cache):
    model = ["--model", str(tiny_llama_dir), "--text", str(text_dir), "--device", "cpu"]
    assert main(["eval", *model, "--dtype", "bf16", "--windows", "2", "--window-len", "16", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["dtype"] == "bfloat16" and math.isfinite(rep["dense"]["ppl"])
    assert main(["plan", *model, "--dtype", "float32", *CALIB, "--budget", "0.7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["expected_ratio"] <= 0.7


@pytest.mark.parametrize("device, message", [("gpu", "is not a device"), ("cuda", "no CUDA device")])
def test_cli_bad_device_is_a_clear_error(device, message, capsys, tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["eval", "--model", str(tiny_llama_dir), "--device", device]) == 2
    assert message in capsys.readouterr().err

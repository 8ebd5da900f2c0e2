"""LoRA rank compression: spectra from the factors, allocation, and adapters PEFT loads as written.

Adapters are built on a tiny random Llama with known spectra: every module's update is
``U diag(s) Vᵀ`` for random orthonormal U, V and chosen singular values s, hidden behind a random
invertible mixing of the factors, so the expected truncation error is known exactly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from ranapass.errors import RanapassError
from ranapass.lora import LoraFactors, calibrate_lora, compress_lora, load_lora, lora_spectrum
from tiny_models import tiny_llama, token_windows

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FP32 = dict(atol=1e-5, rtol=1e-5)


def set_known_spectra(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """Give every LoRA module of ``model`` the update U diag(s) Vᵀ; returns s per module path."""
    gen = torch.Generator().manual_seed(seed)
    spectra = {}
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        A, B = module.lora_A["default"].weight, module.lora_B["default"].weight  # A: [r, n], B: [m, r]
        r, n = A.shape
        m = B.shape[0]
        t = min(r, m, n)
        # Singular values with a module-dependent scale and a fast decay, like trained adapters, so
        # allocations differ across modules and a quarter of the ranks holds most of the energy.
        s = 0.05 + 0.2 * torch.rand(1, generator=gen)
        s = s * (0.2 + 0.4 * torch.rand(1, generator=gen)).pow(torch.arange(t, dtype=torch.float32))
        u = torch.linalg.qr(torch.randn(m, t, generator=gen))[0]
        v = torch.linalg.qr(torch.randn(n, t, generator=gen))[0]
        mix = torch.randn(t, t, generator=gen) + 3 * torch.eye(t)
        scale = module.scaling["default"]
        with torch.no_grad():
            B.zero_()
            A.zero_()
            B[:, :t] = (u * s) @ mix / scale
            A[:t] = torch.linalg.solve(mix, v.T)
        spectra[name.removeprefix("base_model.model.")] = s
    return spectra


def make_adapter(tmp_path, *, r: int = 8, targets=TARGETS, seed: int = 0, **lora_kwargs):
    """A PeftModel on the tiny Llama with known spectra, saved to ``tmp_path / 'adapter'``."""
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), **lora_kwargs)
    model = peft.get_peft_model(tiny_llama(), config).eval()
    spectra = set_known_spectra(model, seed)
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    return model, folder, spectra


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def default_adapter(tmp_path_factory):
    """The default adapter (rank 8 on every block linear), shared by the tests that only read it."""
    return make_adapter(tmp_path_factory.mktemp("lora"))


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------
# Spectra


@pytest.mark.parametrize("m,n,r", [(48, 32, 8), (16, 40, 8), (6, 40, 8), (40, 5, 8)])
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_spectrum_matches_svd_of_delta(m, n, r, scale):
    gen = torch.Generator().manual_seed(m * n)
    f = LoraFactors("x", "base_model.model.x", False, torch.randn(r, n, generator=gen),
                    torch.randn(m, r, generator=gen), scale)
    spec = lora_spectrum(f)
    delta = f.delta()
    torch.testing.assert_close(spec.values, torch.linalg.svdvals(delta)[: min(m, n, r)], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(spec.left.T @ spec.left, torch.eye(len(spec.values), dtype=torch.float64))
    for k in range(len(spec.values) + 1):
        b, a = spec.factors(k)
        err = (delta - b @ a).square().sum()
        expected = spec.values[k:].square().sum()
        torch.testing.assert_close(err, expected, atol=1e-9, rtol=1e-9)


def test_load_reads_known_spectra_and_scale(tmp_path):
    _, folder, spectra = make_adapter(tmp_path, use_rslora=True)
    adapter = load_lora(folder)
    assert {f.name for f in adapter.modules} == set(spectra)
    for f in adapter.modules:
        assert f.scale == pytest.approx(16 / math.sqrt(8))
        torch.testing.assert_close(lora_spectrum(f).values.float(), spectra[f.name], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Compression round trips through PEFT


@pytest.mark.parametrize("method", ["global", "threshold", "uniform"])
@pytest.mark.parametrize("lora_kwargs", [{}, {"use_rslora": True}, {"alpha_pattern": {"v_proj": 3}}],
                         ids=["plain", "rslora", "alpha_pattern"])
def test_keep_one_reproduces_outputs(tmp_path, ids, method, lora_kwargs):
    model, folder, _ = make_adapter(tmp_path, **lora_kwargs)
    result = compress_lora(folder, 1.0, method=method)
    assert result.params_after == result.params_before
    assert all(m.kept == m.rank for m in result.modules)
    out = result.adapter.save(tmp_path / "out")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), out).eval()
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), **FP32)


@pytest.mark.parametrize("method", ["global", "threshold", "uniform"])
def test_quarter_keeps_budget_and_known_error(tmp_path, ids, default_adapter, method):
    model, folder, spectra = default_adapter
    result = compress_lora(folder, 0.25, method=method)
    assert result.params_after <= 0.25 * result.params_before
    out = result.adapter.save(tmp_path / "out")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), out).eval()

    # Each module's update is the truncated SVD: the error is exactly the discarded energy.
    compressed = {f.name: f for f in load_lora(out).modules}
    for row, f in zip(result.modules, load_lora(folder).modules):
        kept = compressed[f.name].delta() if row.kept else torch.zeros(f.shape, dtype=torch.float64)
        err = (f.delta() - kept).square().sum().item()
        assert err == pytest.approx(spectra[f.name][row.kept:].double().square().sum().item(), rel=1e-4, abs=1e-9)
        if row.kept:
            lora_a = loaded.get_submodule(f"base_model.model.{f.name}").lora_A["default"].weight
            assert lora_a.shape[0] == row.kept

    # Outputs stay close: to first order the logit error grows as the root of the discarded energy share
    # (here 2-3% of the energy is discarded, and the error is under a third of what the adapter moves).
    full = logits(model, ids)
    moved = (logits(tiny_llama(), ids) - full).norm().item()
    error = (logits(loaded, ids) - full).norm().item()
    assert error < 2 * math.sqrt(1 - result.energy_kept) * moved


def test_global_discards_least_energy(tmp_path, default_adapter):
    _, folder, _ = default_adapter
    adapter = load_lora(folder)
    discarded = {}
    for method in ("global", "threshold", "uniform"):
        result = compress_lora(adapter, 0.3, method=method)
        assert result.params_after <= 0.3 * result.params_before
        discarded[method] = sum(m.energy * (1 - m.energy_kept) for m in result.modules)
    assert discarded["global"] <= discarded["threshold"] * (1 + 1e-9)
    assert discarded["global"] <= discarded["uniform"] * (1 + 1e-9)


def test_threshold_ignores_cost_per_rank():
    """Two modules with similar spectra, one 10x wider: PARA pays no heed to what a rank costs."""
    from ranapass.lora import LoraAdapter

    gen = torch.Generator().manual_seed(0)
    def module(name, m, n, s):
        u = torch.linalg.qr(torch.randn(m, 4, generator=gen, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(n, 4, generator=gen, dtype=torch.float64))[0]
        return LoraFactors(name, f"base_model.model.{name}", False, (v * s.sqrt()).T, u * s.sqrt(), 1.0)

    # A rank costs 16 parameters in "narrow", 160 in "wide"; 704 in all, the budget is 0.4 x 704 = 281.6.
    adapter = LoraAdapter({"peft_type": "LORA", "r": 4, "lora_alpha": 4}, [
        module("narrow", 8, 8, torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)),
        module("wide", 80, 80, torch.tensor([4.5, 3.5, 2.5, 1.5], dtype=torch.float64)),
    ])
    threshold = compress_lora(adapter, 0.4, method="threshold")
    best = compress_lora(adapter, 0.4, method="global")
    assert [m.kept for m in threshold.modules] == [1, 1]  # 4.5 and 4.0 cost 176; 3.5 would reach 336
    assert [m.kept for m in best.modules] == [4, 1]  # 224 parameters
    assert best.energy_kept > threshold.energy_kept


def test_rank_zero_modules_are_dropped(tmp_path, default_adapter, ids):
    model, folder, _ = default_adapter
    result = compress_lora(folder, 0.05, method="global")
    dropped = [m.name for m in result.modules if m.kept == 0]
    assert dropped, "the budget should leave some module at rank 0"
    out = result.adapter.save(tmp_path / "out")
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(m.name for m in result.modules if m.kept)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), out).eval()
    for name in dropped:
        assert not hasattr(loaded.get_submodule(f"base_model.model.{name}"), "lora_A")
    assert torch.isfinite(logits(loaded, ids)).all()


def test_flops_target_counts_embedding_a_as_lookup(tmp_path):
    _, folder, _ = make_adapter(tmp_path, targets=["embed_tokens", "q_proj"])
    adapter = load_lora(folder)
    embedding = next(f for f in adapter.modules if f.embedding)
    assert embedding.shape == (64, 256)  # B: [embedding_dim, r], A: [r, num_embeddings]
    assert embedding.cost_per_rank("params") == 320 and embedding.cost_per_rank("flops") == 128
    result = compress_lora(adapter, 0.5, target="flops")
    assert result.cost_after <= 0.5 * result.cost_before


def test_embedding_lora_round_trip(tmp_path, ids):
    model, folder, _ = make_adapter(tmp_path, targets=["embed_tokens", "q_proj", "down_proj"])
    out = compress_lora(folder, 1.0).adapter.save(tmp_path / "out")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), out).eval()
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), **FP32)


def test_compressed_adapter_compresses_again(tmp_path, ids, default_adapter):
    """The output's rank_pattern/alpha_pattern are read back: keep=1.0 on it reproduces it."""
    _, folder, _ = default_adapter
    once = compress_lora(folder, 0.5).adapter.save(tmp_path / "once")
    again = compress_lora(once, 1.0).adapter.save(tmp_path / "again")
    first = peft.PeftModel.from_pretrained(tiny_llama(), once).eval()
    second = peft.PeftModel.from_pretrained(tiny_llama(), again).eval()
    torch.testing.assert_close(logits(second, ids), logits(first, ids), **FP32)


def test_in_memory_peft_model_matches_folder(tmp_path, default_adapter):
    model, folder, _ = default_adapter
    from_model = compress_lora(model, 0.25)
    from_folder = compress_lora(folder, 0.25)
    assert [m.kept for m in from_model.modules] == [m.kept for m in from_folder.modules]
    for a, b in zip(from_model.adapter.modules, from_folder.adapter.modules):
        torch.testing.assert_close(a.delta(), b.delta())


def test_input_is_not_changed(tmp_path, default_adapter):
    _, folder, _ = default_adapter
    adapter = load_lora(folder)
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    config = dict(adapter.config)
    compress_lora(adapter, 0.25)
    assert adapter.config == config
    for k, v in adapter.state_dict().items():
        assert torch.equal(v, before[k])


# ---------------------------------------------------------------------------------------------
# Calibrated (output-error) compression


def test_whitened_spectrum_is_output_error():
    gen = torch.Generator().manual_seed(3)
    m, n, r = 24, 40, 8
    f = LoraFactors("x", "base_model.model.x", False, torch.randn(r, n, generator=gen),
                    torch.randn(m, r, generator=gen), 0.5)
    x = torch.randn(400, n, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, n, dtype=torch.float64)
    gram = x.T @ x / len(x)
    whiten = torch.linalg.cholesky(gram)
    plain, spec = lora_spectrum(f), lora_spectrum(f, whiten)
    delta = f.delta()
    def output_error(b, a) -> float:  # E‖(ΔW - B'A') x‖²
        return (x @ (delta - b @ a).T).square().sum(1).mean().item()

    for k in range(r + 1):
        err = output_error(*spec.factors(k))
        assert err == pytest.approx(spec.values[k:].square().sum().item(), rel=1e-9, abs=1e-12)
        assert err <= output_error(*plain.factors(k)) + 1e-12  # the whitened truncation is optimal for outputs


def test_output_error_round_trip(tmp_path, ids, default_adapter):
    model, folder, _ = default_adapter
    calibration = calibrate_lora(folder, tiny_llama(), token_windows(8), batch_size=4)
    assert calibration.tokens == 8 * 64
    # q, k and v read the same input: one statistic.
    layer = "model.layers.0.self_attn"
    assert calibration.whiten[f"{layer}.q_proj"] is calibration.whiten[f"{layer}.v_proj"]
    full = compress_lora(folder, 1.0, error="output", calibration=calibration)
    out = full.adapter.save(tmp_path / "full")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), out).eval()
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), **FP32)
    quarter = compress_lora(folder, 0.25, error="output", calibration=calibration)
    assert quarter.params_after <= 0.25 * quarter.params_before


def test_calibrating_a_peft_model_leaves_it_as_it_was(default_adapter, ids):
    model, folder, _ = default_adapter
    before = logits(model, ids)
    calibrate_lora(folder, model, token_windows(8), gradient_data=token_windows(2))
    assert not model.base_model.model.model.layers[0].self_attn.q_proj.disable_adapters  # enabled again
    torch.testing.assert_close(logits(model, ids), before)  # no hook left behind
    assert not torch.allclose(before, logits(tiny_llama(), ids))


def test_failed_calibration_leaves_no_hook(default_adapter):
    _, folder, _ = default_adapter
    base = tiny_llama()
    with pytest.raises(ValueError, match="empty"):
        calibrate_lora(folder, base, token_windows(8)[:0])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())


def test_output_error_needs_the_base_model(tmp_path, default_adapter):
    _, folder, _ = default_adapter
    with pytest.raises(RanapassError, match="not the adapter's base model"):
        calibrate_lora(folder, tiny_llama(hidden=32, intermediate=80), token_windows(8))
    with pytest.raises(RanapassError, match="needs a calibration"):
        compress_lora(folder, 0.25, error="output")
    _, with_embedding, _ = make_adapter(tmp_path, targets=["embed_tokens", "q_proj"])
    with pytest.raises(RanapassError, match="data-free only"):
        calibrate_lora(with_embedding, tiny_llama(), token_windows(8))


# ---------------------------------------------------------------------------------------------
# Loss-calibrated (fisher) compression


def random_factors(m: int, n: int, r: int, seed: int, name: str = "x") -> LoraFactors:
    gen = torch.Generator().manual_seed(seed)
    return LoraFactors(name, f"base_model.model.{name}", False, torch.randn(r, n, generator=gen, dtype=torch.float64),
                       torch.randn(m, r, generator=gen, dtype=torch.float64), 0.5)


@pytest.mark.parametrize("m,n,r", [(24, 40, 8), (40, 12, 8), (6, 30, 8)])
def test_fisher_spectrum_is_the_weighted_optimum(m, n, r):
    """Truncating the spectrum of G^½ ΔW L gives the rank-k optimum of ‖G^½ (ΔW - X) L‖²_F (Eckart-Young on
    the dense matrix), and its discarded energy is that error."""
    f = random_factors(m, n, r, seed=m + n)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(500, n, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, n, dtype=torch.float64)
    whiten = torch.linalg.cholesky(x.T @ x / len(x))
    weight = torch.rand(m, generator=gen, dtype=torch.float64).pow(4) * 10  # scales over orders of magnitude
    spec = lora_spectrum(f, whiten, weight)
    root = weight.sqrt()[:, None]
    dense = root * f.delta() @ whiten  # G^½ ΔW L
    u, s, vh = torch.linalg.svd(dense)
    torch.testing.assert_close(spec.values, s[: len(spec.values)], atol=1e-10, rtol=1e-10)
    for k in range(len(spec.values) + 1):
        b, a = spec.factors(k)
        best = u[:, :k] * s[:k] @ vh[:k] / root  # G^-½ [G^½ ΔW L]_k, then right-solve by L
        torch.testing.assert_close(b @ a, torch.linalg.solve_triangular(whiten, best, upper=False, left=False),
                                   atol=1e-9, rtol=1e-7)
        err = (root * (f.delta() - b @ a) @ whiten).square().sum()
        torch.testing.assert_close(err, s[k:].square().sum(), atol=1e-9, rtol=1e-9)


def test_global_fisher_follows_the_gradient_scale():
    """Two identical modules, one whose outputs the loss is 100x as sensitive to: uniform truncation gives them
    the same rank, the global allocation moves ranks to the sensitive one and predicts a smaller loss change."""
    from ranapass.lora import LoraAdapter, LoraCalibration

    modules = [random_factors(32, 32, 8, seed=0, name="quiet"), random_factors(32, 32, 8, seed=0, name="loud")]
    eye = torch.eye(32, dtype=torch.float64)
    calibration = LoraCalibration({"quiet": eye, "loud": eye}, {"quiet": 1.0, "loud": 1.0}, tokens=100,
                                  grad_sq={"quiet": torch.full((32,), 1e-4, dtype=torch.float64),
                                           "loud": torch.full((32,), 1e-2, dtype=torch.float64)})
    adapter = LoraAdapter({"peft_type": "LORA", "r": 8, "lora_alpha": 8}, modules)
    best = compress_lora(adapter, 0.5, error="fisher", calibration=calibration)
    uniform = compress_lora(adapter, 0.5, method="uniform", error="fisher", calibration=calibration)
    assert [m.kept for m in uniform.modules] == [4, 4]
    quiet, loud = (m.kept for m in best.modules)
    assert loud > quiet and quiet + loud <= 8
    assert best.predicted_loss_change < 0.5 * uniform.predicted_loss_change
    # The prediction is half the weighted error of the truncated update, measured densely.
    kept = {g.name: g.delta() for g in best.adapter.modules}
    expected = sum(0.5 * float(calibration.grad_sq[f.name][0] * (f.delta() - kept.get(f.name, 0)).square().sum())
                   for f in modules)
    assert best.predicted_loss_change == pytest.approx(expected, rel=1e-5)  # FISHER_RIDGE adds 1e-6


def test_fisher_calibration_measures_the_fine_tuned_model(default_adapter):
    """Inputs and output gradients are those of the PeftModel with its adapter enabled, whether the base model
    or the PeftModel is passed (the adapter is applied by hooks on the base linears)."""
    from ranapass.calibrate import collect
    from ranapass.linear_match import linear_module

    model, folder, _ = default_adapter
    windows = token_windows(8)
    from_base = calibrate_lora(folder, tiny_llama(), windows, gradient_data=windows[:4])
    from_peft = calibrate_lora(folder, model, windows, gradient_data=windows[:4])
    linears = {name.removeprefix("base_model.model.").removesuffix(".base_layer"): linear_module(module)
               for name, module in model.named_modules() if name.endswith("base_layer")}
    enabled = collect(model.get_base_model(), windows, linears=linears, sample_tokens=0, rank_min_aspect=0.0,
                      gradient_data=windows[:4])
    assert set(from_base.grad_sq) == set(linears)
    for site in enabled.sites:
        for name in site.members:
            for calibration in (from_base, from_peft):
                L = calibration.whiten[name]
                torch.testing.assert_close(L @ L.T, site.gram / site.tokens, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(calibration.grad_sq[name], enabled.grad_sq[name], atol=0, rtol=1e-4)
            assert (from_base.grad_sq[name] > 0).all()


def test_fisher_round_trip(tmp_path, ids, default_adapter):
    model, folder, _ = default_adapter
    windows = token_windows(8)
    calibration = calibrate_lora(folder, tiny_llama(), windows, gradient_data=windows)
    full = compress_lora(folder, 1.0, error="fisher", calibration=calibration)
    assert full.predicted_loss_change == pytest.approx(0.0, abs=1e-12)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), full.adapter.save(tmp_path / "full")).eval()
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), **FP32)
    for method in ("global", "uniform"):
        quarter = compress_lora(folder, 0.25, method=method, error="fisher", calibration=calibration)
        assert quarter.params_after <= 0.25 * quarter.params_before
        assert quarter.predicted_loss_change > 0
        assert "predicted loss change" in quarter.summary()


def test_fisher_needs_gradients(default_adapter):
    _, folder, _ = default_adapter
    calibration = calibrate_lora(folder, tiny_llama(), token_windows(8))
    assert calibration.grad_sq == {}
    with pytest.raises(RanapassError, match="pass gradient_data"):
        compress_lora(folder, 0.25, error="fisher", calibration=calibration)
    with pytest.raises(RanapassError, match="needs a calibration"):
        compress_lora(folder, 0.25, error="fisher")


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("kwargs,match", [
    ({"keep": 0.0}, "keep must be in"),
    ({"keep": 1.5}, "keep must be in"),
    ({"method": "para"}, "method must be one of"),
    ({"target": "bytes"}, "target must be one of"),
    ({"error": "l1"}, "error must be one of"),
])
def test_bad_arguments(tmp_path, default_adapter, kwargs, match):
    _, folder, _ = default_adapter
    with pytest.raises(RanapassError, match=match):
        compress_lora(folder, **{"keep": 0.25, **kwargs})


def test_a_method_added_to_the_table_is_used(monkeypatch, default_adapter):
    from ranapass.lora.compression import RANK_METHODS, RankMethod

    def first_module_only(problem):
        return [problem.modules[0].rank] + [0] * (len(problem.modules) - 1)

    monkeypatch.setitem(RANK_METHODS, "first", RankMethod(first_module_only, lambda problem: "never"))
    result = compress_lora(default_adapter[1], 0.5, method="first")
    kept = [m.kept for m in result.modules]
    assert kept == [result.modules[0].rank] + [0] * (len(kept) - 1)
    assert [f.name for f in result.adapter.modules] == [result.modules[0].name]


def test_keep_too_small(tmp_path, default_adapter):
    _, folder, _ = default_adapter
    with pytest.raises(RanapassError, match="leaves no rank"):
        compress_lora(folder, 1e-6)


def test_dora_is_refused(tmp_path):
    _, folder, _ = make_adapter(tmp_path, use_dora=True)
    with pytest.raises(RanapassError, match="DoRA"):
        load_lora(folder)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_lora(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safe_serialization"):
        load_lora(tmp_path)


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_writes_adapter_and_json(tmp_path, default_adapter, capsys, ids):
    from ranapass.cli import main

    model, folder, _ = default_adapter
    out = tmp_path / "out"
    assert main(["lora-compress", str(folder), "--keep", "1", "--out", str(out), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["params_after"] == payload["params_before"] == load_lora(folder).num_parameters
    assert len(payload["modules"]) == 14 and payload["out"] == str(out)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), out).eval()
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), **FP32)


def test_cli_table_and_errors(tmp_path, default_adapter, capsys):
    from ranapass.cli import main

    _, folder, _ = default_adapter
    assert main(["lora-compress", str(folder), "--keep", "0.25", "--method", "uniform"]) == 0
    text = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in text and "LoRA parameters: 17,920 -> 4,480 (25.00%)" in text
    assert not (tmp_path / "out").exists()
    for argv, message in [(["--keep", "1.5"], "keep must be in"),
                          (["--out", str(folder)], "must differ"),
                          (["--error", "output"], "the adapter names none, pass --model")]:
        assert main(["lora-compress", str(folder), *argv]) == 2
        assert message in capsys.readouterr().err


def test_uniform_below_one_rank_says_why(default_adapter):
    _, folder, _ = default_adapter
    with pytest.raises(RanapassError, match="at least 1/8"):
        compress_lora(folder, 0.1, method="uniform")


@pytest.mark.parametrize("error", ["output", "fisher"])
def test_cli_calibrated_error_on_the_base_model(tmp_path, capsys, tiny_llama_dir, text_dir, error):
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)).eval()
    set_known_spectra(model)
    model.save_pretrained(tmp_path / "adapter")  # records base_model_name_or_path = tiny_llama_dir
    out = tmp_path / "out"
    argv = ["lora-compress", str(tmp_path / "adapter"), "--keep", "0.5", "--error", error, "--out", str(out),
            "--text", str(text_dir), "--calib-windows", "4", "--calib-window-len", "16", "--json"]
    from ranapass.cli import main

    assert main(argv) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["error"] == error and payload["params_after"] <= 0.5 * payload["params_before"]
    assert (payload["predicted_loss_change"] is None) == (error == "output")
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    assert len(peft.PeftModel.from_pretrained(fresh, out).peft_config["default"].rank_pattern) > 0

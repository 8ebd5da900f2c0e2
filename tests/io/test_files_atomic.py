"""Every file ranapass writes is atomic and verified: a SIGKILL mid-save, a flipped bit, a changed weight, files
from two saves. Caches report, discard and rebuild a damaged entry; a damaged plan or adapter is a clear error."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ranapass import storage
from ranapass.errors import RanapassError
from ranapass.lora import load_lora
from ranapass.manifest import MANIFEST, DamagedFileError
from ranapass.plan import PLAN_FORMAT, Plan
from ranapass.profiling import PROFILE_FORMAT
from plan_damage import bad_shape, drop_key, drop_tensor, first_adapted, nan_thresholds, resave, swap_kinds
from save_child import fake_gguf, prose_root, tiny_lora, tiny_plan, tiny_profile

pytestmark = pytest.mark.slow  # kills child processes mid-save: seconds per test

CHILD = Path(__file__).parents[1] / "save_child.py"


def kill_mid_save(kind: str, stage: str, work: Path, tiny_dir: Path) -> None:
    """Run the child save of ``kind``, wait until it stalls at ``stage``, SIGKILL it."""
    child = subprocess.Popen([sys.executable, str(CHILD), kind, stage, str(work), str(tiny_dir)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (work / "stalled").exists():
        if child.poll() is not None:
            pytest.fail(f"the child ended before stalling: {child.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, "the child never reached the stall"
        time.sleep(0.1)
    child.send_signal(signal.SIGKILL)
    assert child.wait(60) == -signal.SIGKILL


def thresholds(plan: Plan) -> list[torch.Tensor]:
    return [u.adapter.thresholds for u in plan.adapted]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------- SIGKILL
@pytest.mark.parametrize("stage", ["writing", "renaming"])
def test_killed_plan_save_leaves_the_old_plan_or_a_clear_error(stage, tmp_path, tiny_llama_dir):
    kill_mid_save("plan", stage, tmp_path, tiny_llama_dir)
    if stage == "writing":  # nothing renamed yet: the old plan is intact
        assert same(thresholds(Plan.load(tmp_path / "plan")), thresholds(tiny_plan(0)))
    else:  # plan.json replaced, the tensors not yet: the mix is refused, naming the file
        with pytest.raises(DamagedFileError, match="plan.json (has|does not match).* manifest"):
            Plan.load(tmp_path / "plan")
    tiny_plan(1).save(tmp_path / "plan")  # the next save recovers
    assert same(thresholds(Plan.load(tmp_path / "plan")), thresholds(tiny_plan(1)))


@pytest.mark.parametrize("stage", ["writing", "renaming"])
def test_killed_lora_save_leaves_the_old_adapter_or_a_clear_error(stage, tmp_path, tiny_llama_dir):
    kill_mid_save("lora", stage, tmp_path, tiny_llama_dir)
    # At "renaming" only adapter_config.json was replaced, by the same bytes: the old adapter is whole.
    assert torch.equal(load_lora(tmp_path / "lora").modules[0].A, tiny_lora(0).modules[0].A)
    tiny_lora(1).save(tmp_path / "lora")
    assert torch.equal(load_lora(tmp_path / "lora").modules[0].A, tiny_lora(1).modules[0].A)


def test_killed_profile_cache_save_is_rebuilt(tmp_path, tiny_llama_dir):
    kill_mid_save("profile", "writing", tmp_path, tiny_llama_dir)
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]  # no entry
    first = tiny_profile(tmp_path)
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / MANIFEST).is_file()
    assert json.dumps(tiny_profile(tmp_path).meta) == json.dumps(first.meta)  # read back from the cache


def test_killed_model_cache_save_is_rebuilt(tmp_path, tiny_llama_dir, monkeypatch):
    from ranapass.models import load_model

    kill_mid_save("model", "writing", tmp_path, tiny_llama_dir)
    monkeypatch.setenv("RANAPASS_CACHE", str(tmp_path / "cache"))
    model, _ = load_model(fake_gguf(tmp_path, str(tiny_llama_dir)))
    assert torch.equal(model.lm_head.weight, load_file(tiny_llama_dir / "model.safetensors")["lm_head.weight"])


def test_killed_text_cache_save_is_rebuilt(tmp_path, tiny_llama_dir, monkeypatch):
    from ranapass.data import _cached_prose

    kill_mid_save("text", "writing", tmp_path, tiny_llama_dir)
    monkeypatch.setenv("RANAPASS_CACHE", str(tmp_path / "cache"))
    docs = _cached_prose("pages", prose_root(tmp_path))
    assert len(docs) == 3 and _cached_prose("pages", prose_root(tmp_path)) == docs


# ------------------------------------------------------------------------------------------- damaged caches
def _flip_byte(path: Path, offset_from_end: int = 16) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_bit_in_cached_profile_is_reported_and_rebuilt(tmp_path, caplog):
    first = tiny_profile(tmp_path)
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    _flip_byte(entry / "profile.safetensors")
    with caplog.at_level(logging.WARNING, logger="ranapass.cache"):
        again = tiny_profile(tmp_path)
    (record,) = [r for r in caplog.records if "damaged" in r.getMessage()]
    assert "profile.safetensors does not match its manifest" in record.getMessage()
    assert again.plan(0.6, fit=False).summary() == first.plan(0.6, fit=False).summary()
    storage.read(entry, PROFILE_FORMAT)


def test_no_cache_repairs_a_damaged_profile_entry(tmp_path):
    from ranapass.profiling import ProfileOptions, profile
    from save_child import PROFILE_OPTIONS
    from tiny_models import tiny_llama, token_windows

    tiny_profile(tmp_path)
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    (entry / "profile.json").write_text("{trunc")
    profile(tiny_llama(), token_windows(8, length=32), options=ProfileOptions(**PROFILE_OPTIONS),
            cache=tmp_path / "cache", refresh=True)
    storage.read(entry, PROFILE_FORMAT)


@pytest.mark.parametrize("damage", ["changed weight", "truncated"])
def test_damaged_cached_model_is_reported_and_rebuilt(damage, tmp_path, tiny_llama_dir, monkeypatch, caplog):
    from ranapass.models import load_model

    monkeypatch.setenv("RANAPASS_CACHE", str(tmp_path / "cache"))
    gguf = fake_gguf(tmp_path, str(tiny_llama_dir))
    load_model(gguf)
    (entry,) = (tmp_path / "cache" / "models").iterdir()
    weights = entry / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        _flip_byte(weights, 1000)
    with caplog.at_level(logging.WARNING, logger="ranapass.cache"):
        model, _ = load_model(gguf)
    assert any("damaged" in r.getMessage() and "model.safetensors" in r.getMessage() for r in caplog.records)
    want = load_file(tiny_llama_dir / "model.safetensors")
    assert all(torch.equal(p, want[n]) for n, p in model.state_dict().items() if n in want)


# ------------------------------------------------------------------------------------------- damaged plans
@pytest.mark.parametrize("edit, message", [
    (nan_thresholds, "NaN or negative thresholds"),
    (swap_kinds, "the JSON and the tensors do not match"),
    (drop_tensor, "the JSON and the tensors do not match"),
    (drop_key, "lacks 'in_features'"),
    (bad_shape, "is not a valid plan"),
])
def test_inconsistent_plans_are_refused(edit, message, tmp_path):
    tiny_plan(0).save(tmp_path / "plan")
    resave(tmp_path / "plan", edit)
    with pytest.raises(RanapassError, match=message):
        Plan.load(tmp_path / "plan")


def test_plan_with_nan_thresholds_is_not_saved(tmp_path):
    plan = tiny_plan(0)
    plan.adapted[0].adapter.thresholds[0] = float("nan")
    with pytest.raises(RanapassError, match="NaN or negative thresholds"):
        plan.save(tmp_path / "plan")
    assert not (tmp_path / "plan").exists()


def test_plan_folder_mixing_two_saves_is_refused(tmp_path):
    tiny_plan(0).save(tmp_path / "a")
    tiny_plan(1).save(tmp_path / "b")
    (tmp_path / "a" / "tensors.safetensors").write_bytes((tmp_path / "b" / "tensors.safetensors").read_bytes())
    with pytest.raises(DamagedFileError, match="tensors.safetensors does not match its manifest"):
        Plan.load(tmp_path / "a")


def test_adapter_written_elsewhere_without_manifest_still_loads_and_damage_names_the_file(tmp_path):
    tiny_lora(0).save(tmp_path / "lora")
    (tmp_path / "lora" / MANIFEST).unlink()  # as PEFT writes it
    assert load_lora(tmp_path / "lora").modules[0].rank == 4
    weights = tmp_path / "lora" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    with pytest.raises(RanapassError, match="adapter_model.safetensors is not a readable safetensors file"):
        load_lora(tmp_path / "lora")
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"r": 4})[:-2])
    with pytest.raises(RanapassError, match="adapter_config.json is not valid JSON"):
        load_lora(tmp_path / "lora")


def test_a_fresh_cache_entry_is_not_reported_damaged(tmp_path, monkeypatch, caplog):
    """The first profile into an empty cache builds its entry quietly: nothing there yet is nothing damaged."""
    from ranapass.profiling import ProfileOptions, profile
    from save_child import PROFILE_OPTIONS
    from tiny_models import tiny_llama, token_windows

    monkeypatch.setenv("RANAPASS_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="ranapass"):
        profile(tiny_llama(), token_windows(8, length=32), options=ProfileOptions(**PROFILE_OPTIONS))
    assert not [r for r in caplog.records if "damaged" in r.getMessage()]
    (entry,) = (tmp_path / "cache" / "profiles").iterdir()
    storage.read(entry, PROFILE_FORMAT)

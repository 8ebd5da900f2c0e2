"""Ways to damage a saved plan consistently (the manifest matches, the content is wrong): what loading must refuse."""

from __future__ import annotations

from pathlib import Path

from ranapass import storage
from ranapass.plan import PLAN_FORMAT


def resave(folder: Path, edit) -> None:
    """Rewrite a saved plan through ``edit(doc, tensors)`` with a manifest that matches (a consistent but bad plan)."""
    doc, tensors = storage.read(folder, PLAN_FORMAT)
    edit(doc, tensors)
    for key in ("_type", "_version"):
        doc.pop(key)
    storage.write(folder, PLAN_FORMAT, doc, tensors)


def first_adapted(doc: dict) -> tuple[int, dict]:
    return next((i, u) for i, u in enumerate(doc["units"]) if u["adapter"] is not None)


def nan_thresholds(doc, tensors):
    i, _ = first_adapted(doc)
    tensors[f"{i}.thresholds"][0] = float("nan")


def swap_kinds(doc, tensors):
    i, unit = first_adapted(doc)
    unit["adapter"]["kind"] = "neuron" if unit["adapter"]["kind"] == "rank" else "rank"


def drop_tensor(doc, tensors):
    i, _ = first_adapted(doc)
    del tensors[f"{i}.thresholds"]


def drop_key(doc, tensors):
    del doc["units"][0]["in_features"]


def bad_shape(doc, tensors):
    i, _ = first_adapted(doc)
    tensors[f"{i}.thresholds"] = tensors[f"{i}.thresholds"][:-1].clone()

"""Versioned folders: one JSON document and one safetensors file, the only code that touches them.

Plans and profiles persist as a folder holding a JSON document (tagged with ``_type`` and
``_version``, no pickle) and a safetensors file of named tensors. Reading checks the tag against the
expected ``Format`` and says what to do when it does not match.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ranapass.errors import RanapassError

__all__ = ["Format", "exists", "write", "read"]


@dataclasses.dataclass(frozen=True)
class Format:
    """What a saved folder holds.

    Args:
        type: the ``_type`` tag, e.g. ``"ranapass.Plan"``.
        version: the ``_version`` this ranapass reads and writes.
        document: file name of the JSON document, e.g. ``"plan.json"``.
        tensors: file name of the safetensors file.
        remedy: what the user should do with a folder of another version, e.g. "re-plan from the profile".
    """

    type: str
    version: int
    document: str
    tensors: str
    remedy: str

    @property
    def noun(self) -> str:
        return self.type.rsplit(".", 1)[-1]


def exists(folder: str | os.PathLike, fmt: Format) -> bool:
    """Whether ``folder`` holds a document of this format (``write`` writes it after the tensors)."""
    return (Path(folder) / fmt.document).is_file()


def write(folder: str | os.PathLike, fmt: Format, doc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``doc`` (JSON-able, tagged here with type and version) and ``tensors`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / fmt.tensors))
    tagged = {"_type": fmt.type, "_version": fmt.version, **doc}
    (folder / fmt.document).write_text(json.dumps(tagged, indent=1))
    return folder


def read(folder: str | os.PathLike, fmt: Format) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read what ``write`` wrote: the document (tags included) and the tensors.

    Raises:
        RanapassError: ``folder`` lacks the document or the tensors, or
            the document is not JSON, or of another type or version.
    """
    folder = Path(folder)
    path = folder / fmt.document
    if not path.is_file():
        raise RanapassError(f"{folder} holds no {fmt.document}: pass the directory given to {fmt.noun}.save")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RanapassError(f"{path} is not valid JSON ({e}): {fmt.remedy}") from e
    if not isinstance(doc, dict) or doc.get("_type") != fmt.type:
        found = doc.get("_type") if isinstance(doc, dict) else None
        raise RanapassError(f"{path} is not a {fmt.type} (_type={found!r}): pass a folder written by {fmt.noun}.save")
    if doc.get("_version") != fmt.version:
        raise RanapassError(f"{folder} is {fmt.noun.lower()} version {doc.get('_version')}, this ranapass reads "
                            f"version {fmt.version}: {fmt.remedy}")
    tensors_path = folder / fmt.tensors
    if not tensors_path.is_file():
        raise RanapassError(f"{folder} holds {fmt.document} but no {fmt.tensors}: {fmt.remedy}")
    return doc, load_file(str(tensors_path))

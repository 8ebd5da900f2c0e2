"""Versioned folders: one JSON document, one safetensors file and their manifest, the only code that touches them.

Plans and profiles persist as a folder holding a JSON document (tagged with ``_type`` and
``_version``, no pickle), a safetensors file of named tensors and ``manifest.json`` (each file's size
and hash, :mod:`ranapass.manifest`). Writing is atomic per file and the manifest goes last; reading
checks the manifest first, then the tag against the expected ``Format``, and every error names the
file, what is wrong and what to do. :func:`parsing` turns a malformed document (a missing key, a
wrong type) into such an error too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ranapass import manifest
from ranapass.errors import RanapassError

__all__ = ["Format", "write", "read", "parsing", "load_tensors", "load_json"]


@dataclasses.dataclass(frozen=True)
class Format:
    """What a saved folder holds.

    Args:
        type: the ``_type`` tag, e.g. ``"ranapass.Plan"``.
        version: the ``_version`` this ranapass reads and writes.
        document: file name of the JSON document, e.g. ``"plan.json"``.
        tensors: file name of the safetensors file.
        remedy: what the user should do with a folder that cannot be read, e.g. "re-plan from the profile".
    """

    type: str
    version: int
    document: str
    tensors: str
    remedy: str

    @property
    def noun(self) -> str:
        return self.type.rsplit(".", 1)[-1]


def write(folder: str | os.PathLike, fmt: Format, doc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``doc`` (JSON-able, tagged here with type and version) and ``tensors`` into ``folder``, atomically."""
    folder = Path(folder)
    tagged = {"_type": fmt.type, "_version": fmt.version, **doc}
    text = json.dumps(tagged, indent=1)
    with manifest.write_folder(folder) as staging:
        save_file(tensors, str(staging / fmt.tensors))
        (staging / fmt.document).write_text(text)
    return folder


def load_json(path: Path, remedy: str) -> Any:
    """The JSON in ``path``; a file that is not JSON is an error naming it."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RanapassError(f"{path} is not valid JSON ({e}): {remedy}") from e


def load_tensors(path: Path, remedy: str) -> dict[str, torch.Tensor]:
    """The tensors in safetensors file ``path``; a truncated or damaged file is an error naming it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise RanapassError(f"{path} is not a readable safetensors file (truncated or damaged? {e}): "
                            f"{remedy}") from e


def read(folder: str | os.PathLike, fmt: Format) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read what ``write`` wrote: the document (tags included) and the tensors.

    Raises:
        RanapassError: ``folder`` lacks a file, a file does not match the manifest (truncated, changed,
            from another save), the document is not JSON, or of another type or version.
    """
    folder = Path(folder)
    path = folder / fmt.document
    if not path.is_file():
        why = "" if folder.is_dir() else " (it is a file, not a folder)" if folder.exists() else " (no such folder)"
        raise RanapassError(f"{folder} holds no {fmt.document}{why}: pass the directory given to {fmt.noun}.save")
    tensors_path = folder / fmt.tensors
    if not tensors_path.is_file():
        raise RanapassError(f"{folder} holds {fmt.document} but no {fmt.tensors}: {fmt.remedy}")
    try:
        manifest.verify(folder)
    except manifest.DamagedFileError as e:
        raise manifest.DamagedFileError(f"{e}: {fmt.remedy}") from e
    doc = load_json(path, fmt.remedy)
    if not isinstance(doc, dict) or doc.get("_type") != fmt.type:
        found = doc.get("_type") if isinstance(doc, dict) else None
        raise RanapassError(f"{path} is not a {fmt.type} (_type={found!r}): pass a folder written by {fmt.noun}.save")
    if doc.get("_version") != fmt.version:
        raise RanapassError(f"{folder} is {fmt.noun.lower()} version {doc.get('_version')}, this ranapass reads "
                            f"version {fmt.version}: {fmt.remedy}")
    return doc, load_tensors(tensors_path, fmt.remedy)


@contextlib.contextmanager
def parsing(folder: str | os.PathLike, fmt: Format) -> Iterator[None]:
    """Turn a malformed document or tensor set met while building objects from ``read``'s output into one
    ``RanapassError`` naming the folder (a missing key, a wrong type or shape, a tensor of another kind)."""
    try:
        yield
    except RanapassError:
        raise
    except KeyError as e:
        raise RanapassError(f"{folder} is not a complete {fmt.noun.lower()}: {fmt.document} or {fmt.tensors} "
                            f"lacks {e}: {fmt.remedy}") from e
    except (TypeError, ValueError, AttributeError, IndexError) as e:
        raise RanapassError(f"{folder} is not a valid {fmt.noun.lower()} ({type(e).__name__}: {e}): "
                            f"{fmt.remedy}") from e

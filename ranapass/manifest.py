"""Manifests: the size and content hash of every file ranapass writes, recorded beside it and checked on load.

Every folder ranapass writes (plans, profiles, the model and text caches, LoRA adapters) goes through
:func:`write_folder`: the files are written under temporary names, ``manifest.json`` records each one's
size and blake2b digest, and only then are they renamed into place, the manifest last. A new folder
appears whole, by one rename. In an existing folder the files are replaced one by one, so a save
killed half-way leaves complete files that do not match the manifest. :func:`verify` finds that, a
truncated file, a flipped bit and a folder mixing two saves, before anything is parsed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ranapass.errors import RanapassError

__all__ = ["MANIFEST", "DamagedFileError", "digest", "write_folder", "verify"]

MANIFEST = "manifest.json"
_VERSION = 1
_CHUNK = 1 << 20


class DamagedFileError(RanapassError):
    """A written file is missing, truncated or changed, or its folder mixes two saves."""


def digest(path: str | os.PathLike) -> str:
    """blake2b (32 bytes, hex) of a file's content, read in chunks."""
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _sync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def write_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder to fill; when the block succeeds, its files and their manifest replace
    their namesakes in ``folder`` (other files of ``folder`` stay). On error nothing in ``folder`` changes.

    Raises:
        RanapassError: the folder cannot be written (read-only, or a file stands where a folder should be).
    """
    folder = Path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder if folder.is_dir() else folder.parent))
    except OSError as e:
        raise RanapassError(f"cannot write {folder}: {e.strerror or e}; pass a writable folder") from e
    try:
        yield staging
        entries = {}
        for name in _files(staging):
            path = staging / name
            _sync(path)
            entries[name] = {"size": path.stat().st_size, "blake2b": digest(path)}
        (staging / MANIFEST).write_text(json.dumps({"_version": _VERSION, "files": entries}, indent=1))
        _sync(staging / MANIFEST)
        if not folder.exists():
            with contextlib.suppress(OSError):  # another process may create it first: then replace file by file
                staging.rename(folder)
                return
        for name in [*entries, MANIFEST]:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def verify(folder: str | os.PathLike, *, required: bool = True) -> bool:
    """Check every file ``folder``'s manifest lists: present, of the recorded size, with the recorded digest.

    Returns whether the folder has a manifest (with ``required=False`` a folder without one passes).

    Raises:
        DamagedFileError: naming the file and what is wrong with it (the caller adds what to do).
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        if required:
            raise DamagedFileError(f"{folder} has no {MANIFEST}: it was not written completely (an interrupted "
                                   "save?) or by an older ranapass")
        return False
    try:
        files = json.loads(path.read_text())["files"]
        checks = [(name, int(e["size"]), str(e["blake2b"])) for name, e in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DamagedFileError(f"{path} is not a readable manifest ({type(e).__name__}: {e})") from e
    for name, size, want in checks:
        file = folder / name
        if not file.is_file():
            raise DamagedFileError(f"{file} is missing (the manifest lists it)")
        found = file.stat().st_size
        if found != size:
            raise DamagedFileError(f"{file} has {found} bytes, its manifest records {size} "
                                   "(truncated, changed, or from another save)")
        if digest(file) != want:
            raise DamagedFileError(f"{file} does not match its manifest's hash: it changed after it was saved, "
                                   "or it comes from another save than the files beside it")
    return True

"""Where ranapass keeps what it derives once and reuses: dequantized models, extracted text, profiles.

The root is ``$RANAPASS_CACHE`` when set, else ``~/.cache/ranapass``. Each entry is a folder written
through :func:`ranapass.manifest.write_folder` (temporary names, renamed into place, with a manifest
of sizes and hashes), so an interrupted or concurrent run never leaves a half-written entry behind.
:func:`usable_entry` checks an entry against its manifest before it is read; a damaged entry is
reported in one log line, removed, and the caller rebuilds it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ranapass.errors import RanapassError
from ranapass.manifest import DamagedFileError, verify

__all__ = ["ENV_VAR", "CacheError", "cache_dir", "usable_entry", "discard"]

log = logging.getLogger(__name__)

ENV_VAR = "RANAPASS_CACHE"


class CacheError(RanapassError):
    """The cache folder cannot be used (not a folder, not writable); the message names the fixes."""


def cache_dir(*parts: str) -> Path:
    """Return (and create) ``<cache root>/<parts...>``.

    Raises:
        CacheError: the folder cannot be created or is not writable.

    Example::

        >>> cache_dir("models")  # doctest: +SKIP
        PosixPath('/home/me/.cache/ranapass/models')
    """
    root = Path(os.environ.get(ENV_VAR) or "~/.cache/ranapass").expanduser()
    path = root.joinpath(*parts)
    fixes = (f"set {ENV_VAR} to a writable folder (--no-cache skips the profile cache; models and text are "
             "always cached)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        what = "is not a folder" if isinstance(e, (FileExistsError, NotADirectoryError)) else f"({e.strerror or e})"
        raise CacheError(f"the ranapass cache {path} cannot be created: it or a parent {what}; {fixes}") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise CacheError(f"the ranapass cache {path} is read-only; {fixes}")
    return path


def discard(entry: Path, reason: object) -> None:
    """Report a damaged cache entry in one line and remove it (the caller rebuilds it)."""
    log.warning("ranapass cache entry %s is damaged (%s): discarding and rebuilding it", entry,
                " ".join(str(reason).split()))
    if entry.is_dir():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def usable_entry(entry: Path) -> bool:
    """Whether cache entry ``entry`` exists and matches its manifest; a damaged one is discarded."""
    if not entry.exists():
        return False
    try:
        verify(entry)
    except DamagedFileError as e:
        discard(entry, e)
        return False
    return True

"""Where ranapass keeps what it derives once and reuses: dequantized models, extracted text.

The root is ``$RANAPASS_CACHE`` when set, else ``~/.cache/ranapass``. Entries are written to a
temporary name and renamed into place, so an interrupted or concurrent run never leaves a
half-written entry behind that a later run would trust.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["cache_dir", "atomic_path"]

ENV_VAR = "RANAPASS_CACHE"


def cache_dir(*parts: str) -> Path:
    """Return (and create) ``<cache root>/<parts...>``.

    Example::

        >>> cache_dir("models")  # doctest: +SKIP
        PosixPath('/home/me/.cache/ranapass/models')
    """
    root = Path(os.environ.get(ENV_VAR) or "~/.cache/ranapass").expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(final: Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it to ``final`` if the block succeeds.

    With ``directory=True`` the temporary path is an empty folder to fill, else a file name to
    write. If ``final`` appeared meanwhile (another process won the race) the new copy is dropped.
    On error the temporary path is removed and ``final`` is left as it was.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    target = tmp if directory else tmp / final.name
    try:
        yield target
        try:
            os.replace(target, final)
        except OSError:
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

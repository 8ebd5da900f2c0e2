"""Where ranapass keeps what it can rebuild: converted models, extracted text, profiles."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir(*parts: str) -> Path:
    """``$RANAPASS_CACHE/<parts...>`` (default ``~/.cache/ranapass``), created on demand."""
    root = Path(os.environ.get("RANAPASS_CACHE") or Path.home() / ".cache" / "ranapass")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path

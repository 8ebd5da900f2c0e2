"""Output helpers shared by the commands: one JSON object with ``--json``, readable text otherwise."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    """Print ``payload`` as one JSON object when ``--json`` was given, else ``text``."""
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=None, default=float))
    else:
        print(text)

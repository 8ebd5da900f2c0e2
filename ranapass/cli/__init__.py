"""The ``ranapass`` command line.

Each sub-command lives in its own module of this package and exposes ``register(subparsers)``,
which adds its parser and sets ``func``; modules are discovered, so adding a command touches no
other file. Commands that report figures accept ``--json`` and then print exactly one JSON object.
Shared helpers live in ``_shared``. A ``RanapassError`` (a mistake the user can fix) ends any command
with one line ``ranapass COMMAND: error: MESSAGE`` on stderr, or ``{"error": MESSAGE, ...}`` on stdout
with ``--json``, and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from ranapass.cli._shared import report_error
from ranapass.errors import RanapassError

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ranapass", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except RanapassError as error:
        return report_error(args, error)

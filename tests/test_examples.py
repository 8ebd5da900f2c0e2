"""The example scripts stay in step with the API: each compiles, and every ``ranapass.X`` it uses exists."""

import ast
from pathlib import Path

import pytest

import ranapass

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_uses_only_public_names(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ranapass"}
    missing = {name for name in used if not hasattr(ranapass, name)}
    assert not missing, f"{path.name} uses ranapass.{sorted(missing)}, which ranapass does not export"

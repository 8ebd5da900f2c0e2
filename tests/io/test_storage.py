"""Versioned folders (ranapass.storage): what is written reads back; other types, versions and broken files are refused."""

import json

import pytest
import torch

from ranapass import storage
from ranapass.errors import RanapassError

FMT = storage.Format("ranapass.Thing", 2, "thing.json", "thing.safetensors", "make it again")


def test_roundtrip(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b.c": torch.tensor([1, 2], dtype=torch.int64)}
    storage.write(tmp_path / "t", FMT, {"x": [1, 2], "name": "n"}, tensors)
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["manifest.json", "thing.json", "thing.safetensors"]
    doc, back = storage.read(tmp_path / "t", FMT)
    assert doc == {"_type": "ranapass.Thing", "_version": 2, "x": [1, 2], "name": "n"}
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_missing_folder_says_what_to_pass(tmp_path):
    with pytest.raises(RanapassError, match="holds no thing.json: pass the directory given to Thing.save"):
        storage.read(tmp_path, FMT)


def test_other_type_version_and_broken_files_are_refused(tmp_path):
    storage.write(tmp_path, FMT, {}, {"a": torch.zeros(1)})
    other = storage.Format("ranapass.Other", 2, "thing.json", "thing.safetensors", "x")
    with pytest.raises(RanapassError, match="not a ranapass.Other"):
        storage.read(tmp_path, other)
    newer = storage.Format("ranapass.Thing", 3, "thing.json", "thing.safetensors", "make it again")
    with pytest.raises(RanapassError, match="thing version 2, this ranapass reads version 3: make it again"):
        storage.read(tmp_path, newer)
    (tmp_path / "thing.safetensors").unlink()
    with pytest.raises(RanapassError, match="no thing.safetensors"):
        storage.read(tmp_path, FMT)


def test_damaged_files_are_found_by_the_manifest(tmp_path):
    storage.write(tmp_path, FMT, {"x": 1}, {"a": torch.zeros(4)})
    (tmp_path / "thing.json").write_text("{not json")
    with pytest.raises(RanapassError, match="thing.json has 9 bytes, its manifest records .*: make it again"):
        storage.read(tmp_path, FMT)
    storage.write(tmp_path, FMT, {"x": 1}, {"a": torch.zeros(4)})
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(RanapassError, match="has no manifest.json"):
        storage.read(tmp_path, FMT)


def test_unmanifested_broken_json_names_the_file(tmp_path):
    storage.write(tmp_path, FMT, {}, {"a": torch.zeros(1)})
    (tmp_path / "thing.json").write_text("{not json")
    with pytest.raises(RanapassError, match="thing.json is not valid JSON"):
        storage.load_json(tmp_path / "thing.json", "make it again")
    (tmp_path / "thing.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(RanapassError, match="thing.safetensors is not a readable safetensors file"):
        storage.load_tensors(tmp_path / "thing.safetensors", "make it again")

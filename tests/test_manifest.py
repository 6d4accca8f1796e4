"""manifest.py: the one reader of a shard folder's manifest.json, its one-line errors, attribute_names, sha256_file."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fake_celeba import ATTRIBUTES
from manifest import MANIFEST, ManifestError, attribute_names, read_manifest, sha256_file


def test_reads_what_prepare_shards_wrote(shards):
    manifest = read_manifest(shards)
    assert (manifest["size"], manifest["format"], set(manifest["splits"])) == (32, "jpg", {"train", "valid", "test"})
    assert attribute_names(manifest) == ATTRIBUTES
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            assert sha256_file(shards / shard["tar"]) == shard["sha256"]
            assert sha256_file(shards / shard["idx"]) == shard["idx_sha256"]


def test_attribute_names_without_attributes():
    assert attribute_names({}) == [] and attribute_names({"attributes": None}) == []
    names = ["Smiling", "Eyeglasses"]
    got = attribute_names({"attributes": names})
    assert got == names and got is not names  # a copy: the caller may keep or change it


def one_line(excinfo: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def test_no_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest here") as e:
        read_manifest(tmp_path)
    one_line(e, tmp_path / MANIFEST)


GOOD = {"size": 32, "format": "jpg", "attributes": ["Smiling"],
        "splits": {"train": {"count": 1, "shards": [{"tar": "t.tar", "idx": "t.idx", "count": 1, "bytes": 10240}]}}}


@pytest.mark.parametrize("text", [
    "{not json",
    "[1, 2]",
    json.dumps({k: v for k, v in GOOD.items() if k != "splits"}),
    json.dumps(dict(GOOD, format="gif")),
    json.dumps(dict(GOOD, size=0)),
    json.dumps(dict(GOOD, splits={"train": {"shards": [{"tar": "t.tar", "count": 1, "bytes": 1}]}})),  # no idx
    json.dumps(dict(GOOD, attributes="Smiling")),
    json.dumps(dict(GOOD, attributes=[1, 2])),
])
def test_a_malformed_manifest_is_one_line_naming_it(tmp_path, text):
    (tmp_path / MANIFEST).write_text(json.dumps(GOOD))
    assert read_manifest(tmp_path) == GOOD
    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(ManifestError, match="unreadable manifest") as e:
        read_manifest(tmp_path)
    one_line(e, tmp_path / MANIFEST)


def test_sha256_file(tmp_path):
    for size in (0, 5, (1 << 20) * 2 + 3):  # empty, one short block, several 1 MiB blocks and a tail
        data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        (tmp_path / "f").write_bytes(data)
        assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_importing_it_loads_no_torch():
    code = "import sys, manifest; assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=60)

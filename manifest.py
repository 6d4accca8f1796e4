"""The manifest.json of a shard folder: its name, its one reader, and the checksum its shard entries carry.

prepare_shards.py writes the manifest; everything else reads it through `read_manifest`. Torch-free, so that
prepare_shards.py and evaluate.py can use it without loading torch.

    manifest = read_manifest("data/shards64")     # checked: size, format, splits and their shard entries
    names = attribute_names(manifest)             # the attribute names, [] for shards without attributes
    sha256_file("data/shards64/train-000000.tar") == manifest["splits"]["train"]["shards"][0]["sha256"]
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from config import UserError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1  # the "version" prepare_shards.py writes


class ManifestError(UserError, ValueError):
    """An unreadable or malformed manifest: a one-line message naming the file."""


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest.json of a shard folder, checked for the fields the loaders use.

    Raises FileNotFoundError when there is none, ManifestError when it is not valid JSON or lacks those fields.
    """
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest here (make shards with prepare_shards.py)")
    try:
        manifest = json.loads(path.read_text())
        size, fmt, splits = int(manifest["size"]), manifest["format"], manifest["splits"]
        if not isinstance(splits, dict) or fmt not in ("jpg", "png") or size <= 0:
            raise ValueError("bad 'size', 'format' or 'splits'")
        for split in splits.values():
            for shard in split["shards"]:
                _ = int(shard["count"]), int(shard["bytes"])
                for key in ("tar", "idx"):
                    if not is_plain_name(shard[key]):
                        raise ValueError(f"shard {key} {shard[key]!r} is not a plain file name in the shards folder")
        attributes = manifest.get("attributes") or []
        if not isinstance(attributes, list) or not all(isinstance(a, str) for a in attributes):
            raise ValueError("'attributes' is not a list of names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from None
    return manifest


def is_plain_name(name: object) -> bool:
    """Whether `name` is a plain file name (no folder part, no "..", not hidden): a manifest may only name files inside
    its own folder, so that a crafted manifest cannot make the trainer open, say, ../../../etc/passwd."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not name.startswith("."))


def attribute_names(manifest: dict) -> list[str]:
    """The attribute names, in the order of each sample's .attr bytes (one int8 0/1 each); [] without attributes.

    Their number is the attribute count everywhere (the width of a batch's "attr", a model's cond_dim).
    """
    return list(manifest.get("attributes") or [])


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks (the manifest's "sha256" and "idx_sha256" of each shard)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

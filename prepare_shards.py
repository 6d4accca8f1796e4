"""Shard CelebA once: crop, resize and pack the images into WebDataset tars with DALI indexes and a manifest.

    python prepare_shards.py --src data/celeba --out data/shards64 [--size 64] [--crop celeba|center]
        [--format jpg|png] [--quality 95] [--samples-per-shard 4096] [--split all|train|valid|test]
        [--workers N] [--seed 0] [--max-bad-fraction 0.01] [--overwrite]

SRC is one of (detected, and printed):
    official  SRC/img_align_celeba/*.jpg, SRC/list_attr_celeba.txt, SRC/list_eval_partition.txt
    kaggle    SRC/img_align_celeba/img_align_celeba/*.jpg, SRC/list_attr_celeba.csv, SRC/list_eval_partition.csv
    zip       SRC = img_align_celeba.zip itself, or a folder holding it; read in place, metadata beside it if present
    folder    any folder of images, searched recursively: no attributes, everything in split "train"
CelebA's Google Drive folder (Img/, Anno/, Eval/) is read too. A missing metadata file is tolerated (no attributes,
or everything in "train"); a malformed one is an error naming its line. Every non-hidden file under the image
folder is an input: undecodable ones, non-image files, images without a metadata row and rows without an image are
listed under "skipped" in the manifest, and more than --max-bad-fraction of them makes the exit status non-zero.

Crops. `celeba` is the standard CelebA-64 crop (DDIM, NCSN): the 128x128 box centred at (89, 121) of the aligned
178x218 image, i.e. (25, 57, 153, 185). An image of another size gets that box scaled by min(W/178, H/218) about
the same relative centre and clamped inside the image. `center` is the largest centred square. Then a LANCZOS
resize to --size. For jpg output of a JPEG source, when the crop is at least twice the target even after a JPEG DCT
reduction (PIL's draft mode: 1/2, 1/4 or 1/8 while decoding), the reduced image is decoded and the crop box is scaled
into it; that keeps the result within ~36+ dB PSNR of a full-resolution crop and resize (tests check >= 35 dB).
png output always decodes at full resolution, so its pixels equal crop-then-LANCZOS exactly.

Output in OUT: {split}-NNNNNN.tar (samples keyed by source stem: {key}.jpg|png and, with attributes, {key}.attr =
one int8 1/0 per attribute in the metadata's column order: the manifest's "attributes"), {split}-NNNNNN.idx (DALI's
wds2idx v1.2 index, written from the offsets known while writing the tar) and manifest.json, written last (its
reader is manifest.py). Shard j of a split holds the shuffled source images j*N .. (j+1)*N-1 that decode
(N = --samples-per-shard), so a shard can be checked or rewritten alone: a rerun keeps every complete shard whose
sha256 verifies and writes the rest. Progress of an unfinished run lives in manifest.partial.json. Tar headers
carry no time, owner or mode of the source, so runs are byte-identical.
"""
from __future__ import annotations

import csv
import dataclasses
import gc
import hashlib
import io
import json
import multiprocessing
import os
import re
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterator

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

import config
from atomic import atomic_write, fsync_dir
from config import ConfigError, UserError
from manifest import MANIFEST, MANIFEST_VERSION, ManifestError, read_manifest, sha256_file

SPLITS = ("train", "valid", "test")
PARTITIONS = {"0": "train", "1": "valid", "2": "test"}  # list_eval_partition's values
CELEBA_SIZE = (178, 218)  # aligned CelebA image (width, height)
CELEBA_BOX = (25, 57, 153, 185)  # 128x128 centred at (89, 121): the DDIM / NCSN CelebA crop
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
ATTR_FILES = ("list_attr_celeba.txt", "list_attr_celeba.csv")
PARTITION_FILES = ("list_eval_partition.txt", "list_eval_partition.csv")
DRAFT_MARGIN = 2.0  # use a JPEG DCT reduction only when the reduced crop still has >= 2x the target's pixels a side
IDX_VERSION = "v1.2"  # DALI tools/wds2idx.py: "v1.2 <samples>", then per sample "ext data_offset size name ..."
PARTIAL = "manifest.partial.json"  # the record of an unfinished run (the shards done so far), removed at the end
OWN_FILE = re.compile(rf"^(?:(?:train|valid|test)-\d{{6}}\.(?:tar|idx)|{re.escape(MANIFEST)}|{re.escape(PARTIAL)})"
                      r"(?:\.tmp)?$")
# What the project's other tools write into a shards folder (judge.py, embed.py): neither ours to remove nor foreign.
COMPANION_FILE = re.compile(r"^(?:judge\.(?:pt|json)|embed-.+\.(?:npy|npy\.partial|partial\.json))$")
REASON_CHARS = 160  # the longest error text in a "skipped" entry's reason
# Arguments that change the bytes written; a rerun with others equal may reuse shards.
CONTENT_ARGS = ("size", "crop", "format", "quality", "samples_per_shard", "split", "seed")

console = Console()


@dataclass
class PrepareConfig:
    src: str = ""  # CelebA folder (official or Kaggle layout), img_align_celeba.zip, or any folder of images
    out: str = ""  # output folder for shards, indexes and manifest.json (created; must not be inside SRC)
    size: int = 64  # output side in pixels, 16..256
    crop: str = "celeba"  # celeba: 128x128 box centred at (89, 121) of 178x218 | center: largest centred square
    format: str = "jpg"  # jpg (quality --quality, 4:4:4 chroma) | png (lossless)
    quality: int = 95  # JPEG quality of the shard images
    samples_per_shard: int = 4096  # source images per shard (fewer when some are bad)
    split: str = "all"  # all | train | valid | test
    workers: int = 0  # decoding processes; 0 = all cores
    seed: int = 0  # seed of the per-split shuffle done before sharding
    max_bad_fraction: float = 0.01  # exit non-zero (after writing the manifest) when more inputs than this are bad
    overwrite: bool = False  # allow an OUT holding another dataset or foreign files; only our own files are replaced

    REQUIRED: ClassVar[tuple[str, ...]] = ("src", "out")
    CHOICES: ClassVar[dict[str, tuple]] = {"crop": ("celeba", "center"), "format": ("jpg", "png"),
                                           "split": ("all",) + SPLITS}
    BOUNDS: ClassVar[dict[str, str]] = {"size": "16..256", "quality": "1..100", "samples_per_shard": ">= 1",
                                        "workers": ">= 0", "seed": ">= 0", "max_bad_fraction": "0..1"}


class PrepareError(UserError, ValueError):
    """Bad input found before anything is written (missing SRC, malformed metadata, OUT inside SRC, ...)."""


class TooManyBadInputs(UserError, RuntimeError):
    """More than max_bad_fraction of the inputs were skipped; the manifest has been written and lists them."""

    def __init__(self, message: str, manifest: dict):
        super().__init__(message)
        self.manifest = manifest


# --------------------------------------------------------------------------------------------------------------------
# The source: layout, metadata and the list of images.
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class Source:
    layout: str  # official | kaggle | zip | folder
    path: Path  # SRC as resolved
    zip_path: Path | None  # the zip read in place, or None
    files: list[tuple[str, str, int]]  # (name relative to the image root, path or zip member, size) sorted by name
    attr_file: Path | None  # list_attr_celeba.txt/.csv used, or None
    partition_file: Path | None  # list_eval_partition.txt/.csv used, or None


def _first_file(folders: list[Path], names: tuple[str, ...]) -> Path | None:
    return next((f / n for f in folders for n in names if (f / n).is_file()), None)


def _walk(root: Path, exclude: set[Path]) -> list[tuple[str, str, int]]:
    """Every regular file under root (hidden files and folders ignored), as (relative name, path, size), sorted.

    os.scandir, because CelebA keeps 202,599 files in one folder: a Path and a stat call per file would dominate.
    """
    found: list[tuple[str, str, int]] = []
    skip = {str(p) for p in exclude if p is not None}
    stack, seen = [("", str(root))], set()
    while stack:
        rel_dir, folder = stack.pop()
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:  # a symlinked loop
            continue
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as entries:
            for e in entries:
                if e.name.startswith(".") or e.path in skip:
                    continue
                if e.is_dir():
                    stack.append((rel_dir + e.name + "/", e.path))
                elif e.is_file():
                    found.append((rel_dir + e.name, e.path, e.stat().st_size))
                elif e.is_symlink():  # dangling: listed, then skipped as unreadable
                    found.append((rel_dir + e.name, e.path, -1))
    return sorted(found)


def _zip_files(zip_path: Path) -> list[tuple[str, str, int]]:
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError) as e:
        raise PrepareError(f"{zip_path}: not a readable zip file ({e})") from None
    infos = [i for i in infos if not any(p.startswith(".") or p == "__MACOSX" for p in i.filename.split("/"))]
    # Names relative to the deepest folder common to all members (img_align_celeba/ in CelebA's zip).
    dirs = [i.filename.split("/")[:-1] for i in infos]
    prefix: list[str] = dirs[0] if dirs else []
    for d in dirs[1:]:
        while d[:len(prefix)] != prefix:
            prefix = prefix[:-1]
    cut = len("/".join(prefix)) + 1 if prefix else 0
    return sorted((i.filename[cut:], i.filename, i.file_size) for i in infos)


def _meta_dirs(folder: Path) -> list[Path]:
    # CelebA's own Google Drive folder keeps the metadata in Anno/ and Eval/, the images in Img/.
    return [folder, folder / "Anno", folder / "Eval"]


def find_source(src: Path) -> Source:
    """Detect SRC's layout and list its files; raises PrepareError when there is nothing to read."""
    if not src.exists():
        raise PrepareError(f"{src}: no such file or folder")
    if src.is_file():
        if not zipfile.is_zipfile(src):
            raise PrepareError(f"{src}: not a folder or a zip file")
        dirs = _meta_dirs(src.parent) + (_meta_dirs(src.parent.parent)[1:] if src.parent.name == "Img" else [])
        attr, part = _first_file(dirs, ATTR_FILES), _first_file(dirs, PARTITION_FILES)
        return Source("zip", src, src, _zip_files(src), attr, part)
    attr, part = _first_file(_meta_dirs(src), ATTR_FILES), _first_file(_meta_dirs(src), PARTITION_FILES)
    csv_meta = any(p is not None and p.suffix == ".csv" for p in (attr, part))
    nested = src / "img_align_celeba" / "img_align_celeba"
    if nested.is_dir():
        return Source("kaggle", src, None, _walk(nested, set()), attr, part)
    for flat in (src / "img_align_celeba", src / "Img" / "img_align_celeba"):
        if flat.is_dir():
            return Source("kaggle" if csv_meta else "official", src, None, _walk(flat, set()), attr, part)
    for zipped in (src / "img_align_celeba.zip", src / "Img" / "img_align_celeba.zip"):
        if zipped.is_file():
            return Source("zip", src, zipped, _zip_files(zipped), attr, part)
    if attr or part:  # images beside their metadata
        return Source("kaggle" if csv_meta else "official", src, None, _walk(src, {attr, part}), attr, part)
    return Source("folder", src, None, _walk(src, set()), None, None)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PrepareError(f"{path}: cannot read ({e})") from None


ATTR_VALUES = {"1": 1, "+1": 1, "-1": 0, "0": 0}  # CelebA writes 1 / -1; 0 is read as absent too


def _attr_bytes(path: Path, lineno: int, values: list[str]) -> bytes:
    try:
        return bytes(map(ATTR_VALUES.__getitem__, values))
    except KeyError:
        bad = next(v for v in values if v not in ATTR_VALUES)
        raise PrepareError(f"{path}:{lineno}: attribute value {bad!r} is not 1, -1 or 0") from None


def _rows(path: Path, lines: list[str], first: int):
    """(line number, fields) of the non-blank lines from line `first` on: CSV fields or whitespace-split ones."""
    split = (lambda ln: [f.strip() for f in next(csv.reader([ln]))]) if path.suffix == ".csv" else str.split
    for lineno in range(first, len(lines) + 1):
        line = lines[lineno - 1]
        if line.strip():
            yield lineno, split(line)


def read_attributes(path: Path) -> tuple[list[str], dict[str, tuple[bytes, int]]]:
    """Parse list_attr_celeba.txt (count, names, rows) or .csv (image_id + names, rows).

    Returns the attribute names and {image name: (one int8 0/1 byte per attribute, line number)}.
    """
    lines = _read_lines(path)
    if path.suffix == ".csv":
        header = next(_rows(path, lines[:1], 1), (1, []))[1]
        if header[:1] != ["image_id"]:
            raise PrepareError(f"{path}:1: expected a header starting with image_id")
        names, first = header[1:], 2
    else:
        if len(lines) < 2 or not lines[0].strip().isdigit():
            raise PrepareError(f"{path}:1: expected the image count, found {(lines or [''])[0].strip()[:40]!r}")
        names, first = lines[1].split(), 3
    if not names:
        raise PrepareError(f"{path}:{first - 1}: no attribute names")
    rows: dict[str, tuple[bytes, int]] = {}
    for lineno, r in _rows(path, lines, first):
        if len(r) != len(names) + 1:
            raise PrepareError(f"{path}:{lineno}: expected {len(names) + 1} columns (name + {len(names)} "
                               f"attributes), found {len(r)}")
        if r[0] in rows:
            raise PrepareError(f"{path}:{lineno}: {r[0]} already listed on line {rows[r[0]][1]}")
        rows[r[0]] = (_attr_bytes(path, lineno, r[1:]), lineno)
    if path.suffix == ".txt" and int(lines[0]) != len(rows):
        console.print(f"[yellow]warning: {path}:1 declares {int(lines[0])} rows, it has {len(rows)}")
    return names, rows


def read_partitions(path: Path) -> dict[str, tuple[str, int]]:
    """Parse list_eval_partition.txt (`000001.jpg 0`) or .csv (image_id,partition): {name: (split, line number)}."""
    lines = _read_lines(path)
    first = 1
    if path.suffix == ".csv":
        if next(_rows(path, lines[:1], 1), (1, []))[1] != ["image_id", "partition"]:
            raise PrepareError(f"{path}:1: expected the header image_id,partition")
        first = 2
    parts: dict[str, tuple[str, int]] = {}
    for lineno, r in _rows(path, lines, first):
        if len(r) != 2:
            raise PrepareError(f"{path}:{lineno}: expected 2 columns (name partition), found {len(r)}")
        name, value = r
        if value not in PARTITIONS:
            raise PrepareError(f"{path}:{lineno}: unknown partition value {value!r} (expected 0, 1 or 2)")
        if name in parts:
            raise PrepareError(f"{path}:{lineno}: {name} already listed on line {parts[name][1]}")
        parts[name] = (PARTITIONS[value], lineno)
    return parts


def _sanitize_key(stem: str) -> str:
    # DALI and webdataset split a member name at the first dot; the index separates fields by spaces.
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "_"


# --------------------------------------------------------------------------------------------------------------------
# One image: decode, crop, resize, encode. Runs in the worker processes.
# --------------------------------------------------------------------------------------------------------------------

def crop_box(width: int, height: int, crop: str) -> tuple[float, float, float, float]:
    """The crop as (left, top, right, bottom) in pixel-edge coordinates of a width x height image."""
    if crop == "center":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return (left, top, left + side, top + side)
    if (width, height) == CELEBA_SIZE:
        return CELEBA_BOX
    s = min(width / CELEBA_SIZE[0], height / CELEBA_SIZE[1])
    side = (CELEBA_BOX[2] - CELEBA_BOX[0]) * s
    cx = width / 2 + ((CELEBA_BOX[0] + CELEBA_BOX[2]) / 2 - CELEBA_SIZE[0] / 2) * s
    cy = height / 2 + ((CELEBA_BOX[1] + CELEBA_BOX[3]) / 2 - CELEBA_SIZE[1] / 2) * s
    left = min(max(cx - side / 2, 0.0), width - side)
    top = min(max(cy - side / 2, 0.0), height - side)
    return (left, top, left + side, top + side)


def transform(data: bytes, size: int, crop: str, fmt: str, quality: int) -> bytes:
    """Source image bytes -> the encoded size x size RGB shard image. Raises on anything undecodable."""
    img = Image.open(io.BytesIO(data))
    box = crop_box(img.width, img.height, crop)
    side = min(box[2] - box[0], box[3] - box[1])
    scale = 1.0
    if fmt == "jpg" and img.format == "JPEG":
        # Decode at 1/2, 1/4 or 1/8 in the DCT domain when the crop keeps >= DRAFT_MARGIN x the target size.
        reduce = next((r for r in (8, 4, 2) if side / r >= DRAFT_MARGIN * size), 1)
        if reduce > 1:
            full_width = img.width
            drafted = img.draft("RGB", (img.width // reduce, img.height // reduce))
            if drafted is not None:  # (mode, (0, 0, W / r, H / r)): the full image in reduced coordinates
                scale = drafted[1][2] / full_width
    img.load()  # decode now: a truncated file raises here (LOAD_TRUNCATED_IMAGES stays False)
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, LA, P, PA, RGBA, CMYK, I;16 ...
    if scale == 1.0 and all(float(v).is_integer() for v in box):
        out = img.crop(tuple(int(v) for v in box)).resize((size, size), Image.Resampling.LANCZOS)
    else:
        out = img.resize((size, size), Image.Resampling.LANCZOS, box=tuple(v * scale for v in box))
    buf = io.BytesIO()
    if fmt == "jpg":
        out.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    else:
        out.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


_WORKER: dict = {}


def _init_worker(settings: tuple, zip_path: str | None) -> None:
    """Per process: the output settings and its own handle on the zip (a handle must not cross a fork)."""
    _WORKER.clear()
    _WORKER["settings"] = settings
    _WORKER["zip"] = zipfile.ZipFile(zip_path) if zip_path else None


def _close_worker() -> None:
    if _WORKER.get("zip") is not None:
        _WORKER["zip"].close()
    _WORKER.clear()


def tar_member(name: str, data: bytes) -> tuple[bytes, int]:
    """One regular file as tar bytes (GNU header, data, zero padding to 512) and the data's offset in them.

    The header holds no time, owner or source mode, so the same name and data always give the same bytes.
    """
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type = len(data), 0, 0o444, tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    return header + data + tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE), len(header)


def pack_sample(key: str, members: list[tuple[str, bytes]]) -> tuple[bytes, list[tuple[str, int, int, str]]]:
    """A webdataset sample as tar bytes, and (ext, data offset within them, size, name) for each member."""
    blob, fields = b"", []
    for ext, data in members:
        name = f"{key}.{ext}"
        member, data_offset = tar_member(name, data)
        fields.append((ext, len(blob) + data_offset, len(data), name))
        blob += member
    return blob, fields


def _process(task: tuple[str, str, bytes | None]) -> tuple[bytes | None, list | str]:
    """Read, transform and pack one source (ref, key, attr): (tar bytes, index fields) or (None, why skipped)."""
    ref, key, attr = task
    try:
        zf = _WORKER["zip"]
        if zf is not None:
            data = zf.read(ref)
        else:
            with open(ref, "rb") as f:
                data = f.read()
    except Exception as e:  # noqa: BLE001 - any read failure is a skip with its reason
        return None, _skip_reason("unreadable", e)
    if not data:
        return None, "empty file (0 bytes)"
    try:
        image = transform(data, *_WORKER["settings"])
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken images
        if isinstance(e, Image.UnidentifiedImageError):
            return None, "not an image: cannot identify image file"
        return None, _skip_reason("cannot decode", e)
    fmt = _WORKER["settings"][2]
    # Members in sorted extension order, as `tar` of a folder would list them.
    return pack_sample(key, [(fmt, image)] if attr is None else [("attr", attr), (fmt, image)])


def _skip_reason(what: str, e: BaseException) -> str:
    """A "skipped" entry's reason: what failed, then the error as one line, clipped to REASON_CHARS characters."""
    text = config.one_line(e)
    if len(text) > REASON_CHARS:
        text = text[:REASON_CHARS - 3] + "..."
    return f"{what}: {text}"


# --------------------------------------------------------------------------------------------------------------------
# The plan: which source goes to which shard of which split.
# --------------------------------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Sample:
    key: str  # member stem in the tar, from the source file's stem
    file: str  # name relative to the image root, as listed in "skipped"
    ref: str  # path on disk, or member of the zip
    attr: bytes | None  # one int8 0/1 per attribute, or None without attributes


@dataclass
class ShardPlan:
    split: str
    index: int
    samples: list[Sample]  # the shuffled sources of this shard, bad ones included

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}"


@dataclass
class Plan:
    attributes: list[str]  # attribute names, or [] without attribute metadata
    shards: dict[str, list[ShardPlan]]  # split -> shards, for the requested splits
    skipped: list[dict]  # metadata problems found while planning: {"file", "reason", "split"}
    inputs: int  # sources considered (images plus metadata rows without an image) in the requested splits
    fingerprint: str  # sha256 over the file list (names, sizes) and the metadata files


def make_plan(source: Source, cfg: PrepareConfig) -> Plan:
    """Match images with metadata, drop what cannot be used, shuffle each split with the seed and cut it in shards."""
    attributes: list[str] = []
    attrs = parts = None
    if source.attr_file is not None:
        attributes, attrs = read_attributes(source.attr_file)
    if source.partition_file is not None:
        parts = read_partitions(source.partition_file)
    wanted = SPLITS if cfg.split == "all" else (cfg.split,)
    if not any(os.path.splitext(rel)[1].lower() in IMAGE_EXTS for rel, _, _ in source.files):
        raise PrepareError(f"{source.path}: no images found ({source.layout} layout)")

    by_split: dict[str, list[Sample]] = {s: [] for s in wanted}
    skipped: list[dict] = []
    keys: set[str] = set()
    seen_names: set[str] = set()
    for rel, ref, _ in source.files:
        name = rel.rsplit("/", 1)[-1]
        seen_names.add(name)
        stem, dot, suffix = name.rpartition(".")
        stem, suffix = (stem, "." + suffix.lower()) if dot and stem else (name, "")
        split = "train" if parts is None else (parts[name][0] if name in parts else None)
        if suffix not in IMAGE_EXTS:
            reason = f"not an image file (extension {suffix or 'none'!r})"
        elif attrs is not None and name not in attrs:
            reason = f"no row in {source.attr_file.name}"
        elif parts is not None and name not in parts:
            reason = f"no row in {source.partition_file.name}"
        else:
            reason = None
        if reason is not None:
            if split is None or split in wanted:
                skipped.append({"file": rel, "reason": reason, "split": split})
            continue
        if split not in wanted:
            continue
        key = _sanitize_key(stem)
        if key in keys:  # two sources with the same stem (plain folders): keep both under distinct keys
            n = 2
            while f"{key}_{n}" in keys:
                n += 1
            key = f"{key}_{n}"
        keys.add(key)
        by_split[split].append(Sample(key, rel, ref, attrs[name][0] if attrs is not None else None))

    # Metadata rows whose image is missing.
    for table, path in ((attrs, source.attr_file), (parts, source.partition_file)):
        for name, (_, lineno) in (table or {}).items():
            if name in seen_names:
                continue
            seen_names.add(name)  # reported once, from the first file that lists it
            split = parts[name][0] if parts is not None and name in parts else None
            if split is None or split in wanted:
                skipped.append({"file": name, "reason": f"missing image: listed in {path.name} line {lineno}",
                                "split": split})

    shards: dict[str, list[ShardPlan]] = {}
    for i, split in enumerate(SPLITS):
        if split not in wanted:
            continue
        samples = by_split[split]
        order = np.random.default_rng([cfg.seed, i]).permutation(len(samples))  # per split: same for any --split
        samples = [samples[j] for j in order]
        n = cfg.samples_per_shard
        shards[split] = [ShardPlan(split, j, samples[k:k + n]) for j, k in enumerate(range(0, len(samples), n))]

    h = hashlib.sha256(json.dumps([source.layout, [(rel, size) for rel, _, size in source.files]]).encode())
    for path in (source.attr_file, source.partition_file):
        h.update(path.read_bytes() if path is not None else b"-")
    inputs = sum(len(s.samples) for v in shards.values() for s in v) + len(skipped)
    return Plan(attributes, shards, skipped, inputs, h.hexdigest())


# --------------------------------------------------------------------------------------------------------------------
# Writing: deterministic tars, their DALI index, atomic renames.
# --------------------------------------------------------------------------------------------------------------------

def _tmp(path: Path) -> Path:
    """The temporary name of a file being written, "NAME.tmp": OWN_FILE recognises it, and a rerun clears it."""
    return path.with_name(path.name + ".tmp")


class ShardWriter:
    """One {split}-NNNNNN.tar under a temp name, plus the lines of its DALI index from the offsets as they are written.

    The tar is what tarfile writes for these members (GNU headers from TarInfo.tobuf, then two zero blocks and
    padding to a 10240-byte record at the end); the members come packed from the workers, so this process only
    appends and hashes. Index format, as DALI's tools/wds2idx.py writes it: "v1.2 <samples>", then one line per
    sample with, for each member in tar order, "<ext> <offset of the member's data> <size> <member name>".
    """

    def __init__(self, out: Path, name: str):
        self.out, self.name = out, name
        self.tmp = _tmp(out / f"{name}.tar")
        self.file = open(self.tmp, "wb")
        self.sha, self.pos = hashlib.sha256(), 0
        self.lines: list[str] = []

    def _write(self, data: bytes) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.pos += len(data)

    def add(self, blob: bytes, fields: list[tuple[str, int, int, str]]) -> None:
        """Append one packed sample (see pack_sample)."""
        self.lines.append(" ".join(f"{ext} {self.pos + offset} {size} {name}" for ext, offset, size, name in fields))
        self._write(blob)

    def finish(self) -> dict:
        """End the archive as tarfile does, fsync and rename it, write its index; return the shard's manifest entry."""
        self._write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        self._write(tarfile.NUL * (-self.pos % tarfile.RECORDSIZE))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        tar_path, idx_path = self.out / f"{self.name}.tar", self.out / f"{self.name}.idx"
        os.replace(self.tmp, tar_path)
        idx = (f"{IDX_VERSION} {len(self.lines)}\n" + "".join(line + "\n" for line in self.lines)).encode()
        atomic_write(idx_path, idx, tmp=_tmp(idx_path))
        return {"tar": tar_path.name, "idx": idx_path.name, "count": len(self.lines), "bytes": self.pos,
                "sha256": self.sha.hexdigest(), "idx_sha256": hashlib.sha256(idx).hexdigest()}

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _verified(out: Path, entry: dict) -> bool:
    """True when the shard's tar and index on disk are the ones the entry describes."""
    if entry.get("count", 0) == 0:
        return True
    try:
        tar, idx = out / entry["tar"], out / entry["idx"]
        return (tar.stat().st_size == entry["bytes"] and sha256_file(tar) == entry["sha256"]
                and sha256_file(idx) == entry["idx_sha256"])
    except (OSError, KeyError, TypeError):
        return False


# --------------------------------------------------------------------------------------------------------------------
# The output folder: what is already there, and whether it is ours.
# --------------------------------------------------------------------------------------------------------------------

def _load_json(path: Path) -> dict | None:
    """The partial manifest, or None when it is missing or unreadable (then the run cannot resume from it)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _previous_manifest(out: Path) -> dict | None:
    """OUT's finished manifest, or None when it is missing or unreadable (then its shards cannot be reused)."""
    try:
        return read_manifest(out)
    except (OSError, ManifestError):
        return None


def previous_entries(out: Path, identity: dict, plan: Plan, overwrite: bool) -> dict[str, dict]:
    """Shard entries (with their skipped files) of an earlier run of the same job in OUT, checked for ownership.

    Raises PrepareError when OUT holds another dataset or files that are not ours, unless overwrite.
    """
    if not out.exists():
        return {}
    if not out.is_dir():
        raise PrepareError(f"{out}: exists and is not a folder")
    names = sorted(p.name for p in out.iterdir())
    foreign = [n for n in names if not OWN_FILE.match(n) and not COMPANION_FILE.match(n)]
    partial, manifest = _load_json(out / PARTIAL), _previous_manifest(out)
    state = partial if (out / PARTIAL).exists() else manifest
    ours = [n for n in names if OWN_FILE.match(n) and not n.endswith(".tmp")]
    if foreign:
        problem = f"holds files that prepare_shards did not write ({', '.join(foreign[:3])}" + \
            (", ...)" if len(foreign) > 3 else ")")
    elif ours and state is None:
        problem = f"holds {ours[0]} without a readable {MANIFEST} or {PARTIAL}"
    elif state is not None and state.get("identity") != identity:
        problem = f"holds a different dataset ({_identity_diff(state.get('identity'), identity)})"
    else:
        problem = None
    if problem is not None:
        if not overwrite:
            raise PrepareError(f"{out}: {problem}; pass --overwrite to replace our files in it "
                               "(files of other programs are left alone)")
        console.print(f"[yellow]--overwrite: {out} {problem}; replacing our files only")
        return {}
    if state is None:
        return {}
    if state is partial:
        return dict(partial.get("shards", {}))
    # A finished run: its skipped files are reassigned to the shards whose sources they are.
    entries = {}
    skipped = {s["file"]: s for s in manifest.get("skipped", [])}
    by_name = {sp.name: sp for v in plan.shards.values() for sp in v}
    for split in manifest.get("splits", {}).values():
        for entry in split.get("shards", []):
            sp = by_name.get(Path(entry.get("tar", "")).stem)
            if sp is not None:
                entries[sp.name] = dict(entry, skipped=[skipped[s.file] for s in sp.samples if s.file in skipped])
    return entries


def _identity_diff(old, new: dict) -> str:
    if not isinstance(old, dict):
        return "unknown arguments"
    diffs = [f"{k} {old.get('args', {}).get(k)!r} != {v!r}" for k, v in new["args"].items()
             if old.get("args", {}).get(k) != v]
    if old.get("source") != new["source"]:
        diffs.append("another source")
    return ", ".join(diffs) or "different"


# --------------------------------------------------------------------------------------------------------------------
# The job.
# --------------------------------------------------------------------------------------------------------------------

class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:,.0f} img/s", style="cyan")


def check_config(cfg: PrepareConfig) -> None:
    """Raise PrepareError naming the first argument out of range (PrepareConfig's ClassVars, for callers of prepare)."""
    try:
        config.check(cfg)
    except ConfigError as e:
        raise PrepareError(str(e)) from None


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def prepare(cfg: PrepareConfig) -> dict:
    """Write the shards, indexes and manifest of cfg.src into cfg.out; return the manifest.

    Raises PrepareError (nothing written) for bad arguments or input, TooManyBadInputs (manifest written) when more
    than cfg.max_bad_fraction of the inputs were skipped.
    """
    start = time.perf_counter()
    check_config(cfg)
    console.print(f"[bold]prepare_shards[/] {dataclasses.asdict(cfg)}")

    # Read the source and plan every shard before touching OUT.
    src, out = resolve_paths(cfg)
    source, plan = read_and_plan(src, cfg)
    identity = {"args": {k: getattr(cfg, k) for k in CONTENT_ARGS},
                "source": {"layout": source.layout, "fingerprint": plan.fingerprint}}
    prev = previous_entries(out, identity, plan, cfg.overwrite)

    # Keep the shards an earlier run of this job finished; the others are to be written.
    done, todo = keep_finished_shards(out, plan, identity, prev)

    # Write those, recording each finished one in manifest.partial.json so that a killed run resumes.
    split_seconds, split_processed = write_shards(out, todo, done, identity, source, cfg)

    # The manifest, last; our shard files that it does not list (an earlier, different job) go.
    manifest = build_manifest(cfg, source, plan, done, identity)
    write_manifest(out, manifest)

    # The summary, then the verdict on the bad inputs (listed in the manifest, which is written either way).
    print_summary(out, manifest, split_seconds, split_processed, time.perf_counter() - start)
    skipped = manifest["skipped"]
    bad = len(skipped) / max(plan.inputs, 1)
    if bad > cfg.max_bad_fraction:
        raise TooManyBadInputs(f"{out / MANIFEST}: {len(skipped)} of {plan.inputs} inputs ({bad:.1%}) were bad, more "
                               f"than --max-bad-fraction {cfg.max_bad_fraction}; they are listed under \"skipped\"",
                               manifest)
    return manifest


def resolve_paths(cfg: PrepareConfig) -> tuple[Path, Path]:
    """SRC and OUT, absolute and resolved; PrepareError when SRC is missing or OUT lies inside it."""
    src, out = Path(cfg.src).expanduser().absolute(), Path(cfg.out).expanduser().absolute()
    if not src.exists():
        raise PrepareError(f"{src}: no such file or folder (--src)")
    src, out = src.resolve(), out.resolve()
    if src.is_dir() and (out == src or src in out.parents):
        raise PrepareError(f"{out}: is inside the source {src}; choose an --out outside it")
    return src, out


def read_and_plan(src: Path, cfg: PrepareConfig) -> tuple[Source, Plan]:
    """Detect SRC's layout, read its metadata and plan every shard, printing what was found; nothing is written."""
    gc.disable()  # planning makes millions of small objects and no cycles: collections would only cost
    try:
        source = find_source(src)
        plan = make_plan(source, cfg)
    finally:
        gc.enable()
    console.print(f"source: [bold]{source.layout}[/] layout at {source.zip_path or source.path}; "
                  f"{len(source.files)} files; attributes from "
                  f"{source.attr_file.name if source.attr_file else 'none'}; splits from "
                  f"{source.partition_file.name if source.partition_file else 'none (all train)'}")
    return source, plan


def keep_finished_shards(out: Path, plan: Plan, identity: dict,
                         prev: dict[str, dict]) -> tuple[dict[str, dict], list[ShardPlan]]:
    """Create OUT and clear the temporary files a killed run left there; then split the plan's shards into those an
    earlier run of this job finished ({name: entry}, each checked against its entry in `prev`) and those to write."""
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():
        if OWN_FILE.match(p.name) and p.name.endswith(".tmp"):
            p.unlink()
    manifest_old = _previous_manifest(out)
    if manifest_old is not None and manifest_old.get("identity") != identity:
        (out / MANIFEST).unlink()  # it describes a dataset that is about to be replaced
    done: dict[str, dict] = {}
    for shards in plan.shards.values():
        for sp in shards:
            if sp.name in prev and _verified(out, prev[sp.name]):
                done[sp.name] = prev[sp.name]
    todo = [sp for shards in plan.shards.values() for sp in shards if sp.name not in done]
    if done:
        console.print(f"keeping {len(done)} complete shard(s) from an earlier run; {len(todo)} to write")
    return done, todo


def _write_journal(out: Path, journal: dict) -> None:
    """manifest.partial.json: the arguments' identity and the shards finished so far (what a rerun resumes from)."""
    atomic_write(out / PARTIAL, json.dumps(journal, indent=1).encode(), tmp=_tmp(out / PARTIAL))


def write_shards(out: Path, todo: list[ShardPlan], done: dict[str, dict], identity: dict, source: Source,
                 cfg: PrepareConfig) -> tuple[dict[str, float], dict[str, int]]:
    """Write the shards in `todo`, adding each one's entry to `done` and recording `done` in the journal after each.

    Worker processes decode, encode and pack (ordered imap: the output does not depend on timing); this one only
    appends to the tar, hashes and keeps the index. Returns the seconds spent and the sources processed, per split.
    """
    journal = {"version": MANIFEST_VERSION, "identity": identity, "shards": done}
    if todo:  # the record that lets an interrupted run resume; a complete rerun writes nothing at all
        _write_journal(out, journal)
    total = sum(len(sp.samples) for sp in todo)
    workers = min(cfg.workers or _cpu_count(), max(total, 1))
    settings = (cfg.size, cfg.crop, cfg.format, cfg.quality)
    zip_arg = str(source.zip_path) if source.zip_path else None
    tasks = ((s.ref, s.key, s.attr) for sp in todo for s in sp.samples)
    pool = None
    if workers > 1:
        pool = multiprocessing.Pool(workers, _init_worker, (settings, zip_arg))
        results: Iterator = pool.imap(_process, tasks, chunksize=32)
    else:
        _init_worker(settings, zip_arg)
        results = map(_process, tasks)
    split_seconds: dict[str, float] = {}
    split_processed: dict[str, int] = {}
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("sharding", total=total)
            for sp in todo:
                t0 = time.perf_counter()
                done[sp.name] = write_shard(out, sp, results, lambda n: progress.advance(task, n))
                _write_journal(out, journal)
                split_seconds[sp.split] = split_seconds.get(sp.split, 0.0) + time.perf_counter() - t0
                split_processed[sp.split] = split_processed.get(sp.split, 0) + len(sp.samples)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        else:
            _close_worker()
    return split_seconds, split_processed


def write_shard(out: Path, sp: ShardPlan, results: Iterator, advance: Callable[[int], None]) -> dict:
    """Write one shard from the next len(sp.samples) worker results; return its entry, with the sources skipped.

    A shard none of whose sources decoded gets no file (DALI rejects an empty tar), only an entry of count 0.
    """
    writer = ShardWriter(out, sp.name) if sp.samples else None
    skipped = []
    try:
        for i, sample in enumerate(sp.samples, start=1):
            blob, fields = next(results)
            if blob is None:
                skipped.append({"file": sample.file, "reason": fields, "split": sp.split})
            else:
                writer.add(blob, fields)
            if i % 64 == 0 or i == len(sp.samples):  # the bar's bookkeeping costs: advance in steps
                advance((i - 1) % 64 + 1)
        if len(skipped) == len(sp.samples):
            writer.abort()
            entry = {"tar": None, "idx": None, "count": 0, "bytes": 0}
        else:
            entry = writer.finish()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return dict(entry, skipped=skipped)


def build_manifest(cfg: PrepareConfig, source: Source, plan: Plan, done: dict[str, dict], identity: dict) -> dict:
    """The manifest of the finished job: every split's non-empty shard entries, and every input skipped, sorted."""
    splits: dict[str, dict] = {}
    skipped = list(plan.skipped)
    for split, shards in plan.shards.items():
        entries = [done[sp.name] for sp in shards]
        skipped += [s for e in entries for s in e["skipped"]]
        kept = [{k: v for k, v in e.items() if k != "skipped"} for e in entries if e["count"] > 0]
        splits[split] = {"count": sum(e["count"] for e in kept), "shards": kept}
    skipped.sort(key=lambda s: (s["file"], s["reason"]))
    return {
        "version": MANIFEST_VERSION,
        "size": cfg.size,
        "crop": cfg.crop,
        "format": cfg.format,
        "quality": cfg.quality,
        "attributes": plan.attributes,
        "splits": splits,
        "skipped": skipped,
        "source": {"layout": source.layout, "path": str(source.zip_path or source.path), "inputs": plan.inputs},
        "identity": identity,
        "args": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"},
    }


def write_manifest(out: Path, manifest: dict) -> None:
    """Remove our shard files the manifest does not list, write it (unless OUT already holds these very bytes), and
    remove the journal: the folder is then finished."""
    listed = {e[k] for v in manifest["splits"].values() for e in v["shards"] for k in ("tar", "idx")}
    for p in out.iterdir():
        if OWN_FILE.match(p.name) and p.suffix in (".tar", ".idx") and p.name not in listed:
            p.unlink()
    previous = _previous_manifest(out)
    if previous is not None and previous.get("embeddings") and "embeddings" not in manifest:
        # embed.py's sets stay listed: each records the digest of the shards it was made from, so the loaders refuse
        # those of shards that changed and keep using the others.
        manifest = {**manifest, "embeddings": previous["embeddings"]}
    data = (json.dumps(manifest, indent=1) + "\n").encode()
    if not (out / MANIFEST).exists() or (out / MANIFEST).read_bytes() != data:
        atomic_write(out / MANIFEST, data, tmp=_tmp(out / MANIFEST))
    if (out / PARTIAL).exists():
        (out / PARTIAL).unlink()
        fsync_dir(out)


def print_summary(out: Path, manifest: dict, split_seconds: dict[str, float], split_processed: dict[str, int],
                  seconds: float) -> None:
    """A table of samples, skipped inputs, shards, bytes and speed per split, then the first 20 inputs skipped."""
    splits, skipped = manifest["splits"], manifest["skipped"]
    table = Table(title=f"prepare_shards -> {out}")
    for col in ("split", "samples", "skipped", "shards", "bytes", "seconds", "images/s"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split, v in splits.items():
        sec, n = split_seconds.get(split, 0.0), split_processed.get(split, 0)
        table.add_row(split, f"{v['count']:,}", f"{sum(1 for s in skipped if s['split'] == split):,}",
                      str(len(v["shards"])), f"{sum(e['bytes'] for e in v['shards']):,}", f"{sec:.1f}",
                      f"{n / sec:,.0f}" if sec > 0 else "-")
    processed = sum(split_processed.values())
    table.add_row("total", f"{sum(v['count'] for v in splits.values()):,}", f"{len(skipped):,}",
                  str(sum(len(v["shards"]) for v in splits.values())),
                  f"{sum(e['bytes'] for v in splits.values() for e in v['shards']):,}", f"{seconds:.1f}",
                  f"{processed / seconds:,.0f}" if processed else "-", style="bold")
    console.print(table)
    for s in skipped[:20]:
        console.print(f"  skipped {s['file']}: {s['reason']}")
    if len(skipped) > 20:
        console.print(f"  ... and {len(skipped) - 20} more (see {out / MANIFEST})")


def main(argv: list[str] | None = None) -> dict:
    with config.user_errors():
        cfg, _ = config.parse(PrepareConfig, argv)
        return prepare(cfg)


if __name__ == "__main__":
    main()

"""Stream the shards of prepare_shards.py as training batches: a DALI pipeline or a plain PyTorch one.

    loader = make_loader("shards", 256, backend="dali", device="cuda", dtype=torch.float16)
    for batch in loader:             # one epoch; iterate again for the next, in a new order
        x = batch["image"]           # [B, 3, S, S] in [-1, 1], dtype, on device
        a = batch["attr"]            # [B, A] int64 0/1, A = len(loader.attributes) (when the shards have them)
        e = batch["embed"]           # [B, E] float32 reference embeddings (make_loader(..., embeddings=""), embed.py)
    ckpt["data_state"] = loader.state_dict()          # plain values: weights_only-safe, one for all ranks
    make_loader("shards", 256, state=ckpt["data_state"])  # continues with exactly the samples that came next

One global sample order, whatever the number of ranks (MosaicML Streaming's idea): epoch e visits the split's
samples (or the --where subset of them) in the order numpy.random.default_rng([seed, e]).permutation(N), and the
sample at position p of that order is mirrored when default_rng([seed, e, 1]).random(N)[p] < 0.5. A step takes the
next world_size x batch_size samples of the order (the global batch); rank r of W takes its contiguous slice of them.
The position is one pair, (epoch, samples consumed in it), so a loader on any number of ranks, with any batch size,
continues where another stopped: every sample of an epoch once, none twice. An epoch ends when fewer samples than a
global batch are left (drop_last, which several ranks need) or with one partial batch (drop_last=False: the
evaluation readers).

- "dali": fn.external_source in DALI's parallel Python workers reads each batch's encoded images and attributes
  from the tars at the offsets in the DALI `.idx` files (one pread a sample, a stateless callable of the batch
  number), then DALI decodes them on the GPU ("mixed") or the CPU, mirrors and normalises to CHW.
- "torch": DataLoader workers do the same reads and decode with webdataset's PIL image handler. The same samples
  give the same pixels as DALI's CPU decoder to within 1-2/255.

Embeddings (embed.py): row i of the split's embed-NAME-SPLIT.npy belongs to sample i, so a batch's rows are read by
the same sample numbers as its images, in the same reader (DALI's workers or DataLoader's), and follow the same exact,
resumable order. The embedding of a mirrored image is its unmirrored face's (a face's identity does not flip).
"""
from __future__ import annotations

import atexit
import ctypes
import gc
import math
import multiprocessing.util  # noqa: F401  (registers its exit handler before ours)
import os
import platform
import re
import signal
import warnings
import weakref
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from config import UserError
from manifest import MANIFEST, ManifestError, attribute_names, read_manifest, sha256_file

PREFETCH = 3  # batches DALI prepares ahead (its prefetch_queue_depth, and its Python workers' queue)
HW_DECODER_LOAD = 0.65  # share of JPEGs for the A100/H100 hardware decoder (DALI's default; untuned here)
DALI_PIP = "pip install nvidia-dali-cuda130 (CUDA 13 drivers) or nvidia-dali-cuda120 (CUDA 12 drivers)"


class DataError(ManifestError):
    """Bad shards, manifest or arguments: a one-line message naming the file."""


class ShardReadError(UserError, RuntimeError):
    """A shard that could not be read while iterating (truncated or corrupt): a one-line message naming the file."""


class DaliMissingError(UserError, RuntimeError):
    """backend="dali" without nvidia-dali installed."""


# ---------------------------------------------------------------------------------------------------------------
# Start-up checks


def _check_shards(data_dir: Path, manifest: dict, split: str, verify: bool) -> list[dict]:
    """The split's shard entries after checking that every tar and idx is there, the right size and index count."""
    path = data_dir / MANIFEST
    entry = manifest["splits"].get(split)
    if entry is None:
        have = ", ".join(manifest["splits"]) or "none"
        raise DataError(f"{path}: no split {split!r} in the manifest (it has: {have})")
    shards = [s for s in entry["shards"] if int(s["count"]) > 0]
    if not shards or int(entry.get("count", 0)) <= 0:
        raise DataError(f"{path}: split {split!r} is empty")
    if sum(int(s["count"]) for s in shards) != int(entry["count"]):
        raise DataError(f"{path}: split {split!r} count {entry['count']} != the sum of its shards' counts")
    for s in shards:
        tar, idx = data_dir / s["tar"], data_dir / s["idx"]
        for f in (tar, idx):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: missing (listed in {path}); re-run prepare_shards.py")
        if tar.stat().st_size != int(s["bytes"]):
            raise DataError(f"{tar}: {tar.stat().st_size} bytes but the manifest says {s['bytes']} "
                            "(truncated or rewritten); re-run prepare_shards.py")
        with open(idx, "rb") as f:
            head = f.readline().split()
        if len(head) != 2 or head[0] != b"v1.2" or not head[1].isdigit() or int(head[1]) != int(s["count"]):
            raise DataError(f"{idx}: not a v1.2 DALI index of {s['count']} samples (header {b' '.join(head)!r})")
    if verify:
        verify_checksums(data_dir, shards)
    return shards


def verify_checksums(data_dir: Path, shards: list[dict]) -> None:
    """Compare every tar's and index's sha256 with the manifest's; the first mismatch, in manifest order, is a one-line
    DataError naming the file. The files are hashed on several threads (hashlib releases the GIL on large blocks)."""
    from concurrent.futures import ThreadPoolExecutor

    todo = [(data_dir / s[name], s[key]) for s in shards for name, key in (("tar", "sha256"), ("idx", "idx_sha256"))
            if key in s]
    pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))
    try:
        digests = list(pool.map(sha256_file, [path for path, _ in todo]))
    finally:  # stopped (a signal during start-up): the files not yet begun are not hashed
        pool.shutdown(wait=True, cancel_futures=True)
    for (path, expected), digest in zip(todo, digests):
        if digest != expected:
            raise DataError(f"{path}: sha256 differs from the manifest (corrupt or rewritten); "
                            f"re-run prepare_shards.py")


def rank_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank's [start, stop) of `total` samples: the contiguous slice of a global batch each rank takes."""
    return total * rank // world_size, total * (rank + 1) // world_size


def _resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn("data: CUDA is not available; the loader runs on the CPU", stacklevel=3)
        return torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


# ---------------------------------------------------------------------------------------------------------------
# Where each sample lies, and the subset a --where selects


class SampleIndex:
    """Every sample of a split: its tar, byte range, the offsets of its image and attribute data, and its key.

    Sample i is the i-th of the split in manifest order. Picklable (DALI's workers and DataLoader's get a copy)."""

    def __init__(self, data_dir: Path, shards: list[dict], fmt: str, num_attrs: int, embed_path: str = ""):
        self.fmt, self.num_attrs = fmt, num_attrs
        self.embed_path, self._embed = embed_path, None  # the split's embeddings (.npy), memory-mapped per process
        self.tars, tar_ids, offsets, lengths, img, attr, keys = [], [], [], [], [], [], []
        for shard in shards:
            idx_path = data_dir / shard["idx"]
            self.tars.append(str(data_dir / shard["tar"]))
            lines = idx_path.read_text().splitlines()[1:]
            for line_no in range(int(shard["count"])):
                parts = lines[line_no].split() if line_no < len(lines) else []
                comps = {p[3].rsplit(".", 1)[-1]: (int(p[1]), int(p[2])) for p in
                         (parts[i:i + 4] for i in range(0, len(parts), 4)) if len(p) == 4 and p[1].isdigit()}
                if fmt not in comps or (num_attrs and comps.get("attr", (0, 0))[1] != num_attrs):
                    want = f" or {num_attrs}-byte attr" if num_attrs else ""  # one byte per manifest attribute
                    raise DataError(f"{idx_path}: line {line_no + 2}: no {fmt}{want} entry: {parts}")
                begin = min(o for o, _ in comps.values())
                end = max(o + n for o, n in comps.values())
                tar_ids.append(len(self.tars) - 1)
                offsets.append(begin)
                lengths.append(end - begin)
                img.append((comps[fmt][0] - begin, comps[fmt][1]))
                attr.append(comps["attr"][0] - begin if num_attrs else -1)
                keys.append(parts[3].split(".", 1)[0])
        self.tar_ids = np.asarray(tar_ids, np.int32)
        self.offsets = np.asarray(offsets, np.int64)
        self.lengths = np.asarray(lengths, np.int64)
        self.img = np.asarray(img, np.int64).reshape(-1, 2)
        self.attr = np.asarray(attr, np.int64)
        self.keys = keys
        self._fds: dict[int, int] = {}
        self._pid = -1

    @classmethod
    def of_split(cls, data_dir: Path, manifest: dict, split: str) -> SampleIndex:
        """A split's index for reading a few of its samples by number or key (the shards checked as the loaders check
        them, without their checksums): sample.py --like-key, the app's reference faces, evaluate.py's likeness."""
        return cls(data_dir, _check_shards(data_dir, manifest, split, False), manifest["format"],
                   len(manifest.get("attributes") or []))

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:
        # File descriptors and the memory map stay with their process (a pickled memmap would copy the array).
        return {**self.__dict__, "_fds": {}, "_pid": -1, "_embed": None}

    def close(self) -> None:
        """Close the tar files this process opened (a short-lived index: embed.shard_image)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    @property
    def embed_dim(self) -> int:
        return int(self.embeddings().shape[1]) if self.embed_path else 0

    def embeddings(self) -> np.ndarray:
        if self._embed is None:
            self._embed = np.load(self.embed_path, mmap_mode="r")
        return self._embed

    def embedding_rows(self, ids: np.ndarray) -> np.ndarray:
        """[len(ids), E] float32: the embeddings of samples `ids` (a copy, in the order given)."""
        return np.asarray(self.embeddings()[np.asarray(ids, np.int64)], np.float32)

    def read(self, i: int) -> tuple[bytes, int, str]:
        """Sample i's bytes (image and attributes), with its tar's index and path; ShardReadError when cut short."""
        if self._pid != os.getpid():  # descriptors per process (DataLoader workers are forked)
            self._fds, self._pid = {}, os.getpid()
        tar = int(self.tar_ids[i])
        fd = self._fds.get(tar)
        if fd is None:
            fd = self._fds[tar] = os.open(self.tars[tar], os.O_RDONLY)
        length, offset = int(self.lengths[i]), int(self.offsets[i])
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise ShardReadError(f"{self.tars[tar]}: truncated: sample {self.keys[i]} needs bytes {offset}..."
                                 f"{offset + length}, the file has {os.fstat(fd).st_size}")
        return data, tar, self.tars[tar]

    def image_bytes(self, data: bytes, i: int) -> memoryview:
        o, n = self.img[i]
        return memoryview(data)[o:o + n]

    def image(self, i: int) -> bytes:
        """Sample i's encoded image (the shard's own bytes)."""
        return bytes(self.image_bytes(self.read(i)[0], i))

    def attributes(self, data: bytes, i: int) -> np.ndarray:
        return np.frombuffer(data, np.int8, self.num_attrs, int(self.attr[i]))

    def all_attributes(self) -> np.ndarray:
        """[N, A] int8: every sample's attributes (one small read each; for --where)."""
        out = np.empty((len(self), self.num_attrs), np.int8)
        for i in range(len(self)):
            out[i] = self.attributes(self.read(i)[0], i)
        return out


def parse_where(where: str, attributes: list[str], source: str = "--where") -> list[tuple[int, int]]:
    """"Male=0,Eyeglasses=1" -> [(attribute index, wanted value)]; a bad term is one line naming it."""
    terms = []
    for term in (t.strip() for t in where.split(",")):
        name, eq, value = term.partition("=")
        name, value = name.strip(), value.strip()
        if not eq or value not in ("0", "1"):
            raise DataError(f"{source} {where!r}: {term!r} is not NAME=0 or NAME=1")
        if name not in attributes:
            have = ", ".join(attributes) if attributes else "none: the shards have no attributes"
            raise DataError(f"{source} {where!r}: unknown attribute {name!r} (the shards have: {have})")
        terms.append((attributes.index(name), int(value)))
    return terms


def select(index: SampleIndex, where: str, attributes: list[str], manifest_path: Path, split: str) -> np.ndarray:
    """The split's sample numbers that a --where expression keeps (all of them for "")."""
    if not where.strip():
        return np.arange(len(index), dtype=np.int64)
    terms = parse_where(where, attributes)
    attrs = index.all_attributes()
    keep = np.ones(len(index), bool)
    for a, value in terms:
        keep &= attrs[:, a] == value
    ids = np.flatnonzero(keep).astype(np.int64)
    if len(ids) == 0:
        raise DataError(f"--where {where!r}: no sample of split {split!r} in {manifest_path} matches")
    return ids


# ---------------------------------------------------------------------------------------------------------------
# The global order


class Order:
    """The sample order of every epoch and this rank's part of each batch, from (seed, epoch) alone. Picklable.

    ids: the split's sample numbers to visit (all, or a --where subset); N = len(ids).
    """

    def __init__(self, ids: np.ndarray, *, seed: int, shuffle: bool, flip: bool, batch_size: int, rank: int,
                 world_size: int, drop_last: bool):
        self.ids, self.seed, self.shuffle, self.flip = ids, seed, shuffle, flip
        self.batch_size, self.rank, self.world_size, self.drop_last = batch_size, rank, world_size, drop_last
        self.global_batch = batch_size * world_size
        self.num_samples = len(ids)
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cached": None}

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's order (sample numbers of the split) and each position's mirror flag."""
        if self._cached is None or self._cached[0] != epoch:
            n = self.num_samples
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            flips = np.random.default_rng([self.seed, epoch, 1]).random(n) < 0.5 if self.flip else np.zeros(n, bool)
            self._cached = (epoch, self.ids[perm], flips)
        return self._cached[1], self._cached[2]

    def batches_from(self, samples: int) -> int:
        """Global batches left in an epoch from position `samples` (a partial one counts unless drop_last)."""
        left = max(0, self.num_samples - samples)
        return left // self.global_batch if self.drop_last else math.ceil(left / self.global_batch)

    def step(self, samples: int) -> int:
        """Samples the global batch at position `samples` takes."""
        return min(self.global_batch, self.num_samples - samples)

    def rank_part(self, epoch: int, samples: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's samples and flips of the global batch at position `samples` of `epoch`."""
        order, flips = self.epoch(epoch)
        lo, hi = rank_range(self.step(samples), self.rank, self.world_size)
        sl = slice(samples + lo, samples + hi)
        return order[sl], flips[sl]

    def walk(self, epoch: int, samples: int, n: int) -> tuple[int, int]:
        """The position n global batches after (epoch, samples), moving into later epochs as they end."""
        first = self.batches_from(samples)
        if n < first:
            return epoch, samples + n * self.global_batch
        per_epoch = self.batches_from(0)
        n -= first
        return epoch + 1 + n // per_epoch, (n % per_epoch) * self.global_batch


# ---------------------------------------------------------------------------------------------------------------
# The loader: position bookkeeping shared by both backends

STATE_KEYS = ("order", "split", "seed", "shuffle", "flip", "num_samples", "where")


class Loader:
    """One epoch per iteration, this rank's part of each global batch; see the module docstring.

    Attributes: image_size (S), attributes (names, [] without), embeddings (the set's name, "" without), embed_dim,
    embedding (the set's manifest entry, {} without), num_samples (N: samples per epoch over all ranks),
    batch_size (this rank's), global_batch, drop_last, device, dtype, backend, where, epoch (the epoch the current or
    next iteration belongs to), samples (position in it). Iterating again after a partial iteration continues the same
    epoch where it stopped (one iteration at a time). len(): global batches of a whole epoch.
    """

    backend = ""

    def __init__(self, data_dir: Path, manifest: dict, shards: list[dict], batch_size: int, *, split: str,
                 device: torch.device, shuffle: bool, flip: bool, seed: int, rank: int, world_size: int,
                 dtype: torch.dtype, drop_last: bool, num_threads: int | None, where: str,
                 embeddings: str | None = None, verify: bool = False):
        self.data_dir, self.shards, self.split, self.where = data_dir, shards, split, where
        self.image_size = int(manifest["size"])
        self.format = manifest["format"]
        self.attributes = attribute_names(manifest)
        self.batch_size, self.device, self.dtype = batch_size, device, dtype
        self.shuffle, self.flip, self.seed, self.drop_last = shuffle, flip, seed, drop_last
        self.rank, self.world_size, self.num_threads = rank, world_size, num_threads
        self.embeddings, self.embedding, embed_path = "", {}, ""
        if embeddings is not None:
            from embed import EmbedError, check_split, choose_set

            try:
                self.embeddings, self.embedding = choose_set(manifest, embeddings, str(data_dir / MANIFEST))
                embed_path = str(check_split(data_dir, manifest, self.embeddings, self.embedding, split, verify))
            except EmbedError as e:
                raise DataError(str(e)) from None
        self.index = SampleIndex(data_dir, shards, self.format, len(self.attributes), embed_path)
        self.embed_dim = self.index.embed_dim
        ids = select(self.index, where, self.attributes, data_dir / MANIFEST, split)
        self.order = Order(ids, seed=seed, shuffle=shuffle, flip=flip, batch_size=batch_size, rank=rank,
                           world_size=world_size, drop_last=drop_last)
        self.num_samples, self.global_batch = self.order.num_samples, self.order.global_batch
        if drop_last and self.num_samples < self.global_batch:
            raise DataError(f"{data_dir / MANIFEST}: split {split!r} has {self.num_samples} samples"
                            + (f" matching --where {where!r}" if where else "")
                            + f": fewer than one batch of {self.global_batch} ({world_size} x {batch_size}) with "
                              "drop_last=True")
        self._epoch, self._samples = 0, 0  # position: samples of `_epoch` already handed out (over all ranks)

    def __len__(self) -> int:
        return self.order.batches_from(0)

    @property
    def epoch(self) -> int:
        self._roll()
        return self._epoch

    @property
    def samples(self) -> int:
        self._roll()
        return self._samples

    def _roll(self) -> None:
        if self.order.batches_from(self._samples) == 0:
            self._epoch, self._samples = self._epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._roll()
        epoch, batches = self._epoch, self._batches()
        # Ends early when `epoch` or state_dict() has already moved the position past this epoch's last batch.
        while self._epoch == epoch and self.order.batches_from(self._samples):
            batch = next(batches)
            self._samples += self.order.step(self._samples)
            yield batch
        self._roll()

    def state_dict(self) -> dict:
        """The position as plain values, the same on every rank: fits torch.load(weights_only=True)."""
        self._roll()
        return {"order": "global", "split": self.split, "seed": self.seed, "shuffle": self.shuffle,
                "flip": self.flip, "num_samples": self.num_samples, "where": self.where, "epoch": self._epoch,
                "samples": self._samples, "batch_size": self.global_batch, "world_size": self.world_size}

    def _load_state(self, state: dict) -> None:
        where = f"{self.data_dir / MANIFEST}: cannot resume the data position"
        if not isinstance(state, dict) or state.get("order") != "global":
            raise DataError(f"{where}: the state is not one of the global order (a checkpoint from before format 2 "
                            "kept one position per rank)")
        if any(k not in state for k in STATE_KEYS + ("epoch", "samples")):
            raise DataError(f"{where}: the state is not a loader state_dict()")
        differ = [f"{k}={state[k]!r} (now {getattr(self, k)!r})" for k in STATE_KEYS[1:]
                  if state[k] != getattr(self, k)]
        if differ:
            raise DataError(f"{where}: " + ", ".join(differ))
        if not 0 <= int(state["samples"]) <= self.num_samples or int(state["epoch"]) < 0:
            raise DataError(f"{where}: position {state['samples']} of {self.num_samples} in epoch {state['epoch']}")
        self._epoch, self._samples = int(state["epoch"]), int(state["samples"])
        self._roll()

    def _batches(self) -> Iterator[dict[str, Any]]:
        """This rank's batches from the current position on (backends implement it)."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------------
# DALI backend


def _import_dali():
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
    except ImportError as e:
        raise DaliMissingError(f"data: backend='dali' needs NVIDIA DALI ({e}): {DALI_PIP}; "
                               "or use backend='torch'") from None
    return fn, types, Pipeline, DALIGenericIterator


# glibc's mallopt parameters (malloc.h)
_M_TOP_PAD, _M_MMAP_THRESHOLD = -2, -3
# The trainer's stop signals (train.STOP_SIGNALS; SIGUSR1 is Slurm's warning before the time limit): Slurm signals
# every process of a job step, and a worker must neither die of one nor act on it.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_PR_SET_PDEATHSIG = 1  # Linux prctl: a signal for this process when its parent dies
_malloc_tuned: bool | None = None


def keep_batch_memory_mapped() -> bool:
    """Make glibc keep freed batch-sized buffers mapped, so that the next batch reuses warm pages. Once per process;
    returns whether it is in effect (glibc only; set DDPM_MALLOC_TUNING=0 to leave malloc as it is).

    Why: every CPU batch of the DALI pipeline is a new buffer (256x3x64x64 fp32 = 12.6 MB) that the iterator hands to
    torch without a copy. glibc serves a buffer this large with mmap, or from a per-thread heap that it unmaps as soon
    as it is empty, so each batch faulted fresh zeroed pages in again (docs/benchmarks.md has the measured page
    faults and CPU time before and after). A fixed mmap threshold at
    glibc's largest (32 MiB: dynamic below it) keeps such buffers in the heaps, and a 64 MiB top pad stops glibc from
    unmapping a heap or trimming it below that much free memory. The cost is up to 64 MiB of freed memory kept per
    malloc arena.
    Buffers over 32 MiB (e.g. batch 256 at 128 px fp32) still come from mmap, as before.
    """
    global _malloc_tuned
    if _malloc_tuned is None:
        _malloc_tuned = False
        if os.environ.get("DDPM_MALLOC_TUNING", "1") != "0" and platform.libc_ver()[0] == "glibc":
            mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
            _malloc_tuned = mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) \
                and bool(mallopt(_M_TOP_PAD, 64 << 20))
    return _malloc_tuned


def check_image_structure(data: memoryview, fmt: str) -> str | None:
    """What is wrong with an encoded image's framing (None when it looks whole): PNG's signature, or JPEG's start and
    end markers and its chain of marker segments up to the scan. A few microseconds, in DALI's Python workers.

    Why: DALI 2.4's CPU decoder crashes the whole process (SIGSEGV, no Python error) on some broken JPEGs, e.g. one
    whose marker segments were overwritten ("[jpeg_parser] Invalid marker"); this catches those before DALI sees them,
    so the trainer stops with a ShardReadError naming the tar and sample. Damage inside the compressed scan data is
    not caught here (libjpeg decodes past most of it); the sha256 check at start-up catches any changed byte."""
    b = bytes(data[:65536]) if fmt == "jpg" else bytes(data[:8])
    if fmt == "png":
        return None if b == b"\x89PNG\r\n\x1a\n" else "no PNG signature"
    if b[:2] != b"\xff\xd8" or bytes(data[-2:]) != b"\xff\xd9":
        return "no JPEG start or end marker"
    pos = 2
    while pos + 4 <= len(b):
        if b[pos] != 0xFF:
            return f"invalid JPEG marker at byte {pos}"
        marker = b[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # start of scan: the header is whole
            return None
        if marker in (0x00, 0xD8, 0xD9) or 0xD0 <= marker <= 0xD7:
            return f"unexpected JPEG marker 0x{marker:02X} at byte {pos}"
        pos += 2 + int.from_bytes(b[pos + 2:pos + 4], "big")
    return "JPEG header without a scan"


class DaliSource:
    """fn.external_source's callable: this rank's part of the n-th global batch since (epoch, samples), as encoded
    images, mirror flags and attributes. Stateless (a function of n alone), as DALI's parallel workers need: DALI
    asks for batches ahead, several at a time, in any worker."""

    def __init__(self, index: SampleIndex, order: Order, epoch: int, samples: int):
        self.index, self.order, self.epoch, self.samples = index, order, epoch, samples
        self.parent = os.getpid()
        self._ready_in = -1

    def _in_worker(self) -> None:
        """Once per worker process: leave the stop signals to the trainer (Slurm and Ctrl-C signal the whole process
        group; a worker killed by one would fail the step before the trainer could checkpoint), and die with the
        trainer: DALI's workers wait for tasks forever, so a trainer killed with SIGKILL would leave them behind."""
        self._ready_in = os.getpid()
        if self._ready_in == self.parent:  # called in the trainer itself (not DALI's parallel mode)
            return
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        prctl = getattr(ctypes.CDLL(None), "prctl", None)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != self.parent:  # the trainer died before the line above
            os._exit(0)

    def __call__(self, info: Any) -> list:
        if self._ready_in != os.getpid():
            self._in_worker()
        ix = self.index
        epoch, samples = self.order.walk(self.epoch, self.samples, int(info.iteration))
        ids, flips = self.order.rank_part(epoch, samples)
        # One array per output, not one per sample: DALI's workers pickle a description of every array they pass and
        # the feed wraps each one again, 20-30 us of Python a sample in all (about what decoding it costs). The images
        # go as the rows of one [B, longest] array with their lengths; the pipeline cuts each row (fn.slice).
        lengths = ix.img[ids, 1]
        images = np.empty((len(ids), int(lengths.max(initial=1))), np.uint8)
        attrs = np.empty((len(ids), ix.num_attrs), np.int8)
        for j, i in enumerate(ids.tolist()):
            data, _, tar = ix.read(i)
            image = ix.image_bytes(data, i)
            wrong = check_image_structure(image, ix.fmt)
            if wrong is not None:
                raise ShardReadError(f"{tar}: sample {ix.keys[i]}: cannot decode its {ix.fmt} ({wrong})")
            images[j, :len(image)] = np.frombuffer(image, np.uint8)
            if ix.num_attrs:
                attrs[j] = ix.attributes(data, i)
        out = [images, lengths.astype(np.int32).reshape(-1, 1), flips.astype(np.int32)]
        return out + ([attrs] if ix.num_attrs else []) + ([ix.embedding_rows(ids)] if ix.embed_path else [])


class DaliLoader(Loader):
    backend = "dali"

    def __init__(self, *args, state: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        fn, types, Pipeline, DALIGenericIterator = _import_dali()
        if state is not None:
            self._load_state(state)
        gpu = self.device.type == "cuda"
        if not gpu:
            keep_batch_memory_mapped()
        cpus = os.cpu_count() or 1
        threads = self.num_threads or (min(4, cpus) if gpu else cpus)
        S = self.image_size
        # DALI's Python workers read the samples (small preads); its own threads decode. Forked workers cannot use
        # CUDA once the parent has, and DALI refuses to fork then, so on a GPU they are spawned (a few seconds).
        spawn = gpu or torch.cuda.is_initialized()
        workers = max(1, min(4, cpus // 4))
        # On the CPU, DALI's dynamic executor hands its output buffers to torch through DLPack instead of the
        # iterator copying every batch into a new tensor (batches stay valid however long the caller keeps them).
        # On a GPU the classic executor stays: its copy is cheap there, and the dynamic one is unmeasured on a GPU.
        pipe = Pipeline(batch_size=self.batch_size, num_threads=threads, device_id=self.device.index if gpu else None,
                        prefetch_queue_depth=PREFETCH, exec_dynamic=not gpu, py_num_workers=workers,
                        py_start_method="spawn" if spawn else "fork")
        with pipe:
            source = DaliSource(self.index, self.order, self._epoch, self._samples)
            dtypes = [types.UINT8, types.INT32, types.INT32] + ([types.INT8] if self.attributes else []) + \
                ([types.FLOAT] if self.embed_dim else [])
            padded, lengths, flips, *extra = fn.external_source(
                source=source, batch=True, batch_info=True, parallel=True, num_outputs=len(dtypes),
                prefetch_queue_depth=PREFETCH, dtype=dtypes)
            encoded = fn.slice(padded, start=[0], shape=lengths, axes=[0])  # each row cut to its image's bytes
            if gpu:
                images = fn.decoders.image(encoded, device="mixed", output_type=types.RGB,
                                           hw_decoder_load=HW_DECODER_LOAD, preallocate_width_hint=S,
                                           preallocate_height_hint=S)
            else:
                images = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
            native = {torch.float16: types.FLOAT16, torch.float32: types.FLOAT}
            images = fn.crop_mirror_normalize(images, dtype=native.get(self.dtype, types.FLOAT), output_layout="CHW",
                                              mean=[127.5] * 3, std=[127.5] * 3, mirror=flips)
            outputs, self._names = [images], ["image"]
            for name, node in zip(["attr"] * bool(self.attributes) + ["embed"] * bool(self.embed_dim), extra):
                outputs.append(node.gpu() if gpu else node)
                self._names.append(name)
            pipe.set_outputs(*outputs)
        if not spawn:
            # Workers are about to be forked: collect garbage first. A DALI pipeline left to the collector and
            # collected in a forked child waits forever in its __del__ for DALI threads that do not exist there.
            gc.collect()
        try:
            # The source never ends (an epoch is the loader's bookkeeping), so the iterator never resets: the
            # pipeline prepares the next epoch's first batches while this epoch's last ones train.
            self._iter = DALIGenericIterator(pipe, self._names, auto_reset=False)
        except Exception as e:
            raise self._read_error(e) from None

    def _read_error(self, e: Exception) -> Exception:
        """DALI's error as one line naming the tar: a reader's ShardReadError as it is, else a changed tar, else the
        sample of the next batches that PIL cannot decode either."""
        text = str(e)
        ours = re.findall(r"ShardReadError: (.+)", text)
        if ours:
            return ShardReadError(ours[-1].strip())
        found = re.search(r"encountered:\s*\n\s*(.+)", text)
        reason = found.group(1) if found else (text.strip().splitlines() or [type(e).__name__])[0]
        reason = re.sub(r"\x1b\[[0-9;]*m", "", reason)  # DALI colours some of its messages
        reason = re.sub(r'^Assert on ".*" failed:\s*', "", reason.strip())[:200]
        for s in self.shards:
            tar = self.data_dir / s["tar"]
            if not tar.is_file() or tar.stat().st_size != int(s["bytes"]):
                return ShardReadError(f"{tar}: cannot read (truncated or changed since start-up; DALI: {reason})")
        bad = self._undecodable()
        if bad is not None:
            return ShardReadError(f"{bad}: cannot decode its image (DALI: {reason})")
        return ShardReadError(f"{self.data_dir}: DALI failed while reading: {reason}")

    def _undecodable(self) -> str | None:
        """"TAR: sample KEY" of the first sample of the batches DALI may have been preparing that PIL cannot
        decode either, or None."""
        import webdataset.autodecode

        decode = webdataset.autodecode.imagehandler("rgb8")
        for n in range(PREFETCH + 2):
            epoch, samples = self.order.walk(self._epoch, self._samples, n)
            for i in self.order.rank_part(epoch, samples)[0]:
                data, _, tar = self.index.read(int(i))
                try:
                    decode(self.format, bytes(self.index.image_bytes(data, int(i))))
                except Exception:
                    return f"{tar}: sample {self.index.keys[int(i)]}"
        return None

    def _batches(self) -> Iterator[dict[str, Any]]:
        while True:
            try:
                out = next(self._iter)[0]
            except StopIteration:
                raise RuntimeError("data: DALI ended the stream (internal error)") from None
            except Exception as e:
                raise self._read_error(e) from None
            batch = {"image": out["image"] if out["image"].dtype == self.dtype else out["image"].to(self.dtype)}
            if "attr" in out:
                batch["attr"] = out["attr"].long()
            if "embed" in out:
                batch["embed"] = out["embed"].float()
            yield batch


# ---------------------------------------------------------------------------------------------------------------
# PyTorch backend


class _BatchReader(torch.utils.data.Dataset):
    """Reads and decodes one batch, given as (sample numbers, flips); runs in DataLoader workers."""

    def __init__(self, index: SampleIndex, size: int):
        import webdataset.autodecode

        self.index, self.size = index, size
        self.decode = webdataset.autodecode.imagehandler("rgb8")  # PIL -> HWC uint8 numpy

    def __getitem__(self, item: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
        samples, flips = item
        ix, S = self.index, self.size
        images = np.empty((len(samples), S, S, 3), np.uint8)
        attrs = np.empty((len(samples), ix.num_attrs), np.int8)
        for j, i in enumerate(samples):
            i = int(i)
            data, _, tar = ix.read(i)
            try:
                image = self.decode(ix.fmt, bytes(ix.image_bytes(data, i)))
            except Exception as e:
                raise ShardReadError(f"{tar}: sample {ix.keys[i]}: cannot decode its {ix.fmt} "
                                     f"({type(e).__name__}: {e})") from None
            if image.shape != (S, S, 3):
                raise ShardReadError(f"{tar}: sample {ix.keys[i]} is {image.shape}, not {S}x{S} RGB")
            images[j] = image[:, ::-1] if flips[j] else image
            if ix.num_attrs:
                attrs[j] = ix.attributes(data, i)
        batch = {"image": torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))}
        if ix.num_attrs:
            batch["attr"] = torch.from_numpy(attrs)
        if ix.embed_path:
            batch["embed"] = torch.from_numpy(ix.embedding_rows(samples))
        return batch


def _ignore_stop_signals(_worker_id: int) -> None:
    """Workers leave the stop signals to the main process, which finishes its step and saves a checkpoint.

    Slurm and Ctrl-C signal the whole process group; a worker killed by it would make the main process raise
    before it could save. Workers still exit with the main process (PyTorch's watchdog checks the parent).
    """
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


# Every DataLoader iterator this module started, and its worker processes. The iterator, not the DataLoader, owns
# the workers, and it can outlive its DataLoader (a traceback that keeps the failed epoch's frames keeps it), so the
# exit handler below tracks iterators and workers themselves.
_ITERATORS: "weakref.WeakSet[Any]" = weakref.WeakSet()
_WORKERS: "weakref.WeakSet[multiprocessing.process.BaseProcess]" = weakref.WeakSet()


def _stop_workers(it: Any) -> None:
    """Stop one iterator's workers: PyTorch's orderly shutdown (as its __del__ does), then SIGKILL any still alive."""
    try:
        it._shutdown_workers()  # private, but the same call DataLoader makes when an iterator is dropped
    finally:
        _kill(getattr(it, "_workers", []))


def _kill(workers: Iterable[multiprocessing.process.BaseProcess]) -> None:
    for w in workers:
        if w.is_alive():
            w.kill()
            w.join(timeout=5)


@atexit.register
def _stop_workers_at_exit() -> None:
    """Workers ignore SIGTERM, so multiprocessing's own exit handler (terminate, then join without a timeout) would
    wait on a live one forever: stop them first. atexit runs the last-registered handler first, and multiprocessing
    registered its handler when it was imported, above."""
    for it in list(_ITERATORS):
        try:
            _stop_workers(it)
        except Exception:  # exiting: a worker that fails to stop politely is killed below
            pass
    _kill(list(_WORKERS))


class _EpochPlan(torch.utils.data.Sampler):
    """Yields this rank's part of the remaining batches of the loader's current epoch as (sample numbers, flips)."""

    def __init__(self, loader: "TorchLoader"):
        self.loader = weakref.ref(loader)  # no reference cycle: a dropped loader shuts its workers down at once

    def __iter__(self):
        ld = self.loader()
        epoch, samples = ld._epoch, ld._samples
        while ld.order.batches_from(samples):
            yield ld.order.rank_part(epoch, samples)
            samples += ld.order.step(samples)


class TorchLoader(Loader):
    backend = "torch"

    def __init__(self, *args, state: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if state is not None:
            self._load_state(state)
        workers = self.num_threads if self.num_threads is not None else min(os.cpu_count() or 1, 8)
        self._loader = torch.utils.data.DataLoader(
            _BatchReader(self.index, self.image_size), batch_size=None,
            sampler=_EpochPlan(self), num_workers=workers, pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=_ignore_stop_signals)

    def _batches(self) -> Iterator[dict[str, Any]]:
        if self._loader.num_workers and self._loader._iterator is None:
            # Workers are about to be forked: collect garbage here first. A DALI pipeline left to the collector and
            # collected in a forked child (threading's after-fork hook can run the collector) waits forever in its
            # __del__ for DALI threads that do not exist there, and that worker never delivers a batch.
            gc.collect()
        batches = iter(self._loader)
        if self._loader.num_workers:
            _ITERATORS.add(batches)
            _WORKERS.update(batches._workers)
        while True:
            try:
                out = next(batches)
            except ShardReadError as e:  # from a worker: the message carries its traceback; keep the last line
                if self._loader.num_workers:  # the epoch is lost: free the workers now, start afresh next epoch
                    _stop_workers(batches)
                    self._loader._iterator = None
                last = str(e).strip().splitlines()[-1]
                raise ShardReadError(last.split("ShardReadError: ", 1)[-1]) from None
            image = out["image"].to(self.device, non_blocking=True)
            batch = {"image": image.float().sub_(127.5).div_(127.5).to(self.dtype)}
            if "attr" in out:
                batch["attr"] = out["attr"].to(self.device, non_blocking=True).long()
            if "embed" in out:
                batch["embed"] = out["embed"].to(self.device, non_blocking=True)
            yield batch


# ---------------------------------------------------------------------------------------------------------------


def make_loader(data_dir: str | Path, batch_size: int, *, split: str = "train", backend: str = "dali",
                device: str | torch.device = "cuda", shuffle: bool = True, flip: bool = True, seed: int = 0,
                rank: int = 0, world_size: int = 1, dtype: torch.dtype = torch.float32, drop_last: bool = False,
                num_threads: int | None = None, state: dict | None = None, verify: bool = False,
                where: str = "", embeddings: str | None = None) -> Loader:
    """A Loader over the shards in `data_dir` (see the module docstring).

    batch_size: this rank's samples per batch; a global batch is world_size x batch_size.
    num_threads: DALI's CPU threads, or the torch backend's DataLoader workers (0: in the calling process).
    verify: also compare every tar's and index's sha256 with the manifest at start-up (sizes are always checked).
    state: a state_dict() of a loader over the same samples with the same seed (any backend, batch size or number
    of ranks): continue where it was taken.
    where: "NAME=0|1,...": only the samples whose attributes match.
    embeddings: deliver each sample's reference embedding as batch["embed"] from the set of that name ("": the only
    set; None: none), checked against the manifest (size and shards always, sha256 with verify).
    """
    if backend not in ("dali", "torch"):
        raise DataError(f"data: backend must be 'dali' or 'torch', not {backend!r}")
    if batch_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"data: need batch_size >= 1 and 0 <= rank < world_size (got {batch_size}, "
                        f"{rank}, {world_size})")
    if world_size > 1 and not drop_last:  # a last, partial global batch could leave a rank without a sample
        raise DataError(f"data: several ranks ({world_size}) read with drop_last=True only")
    data_dir = Path(data_dir)
    try:
        manifest = read_manifest(data_dir)
    except ManifestError as e:  # callers catch this module's errors as DataError (train.py exits on one cleanly)
        raise DataError(str(e)) from None
    shards = _check_shards(data_dir, manifest, split, verify)
    if backend == "dali":
        _import_dali()  # fail with the pip hint before anything else
    cls = DaliLoader if backend == "dali" else TorchLoader
    return cls(data_dir, manifest, shards, batch_size, split=split, device=_resolve_device(device),
               shuffle=shuffle, flip=flip, seed=seed, rank=rank, world_size=world_size, dtype=dtype,
               drop_last=drop_last, num_threads=num_threads, state=state, where=where, embeddings=embeddings,
               verify=verify)

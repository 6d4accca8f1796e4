"""The per-rank data order of checkpoint formats 0 and 1, kept so that a run started before the global order
(data.py) continues exactly as it would have, on the same number of ranks. New runs never use it.

Each rank read its own contiguous part of the split (samples [floor(r N / W), floor((r+1) N / W)) in manifest order):
- "dali": fn.readers.webdataset shuffling in a buffer of INITIAL_FILL samples, coin flips from DALI's seeded RNG; the
  position was DALI's own checkpoint (bytes), which restores only into the same pipeline and number of ranks.
- "torch": a permutation of the rank's samples per epoch from (seed, epoch, rank), flips likewise; the position was
  (epoch, batches consumed).
train.py resumes such a position with `make_loader(..., state=that rank's state)`; on another number of ranks the
run continues in the global order instead (the epoch's order restarts once).
"""
from __future__ import annotations

import gc
import math
import os
import re
import weakref
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from data import (
    _ITERATORS,
    _WORKERS,
    DALI_PIP,
    HW_DECODER_LOAD,
    PREFETCH,
    DaliMissingError,
    DataError,
    SampleIndex,
    ShardReadError,
    _check_shards,
    _ignore_stop_signals,
    _resolve_device,
    _stop_workers,
    keep_batch_memory_mapped,
    rank_range,
)
from manifest import MANIFEST, ManifestError, attribute_names, read_manifest

INITIAL_FILL = 4096  # DALI shuffle buffer (encoded samples: ~3 kB each at 64x64, so ~12 MB)
STATE_KEYS = ("backend", "split", "seed", "rank", "world_size", "batch_size", "shuffle", "flip", "drop_last",
              "num_samples")


def is_v1_state(state: Any) -> bool:
    """Whether `state` is one rank's position of this module's loaders (checkpoint formats 0 and 1)."""
    return isinstance(state, dict) and all(k in state for k in STATE_KEYS + ("epoch", "batches"))


def _import_dali_v1():
    try:
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError as e:
        raise DaliMissingError(f"data: backend='dali' needs NVIDIA DALI ({e}): {DALI_PIP}; "
                               "or use backend='torch'") from None
    return fn, types, Pipeline, DALIGenericIterator, LastBatchPolicy


# ---------------------------------------------------------------------------------------------------------------
# The loader: epoch and position bookkeeping shared by both backends


class Loader:
    """One epoch per iteration over this rank's samples; see the module docstring.

    Attributes: image_size (S), attributes (names, [] without), num_samples (this rank's samples per epoch),
    batch_size, drop_last, device, dtype, backend, epoch (the epoch the current or next iteration belongs to).
    Iterating again after a partial iteration continues the same epoch where it stopped (one iteration at a time).
    """

    backend = ""
    per_rank = True  # its state_dict() is this rank's alone (train.py gathers one per rank)

    def __init__(self, data_dir: Path, manifest: dict, shards: list[dict], batch_size: int, *, split: str,
                 device: torch.device, shuffle: bool, flip: bool, seed: int, rank: int, world_size: int,
                 dtype: torch.dtype, drop_last: bool, num_threads: int | None):
        self.data_dir, self.shards, self.split = data_dir, shards, split
        self.image_size = int(manifest["size"])
        self.format = manifest["format"]
        self.attributes = attribute_names(manifest)
        self.batch_size, self.device, self.dtype = batch_size, device, dtype
        self.shuffle, self.flip, self.seed, self.drop_last = shuffle, flip, seed, drop_last
        self.rank, self.world_size, self.num_threads = rank, world_size, num_threads
        self.total = sum(int(s["count"]) for s in shards)
        self.start, self.stop = rank_range(self.total, rank, world_size)
        self.num_samples = self.stop - self.start
        if drop_last:
            # Every rank stops after the same number of full batches (DDP needs equal steps), so a rank with one
            # sample more than the smallest rank may drop a batch more.
            self._len = (self.total // world_size) // batch_size
            if self._len == 0:
                raise DataError(f"{data_dir / MANIFEST}: split {split!r} has {self.num_samples} samples on rank "
                                f"{rank}: fewer than one batch of {batch_size} with drop_last=True")
        else:
            self._len = math.ceil(self.num_samples / batch_size)
        self._epoch, self._batches = 0, 0  # position: batches of `_epoch` already yielded

    def __len__(self) -> int:
        return self._len

    @property
    def epoch(self) -> int:
        self._roll()
        return self._epoch

    def _roll(self) -> None:
        if self._batches >= self._len:
            self._epoch, self._batches = self._epoch + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._roll()
        epoch, batches = self._epoch, self._epoch_batches()
        # Ends early when `epoch` or state_dict() has already moved the position past this epoch's last batch.
        while self._epoch == epoch and self._batches < self._len:
            batch = next(batches)
            self._batches += 1
            if self._batches == self._len:
                self._finish_epoch()
            yield batch
        self._roll()

    def state_dict(self) -> dict:
        """Position as plain values (and DALI's checkpoint as bytes): fits torch.load(weights_only=True)."""
        self._roll()
        state = {k: getattr(self, k) for k in STATE_KEYS}
        state.update(epoch=self._epoch, batches=self._batches, samples=self._samples_before(self._batches))
        return state

    def _samples_before(self, batches: int) -> int:
        return min(batches * self.batch_size, self.num_samples)

    def _check_state(self, state: dict) -> None:
        if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS + ("epoch", "batches")):
            raise DataError(f"{self.data_dir / MANIFEST}: data state is not a loader state_dict()")
        differ = [f"{k}={state[k]!r} (now {getattr(self, k)!r})" for k in STATE_KEYS if state[k] != getattr(self, k)]
        if differ:
            raise DataError(f"{self.data_dir / MANIFEST}: cannot resume the data position: " + ", ".join(differ))
        if not 0 <= int(state["batches"]) <= self._len:
            raise DataError(f"{self.data_dir / MANIFEST}: data state at batch {state['batches']} of {self._len}")
        self._epoch, self._batches = int(state["epoch"]), int(state["batches"])

    # Backends implement these.
    def _epoch_batches(self) -> Iterator[dict[str, Any]]:
        """The remaining batches of the current epoch, from batch `self._batches` on."""
        raise NotImplementedError

    def _finish_epoch(self) -> None:
        """Called before the epoch's last batch is handed out, so state_dict() then points at the next epoch."""


# ---------------------------------------------------------------------------------------------------------------
# DALI backend


class DaliLoader(Loader):
    backend = "dali"

    def __init__(self, *args, state: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        fn, types, Pipeline, DALIGenericIterator, LastBatchPolicy = _import_dali_v1()
        checkpoint = None
        if state is not None:
            self._check_state(state)
            checkpoint = state.get("dali")
            if not isinstance(checkpoint, bytes):
                raise DataError(f"{self.data_dir / MANIFEST}: data state has no DALI checkpoint")
        gpu = self.device.type == "cuda"
        if not gpu:
            keep_batch_memory_mapped()
        threads = self.num_threads or (min(4, os.cpu_count() or 1) if gpu else (os.cpu_count() or 1))
        S = self.image_size
        # The seed covers the reader's shuffle buffer and the coin flips; ranks differ so their flips differ.
        # On the CPU, DALI's dynamic executor hands its output buffers to torch through DLPack instead of the
        # iterator copying every batch into a new tensor (batches stay valid however long the caller keeps them).
        # On a GPU the classic executor stays: its copy is cheap there, and the dynamic one is unmeasured on a GPU
        # (bench/gpu_check.sh would show it).
        pipe = Pipeline(batch_size=self.batch_size, num_threads=threads, device_id=self.device.index if gpu else None,
                        seed=(self.seed * 1_000_003 + self.rank) % (2**31), prefetch_queue_depth=PREFETCH,
                        enable_checkpointing=True, checkpoint=checkpoint, exec_dynamic=not gpu)
        with pipe:
            exts = [self.format] + (["attr"] if self.attributes else [])
            outs = fn.readers.webdataset(
                paths=[str(self.data_dir / s["tar"]) for s in self.shards],
                index_paths=[str(self.data_dir / s["idx"]) for s in self.shards],
                ext=exts, missing_component_behavior="error", dtypes=[types.UINT8, types.INT8][:len(exts)],
                random_shuffle=self.shuffle, initial_fill=max(1, min(INITIAL_FILL, self.num_samples)),
                shard_id=self.rank, num_shards=self.world_size,
                # Each rank keeps its part; pad_last_batch makes the reader end every epoch on a batch boundary
                # (the iterator's PARTIAL policy trims the padding), so no epoch borrows from the next.
                stick_to_shard=True, pad_last_batch=True,
                # Plain reads: a tar truncated under a memory map would kill the process with SIGBUS.
                dont_use_mmap=True, name="Reader")
            if not isinstance(outs, (list, tuple)):
                outs = [outs]
            if gpu:
                images = fn.decoders.image(outs[0], device="mixed", output_type=types.RGB,
                                           hw_decoder_load=HW_DECODER_LOAD, preallocate_width_hint=S,
                                           preallocate_height_hint=S)
            else:
                images = fn.decoders.image(outs[0], device="cpu", output_type=types.RGB)
            native = {torch.float16: types.FLOAT16, torch.float32: types.FLOAT}
            images = fn.crop_mirror_normalize(
                images, dtype=native.get(self.dtype, types.FLOAT), output_layout="CHW", mean=[127.5] * 3,
                std=[127.5] * 3, mirror=fn.random.coin_flip(probability=0.5) if self.flip else 0)
            outputs, self._names = [images], ["image"]
            if self.attributes:
                outputs.append(outs[1].gpu() if gpu else outs[1])
                self._names.append("attr")
            pipe.set_outputs(*outputs)
        try:
            self._iter = DALIGenericIterator(pipe, self._names, reader_name="Reader", auto_reset=True,
                                             last_batch_policy=LastBatchPolicy.PARTIAL)
        except RuntimeError as e:
            if checkpoint is not None and "checkpoint" in str(e):
                raise DataError(f"{self.data_dir / MANIFEST}: cannot restore DALI's position: the state comes from "
                                f"another pipeline (device {state.get('dali_device')!r}, now "
                                f"{self.device.type!r})") from None
            raise self._read_error(e) from None

    def state_dict(self) -> dict:
        state = super().state_dict()
        # DALI's checkpoint restores only into the same graph: the decoder differs between CPU and GPU.
        state.update(dali=bytes(self._iter.checkpoints()[0]), dali_device=self.device.type)
        return state

    def _read_error(self, e: Exception) -> Exception:
        """DALI's multi-line error as one line naming the tar (found by its size when DALI does not say)."""
        text = str(e)
        named = [s["tar"] for s in self.shards if s["tar"] in text]
        changed = [s["tar"] for s in self.shards
                   if not (self.data_dir / s["tar"]).is_file()
                   or (self.data_dir / s["tar"]).stat().st_size != int(s["bytes"])]
        found = re.search(r"encountered:\s*\n\s*(.+)", text)
        reason = found.group(1) if found else (text.strip().splitlines() or [type(e).__name__])[0]
        reason = re.sub(r'^Assert on ".*" failed:\s*', "", reason.strip())
        for tar in changed or named:
            why = "truncated or changed since start-up; " if changed else ""
            return ShardReadError(f"{self.data_dir / tar}: cannot read ({why}DALI: {reason[:200]})")
        return ShardReadError(f"{self.data_dir}: DALI failed while reading: {reason[:300]}")

    def _epoch_batches(self) -> Iterator[dict[str, Any]]:
        while True:
            try:
                out = next(self._iter)[0]
            except StopIteration:
                raise RuntimeError("data: DALI ended the epoch early (internal error)") from None
            except RuntimeError as e:
                raise self._read_error(e) from None
            n = out["image"].shape[0]
            if n == 0:  # a rank with fewer samples gets an all-padding batch at the end: not a batch
                continue
            yield self._convert(out)

    def _convert(self, out: dict) -> dict:
        batch = {"image": out["image"] if out["image"].dtype == self.dtype else out["image"].to(self.dtype)}
        if "attr" in out:
            n = out["attr"].shape[-1]
            if n != len(self.attributes):  # DALI reads .attr entries of any length; the manifest gives the count
                raise DataError(f"{self.data_dir / MANIFEST}: lists {len(self.attributes)} attributes, but the shards' "
                                f".attr entries hold {n} bytes")
            batch["attr"] = out["attr"].long()
        return batch

    def _finish_epoch(self) -> None:
        # Drain what DALI still holds of this epoch (padding-only or dropped batches) so that the iterator resets
        # to the next epoch now and a checkpoint taken during the last batch restores into the next epoch.
        try:
            while True:
                next(self._iter)
        except StopIteration:
            pass
        except RuntimeError as e:
            raise self._read_error(e) from None


# ---------------------------------------------------------------------------------------------------------------
# PyTorch backend


def _rank_index(data_dir: Path, shards: list[dict], start: int, stop: int, fmt: str, num_attrs: int) -> SampleIndex:
    """Where each of the rank's samples [start, stop) lies: data.SampleIndex (every sample of the split parsed and
    checked) cut to that range; _BatchReader reads its tars, tar_ids, offsets, lengths, img, attr and keys."""
    index = SampleIndex(data_dir, shards, fmt, num_attrs)
    for name in ("tar_ids", "offsets", "lengths", "img", "attr", "keys"):
        setattr(index, name, getattr(index, name)[start:stop])
    return index


class _BatchReader(torch.utils.data.Dataset):
    """Reads and decodes one batch, given as (local sample indices, flips); runs in DataLoader workers."""

    def __init__(self, index: SampleIndex, fmt: str, size: int, num_attrs: int):
        import webdataset.autodecode

        self.index, self.fmt, self.size, self.num_attrs = index, fmt, size, num_attrs
        self.decode = webdataset.autodecode.imagehandler("rgb8")  # PIL -> HWC uint8 numpy
        self._fds: dict[int, int] = {}
        self._pid = -1

    def __getitem__(self, item: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
        samples, flips = item
        if self._pid != os.getpid():  # file descriptors per process (workers are forked)
            self._fds, self._pid = {}, os.getpid()
        ix, S = self.index, self.size
        images = np.empty((len(samples), S, S, 3), np.uint8)
        attrs = np.empty((len(samples), self.num_attrs), np.int8)
        for j, i in enumerate(samples):
            tar = int(ix.tar_ids[i])
            fd = self._fds.get(tar)
            if fd is None:
                fd = self._fds[tar] = os.open(ix.tars[tar], os.O_RDONLY)
            length = int(ix.lengths[i])
            data = os.pread(fd, length, int(ix.offsets[i]))
            if len(data) != length:
                raise ShardReadError(f"{ix.tars[tar]}: truncated: sample {ix.keys[i]} needs bytes "
                                     f"{ix.offsets[i]}..{ix.offsets[i] + length}, the file has {os.fstat(fd).st_size}")
            o, n = ix.img[i]
            try:
                image = self.decode(self.fmt, data[o:o + n])
            except Exception as e:
                raise ShardReadError(f"{ix.tars[tar]}: sample {ix.keys[i]}: cannot decode its {self.fmt} "
                                     f"({type(e).__name__}: {e})") from None
            if image.shape != (S, S, 3):
                raise ShardReadError(f"{ix.tars[tar]}: sample {ix.keys[i]} is {image.shape}, not {S}x{S} RGB")
            images[j] = image[:, ::-1] if flips[j] else image
            if self.num_attrs:
                attrs[j] = np.frombuffer(data, np.int8, self.num_attrs, int(ix.attr[i]))
        batch = {"image": torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))}
        if self.num_attrs:
            batch["attr"] = torch.from_numpy(attrs)
        return batch


class _EpochPlan(torch.utils.data.Sampler):
    """Yields the remaining batches of the loader's current epoch as (local sample indices, flips)."""

    def __init__(self, loader: "TorchLoader"):
        self.loader = weakref.ref(loader)  # no reference cycle: a dropped loader shuts its workers down at once

    def __iter__(self):
        ld = self.loader()
        order, flips = ld.plan(ld._epoch)
        for b in range(ld._batches, len(ld)):
            sl = slice(b * ld.batch_size, min((b + 1) * ld.batch_size, ld.num_samples))
            yield order[sl], flips[sl]


class TorchLoader(Loader):
    backend = "torch"

    def __init__(self, *args, state: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if state is not None:
            self._check_state(state)
        index = _rank_index(self.data_dir, self.shards, self.start, self.stop, self.format, len(self.attributes))
        workers = self.num_threads if self.num_threads is not None else min(os.cpu_count() or 1, 8)
        self._loader = torch.utils.data.DataLoader(
            _BatchReader(index, self.format, self.image_size, len(self.attributes)), batch_size=None,
            sampler=_EpochPlan(self), num_workers=workers, pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=_ignore_stop_signals)

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's order of the rank's samples and each position's flip, from (seed, epoch, rank) alone."""
        n = self.num_samples
        order = np.random.default_rng([self.seed, epoch, self.rank, 0]).permutation(n) if self.shuffle \
            else np.arange(n)
        flips = np.random.default_rng([self.seed, epoch, self.rank, 1]).random(n) < 0.5 if self.flip \
            else np.zeros(n, bool)
        return order, flips

    def _epoch_batches(self) -> Iterator[dict[str, Any]]:
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
            yield batch


# ---------------------------------------------------------------------------------------------------------------


def make_loader(data_dir: str | Path, batch_size: int, *, split: str = "train", backend: str = "dali",
                device: str | torch.device = "cuda", shuffle: bool = True, flip: bool = True, seed: int = 0,
                rank: int = 0, world_size: int = 1, dtype: torch.dtype = torch.float32, drop_last: bool = False,
                num_threads: int | None = None, state: dict | None = None, verify: bool = False) -> Loader:
    """A per-rank Loader of formats 0/1 over the shards in `data_dir`, resuming `state` (see the module docstring).

    num_threads: DALI's CPU threads, or the torch backend's DataLoader workers (0: in the calling process).
    verify: also compare every tar's and index's sha256 with the manifest at start-up (sizes are always checked).
    state: a state_dict() of a loader with the same arguments: continue where it was taken.
    """
    if backend not in ("dali", "torch"):
        raise DataError(f"data: backend must be 'dali' or 'torch', not {backend!r}")
    if batch_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"data: need batch_size >= 1 and 0 <= rank < world_size (got {batch_size}, "
                         f"{rank}, {world_size})")
    if state is not None and state.get("backend") != backend:
        raise DataError(f"{Path(data_dir) / MANIFEST}: data state is from backend {state.get('backend')!r}, "
                        f"not {backend!r}")
    data_dir = Path(data_dir)
    try:
        manifest = read_manifest(data_dir)
    except ManifestError as e:  # callers catch this module's errors as DataError (train.py exits on one cleanly)
        raise DataError(str(e)) from None
    shards = _check_shards(data_dir, manifest, split, verify)
    total = sum(int(s["count"]) for s in shards)
    if total < world_size:
        raise DataError(f"{data_dir / MANIFEST}: split {split!r} has {total} samples, fewer than {world_size} ranks")
    cls = DaliLoader if backend == "dali" else TorchLoader
    if backend == "dali":
        _import_dali_v1()  # fail with the pip hint before anything else
    return cls(data_dir, manifest, shards, batch_size, split=split, device=_resolve_device(device),
               shuffle=shuffle, flip=flip, seed=seed, rank=rank, world_size=world_size, dtype=dtype,
               drop_last=drop_last, num_threads=num_threads, state=state)

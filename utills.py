"""Checkpoints that survive a kill at any moment, and the random state that makes a resumed run exact.

A checkpoint is one file `RUN/checkpoints/step-{step:08d}.pt`: a dict of state dicts and plain values, written to a
temporary name in the same folder, fsynced, renamed over (atomic on POSIX), with the folder fsynced too; older ones are
pruned only after the new one is durable. Loading uses `torch.load(weights_only=True)`, so a checkpoint can never run
code, and "valid" means: it loads, has the keys every reader needs, and the weights in "model" and "ema" are finite.
"""
from __future__ import annotations

import json
import os
import random
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atomic import atomic_write

# Keys every consumer (train.py resume, sample.py, evaluate.py) reads.
REQUIRED_KEYS = ("model", "ema", "step", "config", "model_config", "diffusion_config")
CHECKPOINT_RE = re.compile(r"^step-(\d{8,})\.pt$")
# Test hook: seconds to sleep after the temporary file is durable and before the rename, so a test can kill mid-write.
PAUSE_ENV = "DDPM_TEST_PAUSE_BEFORE_RENAME"


@dataclass(frozen=True)
class RunPaths:
    """Every path of a run folder, named once: what train.py writes and sample.py, evaluate.py and pictures.py read."""
    root: Path

    @property
    def config(self) -> Path:  # the TrainConfig of the latest start, as JSON
        return self.root / "config.json"

    @property
    def checkpoints(self) -> Path:  # step-NNNNNNNN.pt
        return self.root / "checkpoints"

    @property
    def samples(self) -> Path:  # the fixed-noise EMA grids, step-NNNNNNNN.png
        return self.root / "samples"

    @property
    def metrics(self) -> Path:  # one JSON record per log interval
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def eval(self) -> Path:  # evaluate.py's generated images, one folder per checkpoint and sampler setting
        return self.root / "eval"

    @property
    def eval_json(self) -> Path:  # evaluate.py's latest result (each result is also appended to eval.jsonl)
        return self.root / "eval.json"

    @property
    def progress_gif(self) -> Path:
        return self.root / "progress.gif"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:08d}.pt"

    def sample_grid(self, step: int) -> Path:
        return self.samples / f"step-{step:08d}.png"


def run_paths(run_dir: str | os.PathLike) -> RunPaths:
    """The paths of the run folder `run_dir`."""
    return RunPaths(Path(run_dir))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """RUN/metrics.jsonl -> records sorted by step; a resumed run's repeated steps keep their last record, and a line
    cut short by a kill (or any line that is not a record with a step) is skipped. A missing file reads as []."""
    path = Path(path)
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            by_step[int(rec["step"])] = rec
        except (ValueError, TypeError, KeyError):
            continue
    return [by_step[k] for k in sorted(by_step)]


def trim_metrics(path: str | os.PathLike, step: int) -> None:
    """Drop metrics.jsonl records after `step`, written by a run that was killed after its last checkpoint."""
    path = Path(path)
    if path.exists():
        kept = [r for r in read_metrics(path) if r["step"] <= step]
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt, incomplete or holds non-finite weights (one-line message)."""


class CheckpointWarning(UserWarning):
    """A newer checkpoint was skipped because it did not verify."""


def _pause_before_rename() -> None:
    """Test hook: a kill while a checkpoint is being written (see PAUSE_ENV)."""
    if float(os.environ.get(PAUSE_ENV, "0") or 0) > 0:
        time.sleep(float(os.environ[PAUSE_ENV]))


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save `obj` to `path` atomically (atomic.atomic_write: temp file, fsync, rename, fsync the folder)."""
    return atomic_write(path, lambda f: torch.save(obj, f), before_replace=_pause_before_rename)


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write `data` to `path` atomically (atomic.atomic_write); makes the folder, leaves no temp file on failure."""
    return atomic_write(path, data)


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of `step` lives."""
    return run_paths(run_dir).checkpoint(step)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The run's checkpoint files, oldest (lowest step) first; `run_dir` may also be the checkpoints folder itself."""
    run_dir = Path(run_dir)
    folder = run_paths(run_dir).checkpoints
    if not folder.is_dir():
        folder = run_dir
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def save_checkpoint(run_dir: str | os.PathLike, ckpt: dict, step: int, keep: int) -> Path:
    """Write `ckpt` as `run_dir/checkpoints/step-{step:08d}.pt`, then keep only the newest `keep` (0 keeps all).

    Pruning comes after the new file is renamed into place and its folder fsynced, so a kill at any moment leaves at
    least one complete checkpoint. Temporary files left by an earlier killed write are removed as well.
    """
    path = atomic_save(ckpt, checkpoint_path(run_dir, step))
    folder = path.parent
    for stale in folder.glob(".step-*.pt.tmp-*"):
        if not stale.name.endswith(f"-{os.getpid()}"):
            stale.unlink(missing_ok=True)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            if old != path:
                old.unlink(missing_ok=True)
    return path


def _non_finite(obj: Any, where: str) -> str | None:
    """The first place in a nested dict/list of tensors holding NaN or inf, or None."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            return where
        return None
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for key, value in items:
        bad = _non_finite(value, f"{where}.{key}")
        if bad is not None:
            return bad
    return None


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load and verify one checkpoint file; raises CheckpointError naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, unpickling refused: all mean "not a usable checkpoint"
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        # weights_only refusals explain themselves on the "Unsupported global" line, not the first one.
        reason = next((line for line in lines if "Unsupported global" in line), lines[0])
        raise CheckpointError(f"{path}: cannot be loaded ({reason[:200]})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint dict (found {type(ckpt).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: missing keys {', '.join(missing)}")
    for key in ("model", "ema"):
        bad = _non_finite(ckpt[key], key)
        if bad is not None:
            raise CheckpointError(f"{path}: non-finite values in {bad}")
    return ckpt


def find_latest(run_dir: str | os.PathLike, map_location: Any = "cpu") -> tuple[Path, dict] | None:
    """The newest checkpoint that loads and verifies, with its contents; corrupt newer ones are warned about."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path, map_location=map_location)
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint {e}; trying the previous one", CheckpointWarning, stacklevel=2)
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run folder (or its checkpoints folder) -> its newest valid checkpoint; a file -> itself."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        found = find_latest(path)
        if found is None:
            raise CheckpointError(f"{path}: no valid checkpoint found")
        return found[0]
    raise FileNotFoundError(f"{path}: no such checkpoint file or run folder")


def capture_rng() -> dict:
    """Every global random state a training step draws from, as weights_only-loadable values.

    Python's state becomes nested lists of ints (weights_only refuses arbitrary objects), numpy's a list of plain
    values, torch's CPU state a ByteTensor, and each CUDA device's a ByteTensor (only when CUDA is initialised).
    """
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state = {
        "python": [int(version), [int(x) for x in internal], gauss],
        "numpy": [str(np_name), [int(x) for x in np_keys], int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    """Put back what `capture_rng` captured (CUDA states only for the devices present)."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np.asarray(np_keys, dtype=np.uint32), int(np_pos), int(np_has_gauss),
                         float(np_gauss)))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        for device, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.as_tensor(s, dtype=torch.uint8).cpu(), device)

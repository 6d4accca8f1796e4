"""The run folder and its checkpoints: one home for that contract, shared by train.py, sample.py and evaluate.py.

- RunPaths names every path of a run folder once; read_metrics is the one reader of metrics.jsonl.
- make_checkpoint builds the checkpoint dict and restore_checkpoint, beside it, puts it back into the training
  objects: a new field is added there and nowhere else. Every checkpoint carries FORMAT_VERSION; files written before
  versions existed count as version 0 and are upgraded when loaded (`upgrade`).
- load_model rebuilds a model for sampling from a run folder, a checkpoint or an exported .safetensors file, and
  export_safetensors writes one.
- The device, precision and autocast choices, the weights digest and the --threads setting every script shares.

A checkpoint is one file `RUN/checkpoints/step-{step:08d}.pt`: a dict of state dicts and plain values, written to a
temporary name in the same folder, fsynced, renamed over (atomic on POSIX), with the folder fsynced too; older ones are
pruned only after the new one is durable. Loading uses `torch.load(weights_only=True)`, so a checkpoint can never run
code, and "valid" means: it loads, has the keys every reader needs, and the weights in "model" and "ema" are finite.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import random
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from atomic import atomic_write, fsync_dir
from config import ConfigError, UserError
from diffusion import GaussianDiffusion
from ema import AVERAGE_KINDS, EMA, PowerEMA
from unet import UNet

# The checkpoint format. 0: files written before the format carried a version (read as they are, see `upgrade`).
# 1: "format_version" added; per-rank values (data position, random states) always as {"world_size", "ranks"}.
# 2: one data position for all ranks (data.Loader.state_dict of the global order, the same on every rank); the
#    random states stay per rank (dropout masks) and the step's noise is no longer among them (train.py draws it
#    from (seed, step)). A version 0 or 1 data position (one per rank) is kept as it was: the loaders refuse it,
#    and train.py restarts the epoch's order with a message.
FORMAT_VERSION = 2
# Keys every consumer (train.py resume, sample.py, evaluate.py) reads.
REQUIRED_KEYS = ("model", "ema", "step", "config", "model_config", "diffusion_config")
# A post-hoc EMA file (ema.py: a snapshot or a reconstruction) holds one set of averaged weights in "model", no "ema".
AVERAGE_KEYS = ("model", "step", "sigma_rel", "model_config", "diffusion_config")
STEP_FILE_RE = re.compile(r"^step-(\d{8,})\.(pt|png)$")  # a checkpoint (checkpoints/) or a sample grid (samples/)
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}

# Test hooks: environment variables read here and nowhere else, so that they stay out of every config, --help and
# checkpoint. DDPM_TEST_PAUSE_BEFORE_RENAME=S sleeps S seconds after a checkpoint's temporary file is durable and
# before the rename (a test kills the run mid-write); DDPM_TEST_NAN_STEPS="A" or "A:N" makes the loss of step A
# (1-based) and later, or of N steps from A, NaN (the non-finite guard's tests).
PAUSE_ENV = "DDPM_TEST_PAUSE_BEFORE_RENAME"
NAN_ENV = "DDPM_TEST_NAN_STEPS"


def nan_test_steps() -> Callable[[int], bool]:
    """Test hook (NAN_ENV): whether the loss of step `s` (1-based) is to be made NaN; never, without the variable."""
    spec = os.environ.get(NAN_ENV, "").strip()
    if not spec:
        return lambda s: False
    first, _, count = spec.partition(":")
    first, count = int(first), int(count or 0)
    return lambda s: s >= first and (count == 0 or s < first + count)


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
    def eval_history(self) -> Path:  # every evaluate.py result of the run, one JSON record a line
        return self.root / "eval.jsonl"

    @property
    def rolled_back(self) -> Path:  # train.py --rollback moves an abandoned history here, never deleting it
        return self.root / "rolled-back"

    @property
    def lock(self) -> Path:  # held by the live trainer (lock_run)
        return self.root / ".lock"

    @property
    def progress_gif(self) -> Path:
        return self.root / "progress.gif"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def best_fid(self) -> Path:  # the checkpoint with the best training-time FID (not step-*: never pruned or resumed)
        return self.checkpoints / "best-fid.pt"

    @property
    def phema(self) -> Path:  # post-hoc EMA: reconstructed averages (ema.py), phema-SIGMA-step-STEP.pt
        return self.root / "phema"

    @property
    def phema_snapshots(self) -> Path:  # train.py --phema's snapshots, snapshot-STEP-SIGMA.pt (never pruned)
        return self.phema / "snapshots"

    @property
    def phema_sweep_plot(self) -> Path:  # evaluate.py --phema-sweep: FID against sigma_rel
        return self.root / "phema-sweep.png"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:08d}.pt"

    def sample_grid(self, step: int) -> Path:
        return self.samples / f"step-{step:08d}.png"


def owning_run(path: str | os.PathLike) -> Path | None:
    """The run folder a file lies in: RUN for RUN/checkpoints/FILE, RUN/phema/FILE or RUN/phema/snapshots/FILE; None
    for a file elsewhere."""
    path = Path(path)
    for run in path.parents[1:3]:
        paths = run_paths(run)
        if path.parent in (paths.checkpoints, paths.phema, paths.phema_snapshots):
            return run
    return None


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


def step_in_name(path: str | os.PathLike) -> int | None:
    """The step in the name of a checkpoint or sample grid (step-NNNNNNNN.pt / .png); None for other names
    (best-fid.pt)."""
    m = STEP_FILE_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def roll_back(run: RunPaths, step: int) -> Path | None:
    """Move what the run folder holds after `step` aside, into RUN/rolled-back/after-step-NNNNNNNN-TIME/ (never
    deleted): the later checkpoints (and best-fid.pt when it is later), the later sample grids and metrics.jsonl's
    later records, so that the folder again holds one history, up to `step`. Returns the folder, or None when
    nothing came after `step`."""
    later = [p for p in list_checkpoints(run.root) if step_in_name(p) > step]
    grids = sorted(p for p in run.samples.glob("step-*.png") if (step_in_name(p) or -1) > step) \
        if run.samples.is_dir() else []
    records = [r for r in read_metrics(run.metrics) if r["step"] > step]
    best_later = run.best_fid.is_file() and load_checkpoint(run.best_fid)["step"] > step
    snapshots = sorted(p for p in run.phema_snapshots.glob("snapshot-*.pt")
                       if int(p.name.split("-")[1]) > step) if run.phema_snapshots.is_dir() else []
    # ema.py's reconstructions at later steps (phema-SIGMA-step-STEP.pt and their exports) came from those snapshots.
    snapshots += sorted(p for p in run.phema.glob("phema-*-step-*.*")
                        if int(p.stem.rsplit("-", 1)[1]) > step) if run.phema.is_dir() else []
    if not (later or grids or records or best_later or snapshots):
        return None
    aside = run.rolled_back / f"after-step-{step:08d}-{time.strftime('%Y%m%d-%H%M%S')}"
    (aside / "checkpoints").mkdir(parents=True)
    # The records first (a copy), so that a kill at any point loses nothing; then the files, each by a rename.
    if records:
        atomic_write(aside / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
        trim_metrics(run.metrics, step)
    for p in later + ([run.best_fid] if best_later else []):
        os.replace(p, aside / "checkpoints" / p.name)
    if grids:
        (aside / "samples").mkdir()
        for p in grids:
            os.replace(p, aside / "samples" / p.name)
    if snapshots:  # post-hoc EMA snapshots of the abandoned steps: the resumed profiles will write their own
        for p in snapshots:
            folder = aside / "phema" / p.parent.relative_to(run.phema)
            folder.mkdir(parents=True, exist_ok=True)
            os.replace(p, folder / p.name)
    fsync_dir(aside)
    return aside


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, truncated, corrupt, incomplete or holds non-finite weights (one-line message)."""


class CheckpointWarning(UserWarning):
    """A newer checkpoint was skipped because it did not verify."""


def _pause_before_rename() -> None:
    """Test hook: a kill while a checkpoint is being written (PAUSE_ENV, above)."""
    if float(os.environ.get(PAUSE_ENV, "0") or 0) > 0:
        time.sleep(float(os.environ[PAUSE_ENV]))


class _OSErrorKept:
    """A file whose write errors are remembered: torch.save's zip writer turns an OSError (ENOSPC) from the file into
    "RuntimeError: [enforce fail at inline_container.cc] . unexpected pos", and we want the OSError back."""

    def __init__(self, f: Any):
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_save(path: str | os.PathLike, obj: Any) -> Path:
    """torch.save `obj` to `path` atomically (atomic.atomic_write: temp file, fsync, rename, fsync the folder).

    A failed write (disk full, quota, I/O error) raises the OSError itself and leaves no temporary file."""
    def save(f: Any) -> None:
        kept = _OSErrorKept(f)
        try:
            torch.save(obj, kept)
        except RuntimeError:
            if kept.error is not None:
                raise kept.error from None
            raise
    return atomic_write(path, save, before_replace=_pause_before_rename)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (ours or another user's): its temporary files and folders are not stale."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, pattern: str) -> list[Path]:
    """Remove atomic_write's temporary files (NAME.tmp-PID) in `folder` left by processes that are gone (a kill);
    those of live processes, this one included, are never touched. Returns the files removed."""
    removed = []
    for tmp in Path(folder).glob(pattern):
        pid = tmp.name.rpartition("-")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


class WriteError(UserError, RuntimeError):
    """An OS error (disk full, quota, I/O) while writing a run's file: one line naming the file, the error and the
    newest intact checkpoint."""


@contextlib.contextmanager
def os_errors_as_write_error(path: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn an OSError raised in the block into a WriteError naming `path`, the error and, with `run_dir`, the newest
    checkpoint there that is complete (atomic writes leave the previous one intact and no partial file)."""
    try:
        yield
    except OSError as e:
        last = list_checkpoints(run_dir) if run_dir is not None else []
        where = f"; the last intact checkpoint is {last[-1]}" if last else ""
        if run_dir is not None and not last:
            where = "; no checkpoint written yet"
        raise WriteError(f"{path}: {e.strerror or e} (errno {e.errno}) while writing{where}") from None


class RunLocked(UserError, RuntimeError):
    """Another live process trains in this run folder (one line naming it)."""


def lock_run(run: RunPaths) -> Any:
    """Hold an exclusive lock on the run folder for the life of this process (or until the returned file is closed).

    The OS's advisory lock (flock) on RUN/.lock, which the kernel releases when the process dies, so a kill -9 never
    leaves a stale lock on a local disk. The file names the holder (host, PID, start time) for the refusal message.
    On a file system without working locks (some network file systems) this warns and goes on unlocked.
    """
    import fcntl
    import socket

    run.root.mkdir(parents=True, exist_ok=True)
    f = open(run.lock, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunLocked(f"{run.root}: in use by another train.py ({holder}); wait for it to end or use another "
                        f"--out") from None
    except OSError as e:  # ENOLCK / EOPNOTSUPP: the file system cannot lock
        warnings.warn(f"{run.lock}: cannot lock the run folder ({e.strerror}); nothing stops a second trainer from "
                      f"using it at the same time", stacklevel=2)
        return f
    f.seek(0)
    f.truncate()
    f.write(f"host {socket.gethostname()}, PID {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
    f.flush()
    return f


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The run's checkpoint files, oldest (lowest step) first; `run_dir` may also be the checkpoints folder itself."""
    run_dir = Path(run_dir)
    folder = run_paths(run_dir).checkpoints
    if not folder.is_dir():
        folder = run_dir
    if not folder.is_dir():
        return []
    found = [(s, p) for p in folder.iterdir()
             if p.suffix == ".pt" and (s := step_in_name(p)) is not None and p.is_file()]
    return [p for _, p in sorted(found)]


def _link_or_save(source: Path, target: Path, ckpt: dict) -> None:
    """`target` as a second name of the complete file `source` (a hard link renamed into place: atomic, and no second
    serialisation of a checkpoint that may be gigabytes); a new atomic save where the file system has no hard links."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)
        atomic_save(target, ckpt)
        return
    fsync_dir(target.parent)


def save_checkpoint(run_dir: str | os.PathLike, ckpt: dict, step: int, keep: int, best: bool = False) -> Path:
    """Write `ckpt` as `run_dir/checkpoints/step-{step:08d}.pt`, then keep only the newest `keep` (0 keeps all).
    With `best` (a new best training-time FID) also as `best-fid.pt`, which pruning and resume never touch.

    Pruning comes after the new file is renamed into place and its folder fsynced, so a kill at any moment leaves at
    least one complete checkpoint. Temporary files left by an earlier killed write are removed as well.
    """
    path = atomic_save(run_paths(run_dir).checkpoint(step), ckpt)
    if best:
        _link_or_save(path, run_paths(run_dir).best_fid, ckpt)
    remove_stale_temporaries(path.parent, ".step-*.pt.tmp-*")
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
        if "Weights only load failed" in lines[0]:
            # PyTorch's own text suggests weights_only=False; say plainly what that would mean instead.
            named = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f" (it names {named.group(1)})" if named else ""
            raise CheckpointError(f"{path}: refused and not loaded: the file holds Python objects that would run code "
                                  f"when unpickled, which no checkpoint of this project does{what}") from None
        raise CheckpointError(f"{path}: cannot be loaded ({lines[0][:200]})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint dict (found {type(ckpt).__name__})")
    averaged = is_average(ckpt)
    if not averaged:
        ckpt = upgrade(ckpt, path)
    missing = [k for k in (AVERAGE_KEYS if averaged else REQUIRED_KEYS) if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: missing keys {', '.join(missing)}")
    for key in ("model",) if averaged else ("model", "ema"):
        bad = _non_finite(ckpt[key], key)
        if bad is not None:
            raise CheckpointError(f"{path}: non-finite values in {bad}")
    return ckpt


def is_average(ckpt: dict) -> bool:
    """Whether a loaded file is a post-hoc EMA snapshot or reconstruction (ema.py), not a training checkpoint: it
    samples like one but does not resume a run."""
    return ckpt.get("kind") in AVERAGE_KINDS


def upgrade(ckpt: dict, path: str | os.PathLike = "checkpoint") -> dict:
    """A loaded checkpoint of any known format version, in the layout of FORMAT_VERSION (a newer one is refused).

    Version 0 (no "format_version" key) kept one rank's data position and random states bare, and a torchrun run's
    random states as rank 0's plus a "ranks" list; version 1 always packs them as pack_ranks does; version 2 has one
    data position for all ranks (a version 0/1 one stays packed per rank, which the loaders do not resume).
    """
    version = ckpt.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is newer than this code reads "
                              f"(up to {FORMAT_VERSION}); update the code")
    if version == 0:
        ckpt = dict(ckpt)
        for key in ("data_state", "rng"):
            value = ckpt.get(key)
            if value is None or not isinstance(value, dict):
                continue
            if "ranks" in value:
                ckpt[key] = {"world_size": len(value["ranks"]), "ranks": list(value["ranks"])}
            else:
                ckpt[key] = pack_ranks([value])
    if version < FORMAT_VERSION:
        ckpt = {**ckpt, "format_version": FORMAT_VERSION, "upgraded_from": version}
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


# ----------------------------------------------------------------------------------------- the checkpoint's contents

def pack_ranks(values: list) -> dict:
    """Every rank's value of a per-rank part of the checkpoint (data position, random states), in rank order."""
    return {"world_size": len(values), "ranks": list(values)}


def this_rank(packed: dict | None, rank: int, world_size: int) -> Any:
    """This rank's value from pack_ranks, or None when there is none or the number of ranks changed."""
    if not packed or int(packed["world_size"]) != world_size:
        return None
    return packed["ranks"][rank]


@dataclass
class TrainState:
    """The objects a checkpoint is taken from and restored into (None where a file holds no such part)."""
    model: torch.nn.Module  # the plain module: never the DDP or torch.compile wrapper
    ema: EMA
    optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    step: int = 0  # optimizer steps taken (skipped fp16 updates included)
    epoch: int = 0  # the epoch of the last batch trained on
    images_seen: int = 0  # over all ranks
    best_fid: float | None = None  # the best training-time FID so far (train.py --eval-every), None before any
    best_fid_step: int = -1  # the step it was measured at
    evals_since_best: int = 0  # training-time evaluations since the best FID (train.py --patience)
    phema: PowerEMA | None = None  # the post-hoc EMA profiles (train.py --phema; rank 0 only), None without


@dataclass
class Resumed:
    """What a checkpoint gives back besides the objects' states: this rank's data position and random states."""
    data_state: dict | None  # the data position (None: none saved); a version 0/1 one is still packed per rank
    rng: dict | None  # this rank's capture_rng(); None: none saved, or the number of ranks changed


def make_checkpoint(state: TrainState, *, config: dict, diffusion_config: dict, image_size: int,
                    attributes: list[str], data_state: dict | None = None,
                    rngs: list[dict] | None = None, embedding: dict | None = None) -> dict:
    """The checkpoint dict: the one place its keys are written (restore_checkpoint, below, reads them back).

    data_state: the loader's position (one for all ranks); rngs: every rank's random states, in rank order (train.py
    gathers them); None leaves them out (a checkpoint that can be sampled but not resumed exactly). Only tensors and
    plain values: weights_only-loadable. A format 1 run going on in its per-rank order passes data_state packed per
    rank (pack_ranks). embedding: a --cond-embed run's record of its reference embeddings (train.embedding_record).
    """
    return {
        "format_version": FORMAT_VERSION,
        "model": state.model.state_dict(),
        "ema": state.ema.state_dict(),
        "optimizer": state.optimizer.state_dict() if state.optimizer is not None else None,
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "lr_scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
        "step": int(state.step),
        "epoch": int(state.epoch),
        "images_seen": int(state.images_seen),
        "best_fid": None if state.best_fid is None else float(state.best_fid),
        "best_fid_step": int(state.best_fid_step),
        "evals_since_best": int(state.evals_since_best),
        "phema": state.phema.state_dict() if state.phema is not None else None,
        "data_state": data_state,
        "rng": pack_ranks(rngs) if rngs is not None else None,
        "config": dict(config),
        "model_config": dict(state.model.config),
        "diffusion_config": dict(diffusion_config),
        "image_size": int(image_size),
        "attributes": list(attributes),
        "embedding": embedding,
        "versions": versions(),
    }


def restore_checkpoint(ckpt: dict, state: TrainState, *, rank: int = 0, world_size: int = 1) -> Resumed:
    """Put a make_checkpoint dict (any format version, via load_checkpoint) back into `state`'s objects and counters.

    The random states are returned, not applied: the caller restores them last, after everything that draws from them.
    """
    state.model.load_state_dict(ckpt["model"])
    state.ema.load_state_dict(ckpt["ema"])
    if state.optimizer is not None and ckpt.get("optimizer"):
        state.optimizer.load_state_dict(ckpt["optimizer"])
    if state.scheduler is not None and ckpt.get("lr_scheduler"):
        state.scheduler.load_state_dict(ckpt["lr_scheduler"])
    if state.scaler is not None and state.scaler.is_enabled() and ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    state.step, state.epoch = int(ckpt["step"]), int(ckpt.get("epoch", 0))
    state.images_seen = int(ckpt.get("images_seen", 0))
    # Checkpoints from before --eval-every have neither key: no best FID yet.
    state.best_fid = None if ckpt.get("best_fid") is None else float(ckpt["best_fid"])
    state.best_fid_step = int(ckpt.get("best_fid_step", -1))
    state.evals_since_best = int(ckpt.get("evals_since_best", 0))
    if state.phema is not None:  # train.py has checked that the checkpoint tracks the same profiles
        state.phema.load_state_dict(ckpt["phema"])
    return Resumed(data_state=ckpt.get("data_state"), rng=this_rank(ckpt.get("rng"), rank, world_size))


def versions() -> dict[str, str]:
    """Versions of what produced a checkpoint, for the record."""
    out = {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": str(np.__version__)}
    for package in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "torch-ema"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[package] = importlib.metadata.version(package)
    return out


# ------------------------------------------------------------------------------------------- a model for sampling

@dataclass
class LoadedModel:
    """A model ready to sample, with where it came from."""
    model: UNet  # in eval() on the sampling device, the chosen weights in place
    diffusion: GaussianDiffusion
    attributes: list[str]  # conditioning attribute names ([] for an unconditional model)
    source: Path  # the checkpoint or safetensors file
    step: int  # training step of the weights (-1 when unknown)
    weights: str  # "ema", "raw", or "phema0.0800" (a post-hoc EMA file of that sigma_rel)
    model_config: dict
    diffusion_config: dict
    embedding: dict | None = None  # a --cond-embed model's record of its embeddings (encoder, shards); else None

    @property
    def image_size(self) -> int:
        return int(self.model_config["image_size"])

    @property
    def channels(self) -> int:
        return int(self.model_config.get("in_channels", 3))

    @property
    def conditional(self) -> bool:
        return int(self.model_config.get("cond_dim", 0) or 0) > 0

    @property
    def embed_dim(self) -> int:
        """Length of the reference embedding the model takes (0: none)."""
        return int(self.model_config.get("embed_dim", 0) or 0)

    @property
    def free_attributes(self) -> bool:
        """Whether an attribute can be left free (three-state models); older two-state models read it as 0."""
        return self.conditional and bool(self.model_config.get("cond_free", False))


def load_model(ckpt: str | os.PathLike, use_ema: bool = True, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the UNet and diffusion from a run folder, a checkpoint file or an exported safetensors file."""
    path = Path(ckpt)
    if path.suffix == ".safetensors":
        return _load_safetensors(path, use_ema, device)
    path = resolve_checkpoint(path)
    ckpt_dict = load_checkpoint(path)
    model_config, diffusion_config = dict(ckpt_dict["model_config"]), dict(ckpt_dict["diffusion_config"])
    model, diffusion = _build(path, model_config, diffusion_config)
    weights = "ema" if use_ema else "raw"
    if is_average(ckpt_dict):  # a post-hoc EMA average: the one set of weights it holds
        weights = f"phema{float(ckpt_dict['sigma_rel']):.4f}"
        if not use_ema:
            raise CheckpointError(f"{path}: holds post-hoc EMA weights only (sigma_rel {ckpt_dict['sigma_rel']:g}); "
                                  f"--no-ema needs one of the run's checkpoints")
    try:
        model.load_state_dict(ckpt_dict["model"])
        if use_ema and not is_average(ckpt_dict):
            ema = EMA(model)
            ema.load_state_dict(ckpt_dict["ema"])
            ema.copy_to(model)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: weights do not fit model_config ({str(e).splitlines()[0][:200]})") from None
    return LoadedModel(model.to(device).eval(), diffusion.to(device), list(ckpt_dict.get("attributes") or []), path,
                       int(ckpt_dict.get("step", -1)), weights, model_config, diffusion_config,
                       ckpt_dict.get("embedding"))


def _build(path: Path, model_config: Any, diffusion_config: Any) -> tuple[UNet, GaussianDiffusion]:
    """The UNet and the diffusion a file's configs describe; configs that do not build are one line naming the file."""
    try:
        return UNet(**model_config), GaussianDiffusion(**diffusion_config)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{path}: the stored model or diffusion config does not build a model "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None


def _load_safetensors(path: Path, use_ema: bool, device: torch.device | str) -> LoadedModel:
    """An export_safetensors file: weights plus JSON configs in the header metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as e:  # a header that does not parse or a truncated body
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:200]})") from None
    missing = [k for k in ("model_config", "diffusion_config") if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks {', '.join(missing)} (not written by sample.py --export)")
    weights = meta.get("weights", "ema")
    if not use_ema and weights != "raw":
        raise CheckpointError(f"{path}: holds EMA weights only; --no-ema needs the run's checkpoint")
    try:
        model_config, diffusion_config = json.loads(meta["model_config"]), json.loads(meta["diffusion_config"])
        attributes, step = json.loads(meta.get("attributes", "[]")), int(meta.get("step", -1))
        if not isinstance(attributes, list) or not all(isinstance(a, str) for a in attributes):
            raise ValueError("attributes is not a list of names")
        embedding = json.loads(meta.get("embedding", "null"))
    except ValueError as e:
        raise CheckpointError(f"{path}: unreadable metadata ({str(e).splitlines()[0][:200]})") from None
    model, diffusion = _build(path, model_config, diffusion_config)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit model_config ({str(e).splitlines()[0][:200]})") from None
    return LoadedModel(model.to(device).eval(), diffusion.to(device), attributes, path, step, weights, model_config,
                       diffusion_config, embedding)


def export_safetensors(loaded: LoadedModel, path: str | os.PathLike) -> Path:
    """Write the loaded weights with the UNet and diffusion configs (JSON strings) in the metadata, atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in loaded.model.state_dict().items()}
    meta = {
        "model_config": json.dumps(loaded.model_config),
        "diffusion_config": json.dumps(loaded.diffusion_config),
        "attributes": json.dumps(loaded.attributes),
        "embedding": json.dumps(loaded.embedding),
        "step": str(loaded.step),
        "weights": loaded.weights,
        "source": str(loaded.source),
        "format": "celeba-ddpm unet v1",
    }
    return atomic_write(path, save(tensors, metadata=meta))


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names and raw bytes): equal on every rank while DDP keeps them in step, and says
    whether two folders of samples come from the same weights."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------- device, precision, threads

DEVICE_WORDS = "auto, cuda, cuda:N or cpu"  # what every script's --device takes


def pick_device(name: str, local_rank: int | None = None) -> torch.device:
    """--device: auto -> the GPU (this rank's under torchrun) when CUDA is present, else the CPU; cuda -> this rank's
    GPU; cuda:N -> GPU N; cpu. A name of another form, or a GPU this machine lacks, is a ConfigError."""
    if name not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", name):
        raise ConfigError(f"--device must be {DEVICE_WORDS}, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    device = torch.device(name if name.startswith("cuda:") else f"cuda:{local_rank or 0}")
    if device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    torch.cuda.set_device(device)
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """auto -> fp16 on CUDA (with a GradScaler when training), fp32 on the CPU."""
    if name == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return name


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of `precision` (fp32: none); the diffusion maths switches it off for itself."""
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def set_threads(threads: int) -> None:
    """--threads N: PyTorch's intra-op CPU threads (0 keeps PyTorch's default, one per core)."""
    if threads > 0:
        torch.set_num_threads(threads)

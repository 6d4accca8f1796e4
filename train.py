"""Train the diffusion UNet on CelebA shards, for days, without ever losing a step.

    python train.py --data shards64 --out runs/c64 --preset celeba64 --steps 500000
    torchrun --nproc_per_node=8 train.py --data shards64 --out runs/c64 --steps 500000      # one machine, 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=JOB --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...
                                  # on each of 2 machines; OUT and the shards on a filesystem they share

Run the same command again and it continues from the newest checkpoint in OUT/checkpoints that loads and verifies
(`--resume auto`): model, EMA, optimizer, loss scale, LR schedule, step, epoch, image count, data position and every
random state come back, so on the CPU a run killed at any moment ends bit-identical to one never interrupted (with
the same thread count: float sums depend on it).
SIGTERM, SIGINT or SIGUSR1 (preemption, notebook limits, Slurm's warning before the time limit) finishes the step,
writes a checkpoint and exits 0; a second SIGINT exits at once. During the start-up, before the first step, any of them
stops at once, also with exit 0. With TRAIN_STATUS_FILE set (slurm/train.sbatch sets it), rank 0 leaves there how the
start ended: {"status": "done" | "stopped" | "failed", "step", "steps", ...}, so a job script can tell a finished run
from one to requeue.
`--batch-size` counts images per step over all ranks. One global sample order (data.py) and step noise drawn from
(seed, step) for the whole global batch make a step the same on any number of ranks: a run stopped on 8 GPUs continues
on 4 (or 1, or 3) exactly, up to the order of floating-point sums; only dropout masks differ per rank.
`--accum K` splits each rank's part of the batch into K micro-batches, so a run keeps its batch on fewer GPUs.
"""
from __future__ import annotations

import os
import signal


def stop_before_first_step(signum: int, frame: object) -> None:
    """SIGTERM/SIGINT until the training loop takes them over (catch_stop_signals): the start-up (imports, shard
    verification, reference statistics) ends at once and cleanly, exit 0 with one line, nothing trained. Files are
    written atomically, so what was being written (a reference cache, config.json) is complete or absent."""
    os.write(1, f"stopped by {signal.Signals(signum).name} before the first step (during start-up): nothing was "
                f"trained; run the same command again\n".encode())
    stopped_early.append(signum)
    raise SystemExit(0)


stopped_early: list[int] = []  # the signal that ended the start-up, for report_status


# SIGUSR1: Slurm's warning before the time limit (`--signal=USR1@...`, slurm/train.sbatch), which torchrun ignores
# (SIGTERM to torchrun makes it kill its workers 30 s later, checkpoint written or not).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # data.STOP_SIGNALS: the workers ignore them
STATUS_ENV = "TRAIN_STATUS_FILE"

if __name__ == "__main__":  # from the first line: a preemption during the imports below is a clean stop too
    for _signal in STOP_SIGNALS:
        signal.signal(_signal, stop_before_first_step)

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from rich.table import Table
from torch.nn.parallel import DistributedDataParallel

import config
import data_v1
from atomic import atomic_write
from config import ConfigError
from data import DataError, ShardReadError, make_loader, parse_where
from diffusion import DEFAULT_SPACING, OBJECTIVES, SAMPLERS, SCHEDULES, GaussianDiffusion, make_timesteps
from ema import DTYPES, EMA, PowerEMA, parse_sigma_rels, snapshot_bytes
from fid import TrainingFID
from grids import save_grid
from manifest import attribute_names, read_manifest
from runlog import RunLog
from step import make_optimizer, train_step
from unet import PRESETS, UNet, build_unet
from utills import (
    CheckpointError,
    RunLocked,
    RunPaths,
    TrainState,
    autocast,
    capture_rng,
    find_latest,
    is_average,
    list_checkpoints,
    load_checkpoint,
    lock_run,
    make_checkpoint,
    nan_test_steps,
    os_errors_as_write_error,
    pack_ranks,
    pick_device,
    resolve_checkpoint,
    resolve_precision,
    restore_checkpoint,
    restore_rng,
    roll_back,
    run_paths,
    save_checkpoint,
    set_threads,
    step_in_name,
    this_rank,
    trim_metrics,
    versions,
    weights_digest,
)


@dataclass
class TrainConfig:
    # Data and run folder.
    data: str = ""  # a shards folder written by prepare_shards.py
    out: str = "runs/celeba"  # run folder: config.json, checkpoints/, samples/, metrics.jsonl
    loader: str = "dali"  # data pipeline: dali | torch
    num_workers: int = -1  # DALI CPU threads or torch DataLoader workers (-1 = the loader's default)
    verify_data: bool = True  # check every shard's sha256 against the manifest before the first step
    where: str = ""  # train on the samples whose attributes match, e.g. "Male=0,Eyeglasses=1" ("" = all)
    # Model and diffusion: the architecture, fixed by the checkpoint when resuming.
    preset: str = "celeba64"  # UNet preset: tiny | small64 | celeba64 | celeba128
    base_channels: int = 0  # override the preset's base width (0 = the preset's)
    dropout: float = -1.0  # override the preset's dropout (negative = the preset's)
    cond: bool = False  # condition on the manifest's attributes (classifier-free guidance)
    cond_embed: bool = False  # condition on each face's reference embedding (embed.py; sample.py --like)
    embeddings: str = ""  # with --cond-embed: the manifest's embedding set ("" = the only one)
    scale_shift_norm: bool = False  # the embedding scales and shifts each block's second norm (AdaGN) instead of adding
    timesteps: int = 1000  # diffusion steps T
    schedule: str = "linear"  # noise schedule: linear | cosine
    objective: str = "eps"  # what the UNet predicts: eps | v | x0
    # Optimisation.
    min_snr_gamma: float = 0.0  # min-SNR-gamma loss weighting (0 = off, 5 is usual)
    p_uncond: float = 0.1  # with --cond/--cond-embed: probability of a row trained unconditionally (all dropped)
    p_free: float = 0.8  # with --cond: probability that a row leaves a random subset of its attributes free
    batch_size: int = 128  # images per step, summed over all ranks
    accum: int = 1  # micro-batches per rank and step (gradients accumulated): the same step in less memory
    lr: float = 2e-4  # AdamW learning rate after warm-up
    weight_decay: float = 0.0  # AdamW weight decay
    warmup: int = 5000  # linear learning-rate warm-up, in steps
    lr_schedule: str = "constant"  # after warm-up: constant | cosine (to 0 at the last step)
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = no clipping; the norm is logged anyway)
    steps: int = 0  # train until this step (or give --epochs)
    epochs: int = 0  # train this many epochs when --steps is 0
    precision: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU) | fp16 | bf16 | fp32
    ema_decay: float = 0.9999  # EMA decay once warmed up
    ema_warmup: bool = True  # EMA decay min(decay, (1 + n) / (10 + n)) over the first updates
    phema: str = ""  # post-hoc EMA (EDM2): sigma_rel profiles to track, e.g. 0.05,0.10 ("" = off); fixed for the run
    phema_every: int = 10000  # with --phema: snapshot every profile every N steps and at the end (never pruned)
    phema_dtype: str = "fp16"  # with --phema: snapshot weights in fp16 (half the disk) or fp32
    # Checkpoints, samples and logs.
    ckpt_every: int = 5000  # write a checkpoint every N steps (0 = only at the end and on SIGTERM/SIGINT)
    keep: int = 3  # checkpoints kept in OUT/checkpoints (0 = all)
    sample_every: int = 5000  # 8x8 EMA sample grid to OUT/samples every N steps and at the end (0 = never)
    sample_sampler: str = "ddim"  # sampler of those grids: ddim | ddpm | dpm++2m (its default spacing, no eta)
    sample_steps: int = 50  # sampling steps for those grids
    log_every: int = 100  # steps per log line and metrics.jsonl record
    resume: str = "auto"  # auto (newest valid checkpoint in OUT, if any) | never | PATH (checkpoint or run folder)
    rollback: bool = False  # --resume PATH to an older checkpoint of OUT: move the later ones aside and go on from it
    tensorboard: bool = False  # also write TensorBoard scalars, grids, FID and the config to OUT/tensorboard
    eval_every: int = 0  # every N steps and at the end: FID/KID of --eval-n EMA samples vs the shards (0 = never)
    eval_n: int = 1000  # samples per training-time evaluation (the same noise every time; 50,000 for paper numbers)
    eval_sampler: str = "ddim"  # sampler of those samples: ddim | ddpm | dpm++2m
    eval_steps: int = 50  # sampling steps of those samples
    eval_ref_max: int = 0  # reference images from the training split for those FIDs (0 = all; cached once)
    patience: int = 0  # with --eval-every: stop after N evaluations without a better FID (0 = never stop early)
    # Hardware.
    device: str = "auto"  # auto | cuda | cuda:N | cpu (under torchrun, cuda is each process's own GPU)
    threads: int = 0  # intra-op CPU threads (0 = PyTorch's default, one per core)
    seed: int = 0  # seeds the weights, the noise, the data order and the grids' fixed noise
    compile: bool = False  # torch.compile the model for training (checkpoints hold the plain module)
    channels_last: bool = False  # channels_last memory format (faster convolutions on tensor cores)
    max_nonfinite: int = 100  # stop when the loss has been NaN/inf for this many consecutive steps

    CHOICES: ClassVar[dict] = {"loader": ("dali", "torch"), "preset": tuple(PRESETS), "schedule": SCHEDULES,
                               "objective": OBJECTIVES, "lr_schedule": ("constant", "cosine"),
                               "precision": ("auto", "fp16", "bf16", "fp32"),  # --device: utills.pick_device
                               "sample_sampler": SAMPLERS, "eval_sampler": SAMPLERS, "phema_dtype": tuple(DTYPES)}
    BOUNDS: ClassVar[dict] = {
        "num_workers": ">= -1", "timesteps": "2..100000", "batch_size": ">= 1", "accum": ">= 1", "log_every": ">= 1",
        "sample_steps": ">= 1",
        "max_nonfinite": ">= 1", "warmup": ">= 0", "ckpt_every": ">= 0", "keep": ">= 0", "sample_every": ">= 0",
        "grad_clip": ">= 0", "min_snr_gamma": ">= 0", "weight_decay": ">= 0", "lr": "> 0", "p_uncond": "0..1",
        "p_free": "0..1",
        "ema_decay": "0..1", "steps": ">= 0", "epochs": ">= 0", "base_channels": ">= 0", "dropout": "..1",
        "threads": ">= 0", "seed": ">= 0", "eval_every": ">= 0", "eval_n": ">= 2", "eval_steps": ">= 1",
        "eval_ref_max": ">= 0", "phema_every": ">= 1", "patience": ">= 0"}
    REQUIRED: ClassVar[tuple] = ("data",)
    RETIRED: ClassVar[tuple] = ("fault_nan_at_step", "fault_nan_steps")  # test hooks once in config.json


class Diverged(config.UserError, FloatingPointError):
    """The loss stayed NaN/inf, or the weights stopped being finite: the run stops without writing over its last
    checkpoint (lower --lr, raise --warmup or clip harder, then resume)."""


# Fields that define the model and the diffusion: taken from the checkpoint on resume, and a clash is an error.
ARCH_FIELDS = ("preset", "base_channels", "dropout", "cond", "cond_embed", "embeddings", "scale_shift_norm",
               "timesteps", "schedule", "objective")
# Fields fixed for a run's life in the same way: the post-hoc EMA profiles average every step from the first.
RUN_FIXED_FIELDS = ("phema",)


# ----------------------------------------------------------------------------------------------------------- helpers

def check_config(cfg: TrainConfig, given: Collection[str] = ()) -> None:
    """Reject values that cannot work, with one line naming the flag, before anything is written."""
    config.check(cfg)
    if cfg.steps <= 0 and cfg.epochs <= 0:
        raise ConfigError("give --steps N or --epochs E")
    if cfg.rollback and cfg.resume in ("auto", "never"):
        raise ConfigError("--rollback goes with --resume PATH (the checkpoint to go back to)")
    if cfg.phema:  # written the one way, so that "0.05,0.1" and "0.05,0.10" are the same run
        cfg.phema = ",".join(f"{s:g}" for s in parse_sigma_rels(cfg.phema, "--phema"))
    if cfg.patience and not cfg.eval_every:
        raise ConfigError(f"--patience {cfg.patience} counts training-time evaluations: give --eval-every N too")
    for flag, sampler, steps, used in (("sample", cfg.sample_sampler, cfg.sample_steps, cfg.sample_every),
                                       ("eval", cfg.eval_sampler, cfg.eval_steps, cfg.eval_every)):
        try:  # the grids and evaluations take min(steps, timesteps) steps in the sampler's default spacing
            if used:
                make_timesteps(cfg.timesteps, min(steps, cfg.timesteps), DEFAULT_SPACING[sampler])
        except ConfigError as e:
            raise ConfigError(f"--{flag}-sampler {sampler} --{flag}-steps {steps}: "
                              f"{str(e).removeprefix('diffusion: ')}") from None
    manifest = read_manifest(cfg.data)  # the shards are there (the full checks come with the loader)
    if cfg.where:
        parse_where(cfg.where, attribute_names(manifest))  # its names and values (an empty subset: the loader)
    check_out(cfg, given)


def is_train_config(path: Path) -> bool:
    """Whether `path` is a config.json written by train.py."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(saved, dict) and {"data", "out", "preset", "steps"} <= set(saved)


def check_out(cfg: TrainConfig, given: Collection[str]) -> None:
    """--out is a new or empty folder or a run folder of train.py's, and a run's config.json given as --config
    continues that run, from any directory."""
    out, run = Path(cfg.out), run_paths(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {cfg.out}: is a file, not a run folder")
    if file_above := next((p for p in out.parents if p.exists() and not p.is_dir()), None):
        raise ConfigError(f"--out {cfg.out}: {file_above} is a file, not a folder")
    if run.config.exists() and not is_train_config(run.config):
        raise ConfigError(f"--out {cfg.out}: its config.json is not one of train.py's; give a new or empty folder")
    # (RUN/.lock alone is what a start refused after taking the lock leaves: the folder is still new)
    if out.is_dir() and not run.config.exists() and not run.checkpoints.is_dir() and \
            any(p != run.lock for p in out.iterdir()):
        raise ConfigError(f"--out {cfg.out}: not a run folder (no config.json or checkpoints/ of train.py) and not "
                          f"empty; give a new or empty folder")
    file = getattr(given, "file", None)
    if file and "out" in given.from_file and Path(file).name == "config.json":
        home = Path(file).resolve().parent
        if run_paths(home).checkpoints.is_dir() and out.resolve() != home:
            raise ConfigError(f"--config {file}: the config of the run in {home}, but its out {cfg.out!r} names "
                              f"{out.resolve()} from here; give --out {home} to continue that run, or --out NEW "
                              f"to start another from its settings")


def stored_config(cfg: TrainConfig) -> dict:
    """The config as config.json and the checkpoints keep it: paths absolute, so that `--config RUN/config.json` is
    the same run from any directory, and resume "auto" (without --rollback), so that it continues the run from its
    newest checkpoint."""
    return {**asdict(cfg), "data": os.path.abspath(cfg.data), "out": os.path.abspath(cfg.out), "resume": "auto",
            "rollback": False}


def check_same_run(cfg: TrainConfig, given: Collection[str], saved: dict) -> None:
    """A --config file whose out holds a run must describe that run (the same data and seed)."""
    for name in ("data", "seed"):
        if name not in getattr(given, "from_file", ()) or name not in saved:
            continue
        mine, theirs = getattr(cfg, name), saved[name]
        if name == "data" and os.path.isabs(theirs):  # older config.json files hold the path as given
            mine = os.path.abspath(mine)
        if mine != theirs:
            raise ConfigError(f"--config {given.file}: --out {cfg.out} holds another run (its {name} is {theirs!r}, "
                              f"the file's {getattr(cfg, name)!r}); give a new --out, or that run's own config.json")


def merge_resumed_config(cfg: TrainConfig, saved: dict, given: Collection[str]) -> tuple[TrainConfig, list[str]]:
    """Architecture fields from the checkpoint's config, run fields from `cfg`; returns the config and what changed.

    An architecture flag that was given (or differs from its default) and differs from the checkpoint is an error.
    """
    updates, changes, stored = {}, [], stored_config(cfg)
    for f in dataclasses.fields(cfg):
        if f.name not in saved or stored[f.name] == saved[f.name]:  # the same, as stored (paths absolute)
            continue
        new, old = getattr(cfg, f.name), saved[f.name]
        if f.name in ARCH_FIELDS or f.name in RUN_FIXED_FIELDS:
            if (f.name in given or new != f.default) and new != old:
                what = "changes the architecture" if f.name in ARCH_FIELDS else \
                    "cannot change during a run (its profiles average every step from the first)"
                raise ConfigError(f"{config.flag(f.name)} {new!r} {what}: the checkpoint "
                                  f"has {f.name}={old!r} (drop the flag to resume, or start a new --out)")
            updates[f.name] = old
        elif new != old:
            changes.append(f"{f.name}: {old!r} -> {new!r}")
    return dataclasses.replace(cfg, **updates), changes


def lr_factor(i: int, warmup: int, total: int, schedule: str) -> float:
    """Learning-rate multiplier for the update with index i (0-based): linear warm-up, then constant or cosine."""
    if i < warmup:
        return (i + 1) / warmup
    if schedule == "cosine":
        progress = min(1.0, (i - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


@dataclass
class Ranks:
    """Where this process stands among torchrun's processes (one process without torchrun)."""
    world_size: int
    rank: int
    local_rank: int
    device: torch.device
    control: object  # a gloo group for CPU-side flags and gathers (None with one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: object) -> list:
        """Every rank's `obj`, in rank order."""
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on some rank (a CPU all-reduce on the gloo group)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return bool(t.item())


def join_ranks(cfg: TrainConfig) -> Ranks:
    """Join the process group when torchrun started several processes; pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and cfg.device.startswith("cuda:"):
        raise ConfigError(f"--device {cfg.device}: with {world_size} processes each takes its own GPU; "
                          f"use --device cuda")
    if cfg.batch_size % world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} does not split over {world_size} ranks (give a batch size "
                          f"that {world_size} divides, or run on a number of ranks that divides {cfg.batch_size})")
    if cfg.batch_size // world_size < cfg.accum:
        raise ConfigError(f"--accum {cfg.accum}: each of {world_size} rank(s) has {cfg.batch_size // world_size} "
                          f"images of --batch-size {cfg.batch_size}, fewer than {cfg.accum} micro-batches")
    device = pick_device(cfg.device, local_rank)
    control = None
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        control = dist.new_group(backend="gloo")  # CPU-side flags and gathers, without touching the GPU stream
    return Ranks(world_size, rank, local_rank, device, control)


def find_resume(cfg: TrainConfig, run: RunPaths, log: RunLog, is_main: bool) -> tuple[Path | None, dict | None]:
    """The checkpoint to continue from (--resume auto|never|PATH) and its contents, or (None, None).

    A run folder holds one history: going back to an older checkpoint of OUT needs --rollback, which moves the later
    checkpoints, grids and metrics aside (rank 0); a checkpoint of another folder starts a branch in a new OUT."""
    if cfg.resume == "auto":
        found = find_latest(run.root)
        if found is None and list_checkpoints(run.root):
            raise CheckpointError(f"{run.checkpoints}: no checkpoint there loads and verifies")
        return found if found else (None, None)
    if cfg.resume != "never":
        path = resolve_checkpoint(cfg.resume)
        ckpt = load_checkpoint(path)
        if is_average(ckpt):
            raise ConfigError(f"--resume {path}: a post-hoc EMA file (averaged weights only), not a training "
                              f"checkpoint; resume from RUN or RUN/checkpoints/step-*.pt")
        own = list_checkpoints(run.root)
        if path.resolve().parent != run.checkpoints.resolve():
            if own:
                raise ConfigError(f"--resume {path}: --out {run.root} already holds checkpoints of its own run (up "
                                  f"to {own[-1].name}); to branch from {path}, give a new or empty --out")
            return path, ckpt
        later = [p for p in own if step_in_name(p) > ckpt["step"]]
        if later and not cfg.rollback:
            raise ConfigError(f"--resume {path}: {run.checkpoints} holds {len(later)} later checkpoint(s) of this "
                              f"run (up to {later[-1].name}) that going back to step {ckpt['step']} would abandon; "
                              f"branch with --out NEW --resume {path}, or add --rollback to move them aside")
        if cfg.rollback and is_main and (aside := roll_back(run, ckpt["step"])) is not None:
            log.say(f"[yellow]rolled back to step {ckpt['step']}[/]: what came after it moved to {aside}")
        return path, ckpt
    if list_checkpoints(run.root):
        raise ConfigError(f"--resume never: {run.checkpoints} already holds checkpoints; use a new --out")
    return None, None


def open_loader(cfg: TrainConfig, ranks: Ranks, data_state: dict | None, log: RunLog):
    """This rank's part of the training data, continuing at `data_state` (any number of ranks, either loader, any
    batch size) when it is of the same samples and seed.

    A checkpoint of format 0 or 1 holds one position per rank: on the same number of ranks (without --where or
    --accum) its run goes on in that old per-rank order, exactly as before (data_v1.py); else the order restarts."""
    args = dict(split="train", backend=cfg.loader, device=ranks.device, shuffle=True, flip=True, seed=cfg.seed,
                rank=ranks.rank, world_size=ranks.world_size, drop_last=True, verify=cfg.verify_data,
                num_threads=None if cfg.num_workers < 0 else cfg.num_workers)
    old = this_rank(data_state, ranks.rank, ranks.world_size) if data_state and "ranks" in data_state else None
    if data_v1.is_v1_state(old) and not cfg.where and cfg.accum == 1:
        try:
            loader = data_v1.make_loader(cfg.data, cfg.batch_size // ranks.world_size, **args, state=old)
        except DataError as e:  # a changed --batch-size, --seed or --loader cannot continue the old order
            log.say(f"[yellow]warning:[/] {e}; the data order restarts, in the global order of format 2")
        else:
            log.say("this run continues in its per-rank data order of checkpoint format 1 (data_v1.py): on another "
                    "number of ranks it would move to the global order")
            return loader
    args["where"] = cfg.where
    args["embeddings"] = cfg.embeddings if cfg.cond_embed else None
    try:
        loader = make_loader(cfg.data, cfg.batch_size // ranks.world_size, **args, state=data_state)
    except DataError as e:
        if data_state is None or "cannot resume the data position" not in str(e):
            raise
        # A changed --seed or --where, or a checkpoint from before the global order: say so and start a new order.
        log.say(f"[yellow]warning:[/] {e}; the data order restarts")
        loader = make_loader(cfg.data, cfg.batch_size // ranks.world_size, **args)
    if cfg.cond and not loader.attributes:
        raise ConfigError(f"--cond: {cfg.data}/manifest.json lists no attributes")
    if cfg.embeddings and not cfg.cond_embed:
        raise ConfigError(f"--embeddings {cfg.embeddings}: it names the embeddings of --cond-embed; add --cond-embed")
    return loader


def embedding_record(cfg: TrainConfig, loader: Any) -> dict | None:
    """What a checkpoint keeps of the reference embeddings, so that sample.py --like embeds a new face as the
    training faces were: the set's name, its encoder's identity, and how the shards cropped and sized the faces."""
    if not cfg.cond_embed:
        return None
    manifest = read_manifest(cfg.data)
    return {"name": loader.embeddings, "encoder": dict(loader.embedding["encoder"]),
            "shards": {k: manifest.get(k) for k in ("size", "crop", "format", "quality")},
            "data": os.path.abspath(cfg.data)}


def step_seed(seed: int, step: int) -> int:
    """The 64-bit seed of a step's random inputs, from (seed, step) alone (numpy's SeedSequence: stable across
    versions and platforms, unlike Python's hash)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0])


def step_draws(diffusion: GaussianDiffusion, generator: torch.Generator, seed: int, step: int, ranks: Ranks,
               x0: torch.Tensor, cond: torch.Tensor | None, p_uncond: float, p_free: float,
               free_dim: int | None = None):
    """This rank's rows of the step's random inputs (t, noise, unconditional rows, free attributes), drawn for the
    whole global batch from (seed, step), so that every sample gets the same ones on any number of ranks.

    Each rank draws the global batch (world_size x its own noise; bench/train_step.py measures the cost) and keeps
    its contiguous slice, the slice of the global batch that its images are."""
    b = x0.shape[0]
    generator.manual_seed(step_seed(seed, step))
    draws = diffusion.draws((b * ranks.world_size, *x0.shape[1:]), generator, x0.device,
                            cond.shape[1] if cond is not None else 0, p_uncond, p_free, free_dim)
    return draws.rows(slice(ranks.rank * b, (ranks.rank + 1) * b))


def saved_world_size(ckpt: dict) -> int | None:
    """The number of ranks that wrote a checkpoint (None when it does not say)."""
    for key in ("data_state", "rng"):
        value = ckpt.get(key)
        if isinstance(value, dict) and "world_size" in value:
            return int(value["world_size"])
    return None


def build_model(cfg: TrainConfig, ckpt: dict | None, image_size: int, attributes: list[str],
                embedding: dict | None = None) -> UNet:
    """The UNet: the checkpoint's architecture when resuming (checked against the data), else the preset's."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP checks that)
    if ckpt is None:
        overrides = {"image_size": image_size, "cond_dim": len(attributes) if cfg.cond else 0, "cond_free": cfg.cond}
        if embedding is not None:
            overrides["embed_dim"] = int(embedding["encoder"]["dim"])
        if cfg.base_channels > 0:
            overrides["base_channels"] = cfg.base_channels
        if cfg.dropout >= 0:
            overrides["dropout"] = cfg.dropout
        if cfg.scale_shift_norm:
            overrides["use_scale_shift_norm"] = True
        return build_unet(cfg.preset, **overrides)
    if ckpt["image_size"] != image_size:
        raise ConfigError(f"{cfg.data}: images are {image_size} px, the checkpoint's model {ckpt['image_size']} px")
    if cfg.cond and list(ckpt["attributes"]) != list(attributes):
        raise ConfigError(f"{cfg.data}: the attributes differ from the checkpoint's")
    if embedding is not None:
        theirs = (ckpt.get("embedding") or {}).get("encoder", {})
        if theirs.get("sha256") != embedding["encoder"]["sha256"] or theirs.get("dim") != embedding["encoder"]["dim"]:
            raise ConfigError(f"{cfg.data}: embedding set {embedding['name']!r} was made with "
                              f"{embedding['encoder']['name']} (sha256 {embedding['encoder']['sha256'][:12]}...), the "
                              f"checkpoint's model with {theirs.get('name')} (sha256 {str(theirs.get('sha256'))[:12]}"
                              f"...); embed the shards with the run's encoder")
    return UNet(**ckpt["model_config"])


def phema_plan(phema: PowerEMA, model: UNet, cfg: TrainConfig, total_steps: int, run: RunPaths) -> str:
    """One line: the profiles, where their snapshots go, and how much disk they take (per snapshot and for the run)."""
    per_file = snapshot_bytes(model, cfg.phema_dtype)
    per_snapshot = per_file * len(phema.sigma_rels)
    count = total_steps // cfg.phema_every + (total_steps % cfg.phema_every != 0)  # and one at the last step
    profiles = ", ".join(f"{s:g} (gamma {g:.2f})" for s, g in zip(phema.sigma_rels, phema.gammas))
    return (f"post-hoc EMA: sigma_rel {profiles}; a snapshot every {cfg.phema_every} steps to {run.phema_snapshots}: "
            f"{len(phema.sigma_rels)} x {per_file / 1e6:.1f} MB ({cfg.phema_dtype}) = {per_snapshot / 1e6:.1f} MB "
            f"each, {count} snapshots = {count * per_snapshot / 1e9:.2f} GB over {total_steps} steps (never pruned)")


def drop_later_snapshots(run: RunPaths, step: int, log: RunLog) -> None:
    """Post-hoc EMA snapshots of steps after the checkpoint being resumed were written after it by a start that was
    killed; the resumed run writes them again (the same weights, on the same setup), so they go."""
    later = [p for p in sorted(run.phema_snapshots.glob("snapshot-*.pt"))
             if int(p.name.split("-")[1]) > step] if run.phema_snapshots.is_dir() else []
    for p in later:
        p.unlink()
    if later:
        log.say(f"removed {len(later)} post-hoc EMA snapshot file(s) after step {step} (written after the last "
                f"checkpoint; this start writes them again)")


def out_of_patience(cfg: TrainConfig, state: TrainState) -> str:
    """Why the run stops early (--patience): "" while it trains on."""
    if cfg.patience <= 0 or state.evals_since_best < cfg.patience:
        return ""
    best = f"{state.best_fid:.2f} (step {state.best_fid_step})" if state.best_fid is not None else "none yet"
    return f"no better FID in {state.evals_since_best} evaluations; the best is {best}"


def config_table(cfg: TrainConfig, title: str, extra: str) -> Table:
    """The configuration as a table, every field, so that a log shows what ran."""
    table = Table(title=title, show_header=False, box=None)
    for key, value in asdict(cfg).items():
        table.add_row(key, repr(value))
    table.add_row("[dim]device / precision / world", f"[dim]{extra}")
    return table


def set_run_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: TrainConfig,
               total_steps: int) -> None:
    """--lr and --weight-decay may change on resume; unchanged they reproduce the saved values exactly."""
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["initial_lr"], group["weight_decay"] = cfg.lr, cfg.weight_decay
        group["lr"] = cfg.lr * lr_factor(scheduler.last_epoch, cfg.warmup, total_steps, cfg.lr_schedule)


class ShardWatch:
    """The training shards' sizes and modification times at start-up (after their checksums were verified): a shard
    changed while training (rewritten, damaged, replaced) stops the run at the next epoch or checkpoint with one line
    naming it, rather than training on whatever it now holds."""

    def __init__(self, loader):
        self.files = [loader.data_dir / s[key] for s in loader.shards for key in ("tar", "idx")]
        self.stamps = [self._stamp(f) for f in self.files]

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def check(self) -> None:
        for path, stamp in zip(self.files, self.stamps):
            if self._stamp(path) != stamp:
                raise ShardReadError(f"{path}: changed while training (size or modification time differs from "
                                     f"start-up); stopping (the checkpoints so far are kept); re-run prepare_shards.py")


class RunningStats:
    """The loss averaged since the last log line and the streak of non-finite losses, kept on the device so that
    nothing is read back from the GPU between log lines."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.loss_count = torch.zeros((), device=device, dtype=torch.float64)
        self.streak = torch.zeros((), device=device, dtype=torch.int64)  # consecutive non-finite losses
        self.worst_streak = torch.zeros((), device=device, dtype=torch.int64)

    def add(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss.double(), 0.0)
        self.loss_count += finite.double()
        self.streak = torch.where(finite, 0, self.streak + 1)
        self.worst_streak = torch.maximum(self.worst_streak, self.streak)

    def read(self, ranks: Ranks, max_nonfinite: int, step: int, last_ckpt: Path | None) -> float | None:
        """The mean loss over ranks since the last read (None if none was finite); raises when the NaN streak is too
        long."""
        sums = torch.stack([self.loss_sum, self.loss_count])
        if ranks.world_size > 1:
            dist.all_reduce(sums)
            dist.all_reduce(self.worst_streak, op=dist.ReduceOp.MAX)  # every rank stops together
        if int(self.worst_streak) >= max_nonfinite:
            raise Diverged(
                f"the loss was NaN/inf for {int(self.worst_streak)} consecutive steps (now at step {step}, "
                f"non-finite since step {step - int(self.streak) + 1}); stopping without a checkpoint "
                f"(last good one: {last_ckpt or 'none in this process'})")
        self.loss_sum.zero_()
        self.loss_count.zero_()
        self.worst_streak.copy_(self.streak)
        return float(sums[0] / sums[1]) if float(sums[1]) > 0 else None


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor is free of NaN and inf (one read-back)."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def catch_stop_signals(cleanup: contextlib.ExitStack) -> list[int]:
    """SIGTERM/SIGINT ask for a checkpoint after the current step (the list they append to); a second SIGINT stops
    at once. The previous handlers come back with `cleanup`."""
    stop_signal: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        if stop_signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop_signal.append(signum)  # acted on after the step (printing from a handler is not safe)
    for s in STOP_SIGNALS:
        cleanup.callback(signal.signal, s, signal.signal(s, on_signal))
    return stop_signal


def report_status(status: str, **fields: Any) -> None:
    """How this start ended, for a job script (TRAIN_STATUS_FILE; rank 0 only): "done" (the run reached its last step),
    "stopped" (by a signal, after a checkpoint) or "failed" (a one-line error)."""
    path = os.environ.get(STATUS_ENV)
    if path and os.environ.get("RANK", "0") == "0":
        record = {"status": status, **fields, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            atomic_write(Path(path), (json.dumps(record) + "\n").encode())
        except OSError as e:  # the job script then goes by the exit status alone
            print(f"warning: {STATUS_ENV}={path}: could not write the run's status ({e.strerror})", flush=True)


@dataclass
class Checkpointer:
    """Writes the run's checkpoints: every rank's random and data states, gathered; rank 0 checks the weights and
    writes; all wait for it. `last` is the newest checkpoint this process wrote."""
    run: RunPaths
    cfg: TrainConfig
    ranks: Ranks
    loader: Any
    diffusion: GaussianDiffusion
    log: RunLog
    last: Path | None = None
    noise_gen: torch.Generator | None = None  # a format 1 run's per-rank noise stream, when it goes on in its order

    def meta(self, model: UNet) -> dict:
        """What a post-hoc EMA snapshot carries besides its weights, so that it rebuilds and samples like a
        checkpoint."""
        return {"config": stored_config(self.cfg), "model_config": dict(model.config),
                "diffusion_config": dict(self.diffusion.config),
                "image_size": self.loader.image_size, "versions": versions(),
                "attributes": list(self.loader.attributes) if self.cfg.cond else [],
                "embedding": embedding_record(self.cfg, self.loader)}

    def legacy_rng(self) -> dict:
        return {"noise": self.noise_gen.get_state()} if self.noise_gen is not None else {}

    def write(self, state: TrainState, best: bool = False) -> Path | None:
        """Call when no batch has been fetched since this step's, so the loader's state is the position right after
        it; `best` also keeps the checkpoint as best-fid.pt."""
        ranks, run = self.ranks, self.run
        rngs = ranks.gather({**capture_rng(), **self.legacy_rng()})  # per rank: the dropout masks
        data_state = self.loader.state_dict()
        if getattr(self.loader, "per_rank", False):  # a format 1 run's own order (data_v1.py)
            data_state = pack_ranks(ranks.gather(data_state))
        elif ranks.world_size > 1:
            if any(s != data_state for s in ranks.gather(data_state)):
                raise RuntimeError(f"step {state.step}: the ranks' data positions differ (internal error)")
            if len(set(ranks.gather(weights_digest(state.model)))) > 1:
                raise RuntimeError(f"step {state.step}: the ranks hold different weights (DDP out of step)")
            self.log.say(f"weights identical on {ranks.world_size} ranks at step {state.step}")
        if ranks.is_main:
            ckpt = make_checkpoint(state, config=stored_config(self.cfg), diffusion_config=self.diffusion.config,
                                   image_size=self.loader.image_size, data_state=data_state, rngs=rngs,
                                   attributes=list(self.loader.attributes) if self.cfg.cond else [],
                                   embedding=embedding_record(self.cfg, self.loader))
            if not all_finite([*ckpt["model"].values(), *ckpt["ema"]["shadow_params"]]):
                raise Diverged(f"step {state.step}: the weights are not finite; not writing a checkpoint "
                               f"over {self.last or 'the previous ones'}")
            with os_errors_as_write_error(run.checkpoint(state.step), run.root):
                self.last = save_checkpoint(run.root, ckpt, state.step, self.cfg.keep, best=best)
            self.log.say(f"checkpoint: {self.last}"
                         + (f" (best FID {state.best_fid:.2f}: {run.best_fid})" if best else ""))
        if ranks.world_size > 1:
            dist.barrier(group=ranks.control)
        return self.last


# -------------------------------------------------------------------------------------------------------------- main

def main(cfg: TrainConfig, given: Collection[str] = ()) -> Path | None:
    """Train (or continue training) the run in `cfg.out`; returns the last checkpoint written, if any."""
    check_config(cfg, given)
    set_threads(cfg.threads)
    ranks = join_ranks(cfg)
    device, world_size = ranks.device, ranks.world_size
    log = RunLog(quiet=not ranks.is_main)
    run = run_paths(cfg.out)

    # One trainer per run folder: rank 0 holds the folder's lock until the process ends, before anything is written.
    refused, cleanup = None, contextlib.ExitStack()
    if ranks.is_main:
        try:
            cleanup.callback(lock_run(run).close)
        except RunLocked as e:
            refused = e
    if ranks.any(refused is not None):
        raise refused or RunLocked(f"{run.root}: rank 0 could not lock the run folder")
    with cleanup:
        # Pick the checkpoint to continue from; architecture comes from it, run control from the command line.
        ckpt_path, ckpt = find_resume(cfg, run, log, ranks.is_main)
        if ckpt is not None:
            check_same_run(cfg, given, ckpt["config"])
            cfg, changes = merge_resumed_config(cfg, ckpt["config"], given)
            if cfg.phema and ckpt.get("phema") is None:  # before config.json is written: the run's stays as it was
                raise ConfigError(f"--phema {cfg.phema}: the run in {run.root} was started without it, and the "
                                  f"profiles must average every step from the first; start a new --out to track them")
            log.say(f"[bold green]resuming[/] from {ckpt_path} (step {ckpt['step']})")
            for change in changes:
                log.say(f"  changed since the checkpoint: {change}")
        precision = resolve_precision(cfg.precision, device)
        log.say(config_table(cfg, f"train.py -> {run.root}", f"{device} / {precision} / {world_size}"))

        # Open this rank's part of the training data (continuing at the checkpoint's position), then build the model.
        data_state = ckpt.get("data_state") if ckpt is not None else None
        if ckpt is not None and (before := saved_world_size(ckpt)) not in (None, world_size):
            log.say(f"the number of ranks changed: {before} -> {world_size} (--batch-size {cfg.batch_size}: "
                    f"{cfg.batch_size // world_size} images per rank); the step, learning-rate schedule, EMA, data "
                    f"order and step noise carry on, only the dropout masks are drawn afresh")
        loader = open_loader(cfg, ranks, data_state, log)
        watch = ShardWatch(loader)
        total_steps = cfg.steps if cfg.steps > 0 else cfg.epochs * len(loader)
        embedding = embedding_record(cfg, loader)
        model = build_model(cfg, ckpt, loader.image_size, loader.attributes, embedding).to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        diffusion = GaussianDiffusion(timesteps=cfg.timesteps, schedule=cfg.schedule, objective=cfg.objective,
                                      min_snr_gamma=cfg.min_snr_gamma or None).to(device)
        # Three-state models learn free attributes; a two-state checkpoint (older versions) trains on as it was.
        p_free = cfg.p_free if model.cond_free else 0.0
        if cfg.cond and not model.cond_free:
            log.say("[yellow]this checkpoint's model has two-state attributes (trained before attributes could "
                          "be left free): --p-free is ignored, unnamed attributes stay 0 when sampling")
        log.say(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                f"{loader.image_size} px, {loader.num_samples} images per epoch"
                + (f" (the {loader.num_samples} of split 'train' matching --where {cfg.where!r})" if cfg.where else "")
                + f", {len(loader)} steps of {cfg.batch_size} over {world_size} rank(s)"
                + (f" in {cfg.accum} micro-batches each" if cfg.accum > 1 else ""))
        if ranks.is_main:  # only now that the data and the checkpoint have been accepted
            with os_errors_as_write_error(run.config, run.root):
                atomic_write(run.config, (json.dumps(stored_config(cfg), indent=2) + "\n").encode())

        # Optimizer, schedule, loss scaler and EMA; only fp16 needs loss scaling.
        optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda i: lr_factor(i, cfg.warmup, total_steps, cfg.lr_schedule))
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        state = TrainState(model, EMA(model, decay=cfg.ema_decay, warmup=cfg.ema_warmup), optimizer, scaler, scheduler)
        # Post-hoc EMA profiles (rank 0 alone: every rank holds the same weights, and rank 0 writes the files).
        if cfg.phema and ranks.is_main:
            state.phema = PowerEMA(model, parse_sigma_rels(cfg.phema, "--phema"))
            log.say(phema_plan(state.phema, model, cfg, total_steps, run))
        amp = autocast(device, precision)
        # A step's t, noise and unconditional rows: drawn for the whole global batch from (seed, step) (step_draws).
        noise_gen = torch.Generator(device)
        legacy = getattr(loader, "per_rank", False)  # a format 1 run in its own order: its per-rank noise stream too
        torch.manual_seed(cfg.seed + ranks.rank)  # dropout masks differ across ranks
        np.random.seed(cfg.seed + ranks.rank)

        # Restore everything a step depends on, the random states last.
        if ckpt is not None:
            resumed = restore_checkpoint(ckpt, state, rank=ranks.rank, world_size=world_size)
            set_run_lr(optimizer, scheduler, cfg, total_steps)
            if resumed.rng is not None:
                restore_rng(resumed.rng)
                if legacy and "noise" in resumed.rng:
                    noise_gen.set_state(resumed.rng["noise"])
                elif legacy:  # the oldest files kept no noise stream: the seeding of that code
                    noise_gen.manual_seed(cfg.seed + 1_000_003 * (ranks.rank + 1) + state.step)
            else:  # a new number of ranks: fresh dropout streams, apart from those of the first start
                torch.manual_seed(cfg.seed + 1_000_003 * (ranks.rank + 1) + state.step)
            if ranks.is_main:
                with os_errors_as_write_error(run.metrics, run.root):
                    trim_metrics(run.metrics, state.step)
                    drop_later_snapshots(run, state.step, log)
        del ckpt  # the restored state lives in the objects now; free the copies

        # Wrap for training: DDP across ranks, then torch.compile; checkpoints always come from the plain `model`.
        net: torch.nn.Module = model
        if world_size > 1:
            net = DistributedDataParallel(model, device_ids=[ranks.local_rank] if device.type == "cuda" else None)
        if cfg.compile:
            net = torch.compile(net)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

        # Fixed noise for the sample grids: the same 64 starting points every time, so the grids show progress.
        sample_noise = torch.randn((64, model.config["in_channels"], loader.image_size, loader.image_size),
                                   generator=torch.Generator().manual_seed(cfg.seed)).to(device)
        # FID during training (rank 0): the feature network and the training shards' statistics (cached), once.
        fid_eval = TrainingFID(cfg.data, loader.image_size, model.config["in_channels"], cfg.eval_n, cfg.eval_steps,
                               cfg.seed, device, ref_max=cfg.eval_ref_max, sampler=cfg.eval_sampler
                               ) if ranks.is_main and cfg.eval_every else None

        # Logs, signal handlers, the lock and the process group are undone by `cleanup` however the run ends.
        if world_size > 1:
            cleanup.callback(dist.destroy_process_group)
        log.open(run, step=state.step, total=total_steps, images_seen=state.images_seen, batch_size=cfg.batch_size,
                 device=device, tensorboard=cfg.tensorboard, config=stored_config(cfg),
                 cleanup=cleanup)
        ckpts = Checkpointer(run, cfg, ranks, loader, diffusion, log, noise_gen=noise_gen if legacy else None)
        stop_signal = catch_stop_signals(cleanup)
        stats = RunningStats(device)
        nan_fault = nan_test_steps()
        saved_step = -1
        batches = iter(loader)
        if state.step >= total_steps:
            log.say(f"already at step {state.step} of {total_steps}; nothing to train")
        early_stop = out_of_patience(cfg, state)
        if early_stop:  # stopped early before: not another step while the same --patience holds
            log.say(f"[yellow]this run stopped early[/] at step {state.step}: {early_stop}; nothing to train "
                    f"(give a larger --patience, or 0, to train on)")

        while state.step < total_steps and not early_stop:
            # Fetch the next batch; an exhausted loader starts the next epoch.
            t0 = time.perf_counter()
            state.epoch = loader.epoch  # the epoch this batch belongs to
            try:
                batch = next(batches, None)
            except ShardReadError:
                watch.check()  # a shard rewritten under the reader: say that, rather than what the read ran into
                raise
            if batch is None:
                watch.check()
                batches = iter(loader)
                continue
            log.waited(time.perf_counter() - t0)
            x0 = batch["image"]
            if cfg.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            cond = batch["attr"].float() if cfg.cond else None
            if cfg.cond_embed:  # [attributes | embedding | 1 = given] (unet.py); dropped rows become all -1
                e = batch["embed"].float()
                cond = torch.cat([c for c in (cond, e, e.new_ones(e.shape[0], 1)) if c is not None], dim=1)

            # One step: loss under autocast, scaled backward, clipping, the update, the schedule and the EMA.
            lr = optimizer.param_groups[0]["lr"]
            p_uncond = cfg.p_uncond if cfg.cond or cfg.cond_embed else 0.0
            draws = None if legacy else step_draws(diffusion, noise_gen, cfg.seed, state.step, ranks, x0, cond,
                                                   p_uncond=p_uncond, p_free=p_free, free_dim=model.cond_dim)
            loss, grad_norm = train_step(net, state, diffusion, x0, amp=amp, draws=draws, generator=noise_gen,
                                         cond=cond, p_uncond=p_uncond, p_free=p_free, grad_clip=cfg.grad_clip,
                                         accum=cfg.accum, poison=nan_fault(state.step + 1))

            # Update the running statistics; agree across ranks whether a signal asked us to stop.
            state.step += 1
            state.images_seen += cfg.batch_size
            if state.phema is not None:
                state.phema.update(state.images_seen, cfg.batch_size)
            stats.add(loss)
            log.advance(state.step)
            stopping = ranks.any(bool(stop_signal))
            step = state.step
            checkpoint_now = (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == total_steps or stopping

            # FID of the EMA samples (rank 0); a new best FID is checkpointed too, as best-fid.pt.
            evaluating = fid_eval is not None and (step % cfg.eval_every == 0 or step == total_steps)
            scores = fid_eval(model, state.ema, diffusion, amp) if evaluating else {}
            best = ranks.any(scores.get("fid") is not None and scores["fid"] < (state.best_fid or math.inf))
            if best and scores:
                state.best_fid, state.best_fid_step = scores["fid"], step
            if evaluating:  # --patience: evaluations without a better FID (rank 0 counts; its checkpoint keeps it)
                state.evals_since_best = 0 if best else state.evals_since_best + 1
            reason = out_of_patience(cfg, state) if evaluating else ""
            if ranks.any(bool(reason)):  # every rank stops with rank 0, which evaluates
                early_stop = reason or f"no better FID in {cfg.patience} evaluations (rank 0's)"
            checkpoint_now = checkpoint_now or best or bool(early_stop)
            log.exclude(scores.get("eval_s", 0.0))

            # Log: read the device values back, average the loss over ranks, one line and one JSON record.
            if step % cfg.log_every == 0 or checkpoint_now or scores:
                adam_state = optimizer.state.get(next(iter(model.parameters())), {})
                log.record({"step": step, "epoch": state.epoch, "images_seen": state.images_seen,
                            "loss": stats.read(ranks, cfg.max_nonfinite, step, ckpts.last), "lr": lr,
                            "grad_norm": float(grad_norm), "loss_scale": float(scaler.get_scale()),
                            "skipped_steps": step - int(adam_state.get("step", 0))},  # updates not taken
                           scores)

            # Sample a grid from the EMA weights (rank 0; the global random states are left untouched).
            last = step == total_steps or bool(early_stop)
            if ranks.is_main and cfg.sample_every and (step % cfg.sample_every == 0 or last):
                with state.ema.sampling(model), amp:
                    grid = diffusion.sample(model, tuple(sample_noise.shape), sampler=cfg.sample_sampler,
                                            steps=min(cfg.sample_steps, cfg.timesteps), noise=sample_noise)
                with os_errors_as_write_error(run.sample_grid(step), run.root):
                    grid_path = save_grid(grid, run.sample_grid(step), nrow=8)
                log.images("samples", grid, step)
                log.say(f"samples: {grid_path}")

            # Post-hoc EMA snapshots (rank 0), before the checkpoint of the same step: a checkpoint never runs ahead
            # of the snapshots, so a resumed run writes every one of them.
            if state.phema is not None and (step % cfg.phema_every == 0 or last):
                with os_errors_as_write_error(run.phema_snapshots, run.root):
                    state.phema.write_snapshots(run.phema_snapshots, model, step=step, batch_size=cfg.batch_size,
                                                dtype=cfg.phema_dtype, meta=ckpts.meta(model))

            # Checkpoint: every rank's random and data states, gathered; rank 0 writes; all wait for it.
            if checkpoint_now and saved_step != step:
                watch.check()
                ckpts.write(state, best)
                saved_step = step
            if early_stop:
                log.say(f"[yellow]stopped early at step {step}[/]: {early_stop} (--patience {cfg.patience}); "
                        f"the last checkpoint is {ckpts.last}")
                break
            if stopping:
                name = signal.Signals(stop_signal[0]).name if stop_signal else "a signal on another rank"
                log.say(f"[yellow]stopped by {name} at step {step}[/]; run the same command to continue")
                break

    if state.step >= total_steps and ckpts.last is not None:
        log.say(f"[bold green]done[/]: step {state.step}, {state.images_seen} images; last checkpoint {ckpts.last}")
    last = ckpts.last or ckpt_path
    report_status("done" if state.step >= total_steps or early_stop else "stopped", step=state.step,
                  steps=total_steps, signal=signal.Signals(stop_signal[0]).name if stop_signal else None,
                  checkpoint=str(last) if last else None, **({"early_stop": early_stop} if early_stop else {}))
    return ckpts.last


def cli(argv: list[str] | None = None) -> Path | None:
    """The command line: a user's error is one line and exit status 1, anything else a traceback."""
    previous = {s: signal.signal(s, stop_before_first_step) for s in STOP_SIGNALS}
    try:
        with config.user_errors():
            return main(*config.parse(TrainConfig, argv))
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, without a traceback
        raise SystemExit(130) from None
    except SystemExit as e:
        if stopped_early:
            report_status("stopped", step=None, signal=signal.Signals(stopped_early[0]).name)
        elif e.code not in (0, None):  # a user's error (one line); 0 is --help's
            report_status("failed", error=str(e.code))
        raise
    except BaseException as e:
        report_status("failed", error=f"{type(e).__name__}: {e}".splitlines()[0])
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    cli()

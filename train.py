"""Train the diffusion UNet on CelebA shards, for days, without ever losing a step.

    python train.py --data shards64 --out runs/c64 --preset celeba64 --steps 500000
    torchrun --nproc_per_node=8 train.py --data shards64 --out runs/c64 --steps 500000      # one machine, 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=JOB --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...
                                  # on each of 2 machines; OUT and the shards on a filesystem they share

Run the same command again and it continues from the newest checkpoint in OUT/checkpoints that loads and verifies
(`--resume auto`): model, EMA, optimizer, loss scale, LR schedule, step, epoch, image count, data position and every
random state come back, so on the CPU a run killed at any moment ends bit-identical to one never interrupted (with
the same thread count: float sums depend on it).
SIGTERM or SIGINT (preemption, notebook limits) finishes the step, writes a checkpoint and exits 0; a second SIGINT
exits at once. `--batch-size` counts images per step over all ranks; each rank reads its own part of the data.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import inspect
import json
import math
import os
import platform
import re
import signal
import sys
import time
import warnings
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch.nn.parallel import DistributedDataParallel

from data import DaliMissingError, DataError, ShardReadError, make_loader
from diffusion import GaussianDiffusion
from ema import EMA
from images import save_grid
from unet import PRESETS, UNet, build_unet
from utills import (CheckpointError, atomic_write_bytes, capture_rng, find_latest, list_checkpoints, load_checkpoint,
                    resolve_checkpoint, restore_rng, save_checkpoint)


@dataclass
class TrainConfig:
    # Data and run folder.
    data: str = ""  # shards folder written by prepare_shards.py (required)
    out: str = "runs/celeba"  # run folder: config.json, checkpoints/, samples/, metrics.jsonl
    loader: str = "dali"  # data pipeline: dali | torch
    num_workers: int = -1  # DALI CPU threads or torch DataLoader workers (-1 = the loader's default)
    # Model and diffusion: the architecture, fixed by the checkpoint when resuming.
    preset: str = "celeba64"  # UNet preset: tiny | small64 | celeba64 | celeba128
    base_channels: int = 0  # override the preset's base width (0 = the preset's)
    dropout: float = -1.0  # override the preset's dropout (negative = the preset's)
    cond: bool = False  # condition on the manifest's attributes (classifier-free guidance)
    timesteps: int = 1000  # diffusion steps T
    schedule: str = "linear"  # noise schedule: linear | cosine
    objective: str = "eps"  # what the UNet predicts: eps | v | x0
    # Optimisation.
    min_snr_gamma: float = 0.0  # min-SNR-gamma loss weighting (0 = off, 5 is usual)
    p_uncond: float = 0.1  # with --cond: probability of training a row unconditionally (the null embedding)
    batch_size: int = 128  # images per step, summed over all ranks
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
    # Checkpoints, samples and logs.
    ckpt_every: int = 5000  # write a checkpoint every N steps (0 = only at the end and on SIGTERM/SIGINT)
    keep: int = 3  # checkpoints kept in OUT/checkpoints (0 = all)
    sample_every: int = 5000  # 8x8 EMA DDIM grid to OUT/samples every N steps and at the end (0 = never)
    sample_steps: int = 50  # DDIM steps for those grids
    log_every: int = 100  # steps per log line and metrics.jsonl record
    resume: str = "auto"  # auto (newest valid checkpoint in OUT, if any) | never | PATH (checkpoint or run folder)
    tensorboard: bool = False  # also write TensorBoard scalars and grids to OUT/tensorboard
    # Hardware.
    device: str = "auto"  # auto | cuda | cpu
    seed: int = 0  # seeds the weights, the noise, the data order and the grids' fixed noise
    compile: bool = False  # torch.compile the model for training (checkpoints hold the plain module)
    channels_last: bool = False  # channels_last memory format (faster convolutions on tensor cores)
    # Guards, and hooks for the tests.
    max_nonfinite: int = 100  # stop when the loss has been NaN/inf for this many consecutive steps
    fault_nan_at_step: int = 0  # test hook: the loss of this step (and the following) is NaN (0 = off)
    fault_nan_steps: int = 0  # test hook: how many steps get the NaN loss (0 = all from fault_nan_at_step)


# Fields that define the model and the diffusion: taken from the checkpoint on resume, and a clash is an error.
ARCH_FIELDS = ("preset", "base_channels", "dropout", "cond", "timesteps", "schedule", "objective")
CHOICES = {"loader": ("dali", "torch"), "preset": tuple(PRESETS), "schedule": ("linear", "cosine"),
           "objective": ("eps", "v", "x0"), "lr_schedule": ("constant", "cosine"),
           "precision": ("auto", "fp16", "bf16", "fp32"), "device": ("auto", "cuda", "cpu")}


class ConfigError(ValueError):
    """A flag that cannot be used (a bad value, or an architecture clash with the checkpoint)."""


# ----------------------------------------------------------------------------------------------------------- helpers

def field_comments(cls: type) -> dict[str, str]:
    """The `# comment` after each field in a dataclass's source, used as the flag's help."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+):[^#]*#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2)
    return comments


def parse_config(cls: type, argv: list[str] | None = None) -> tuple[object, set[str]]:
    """Build a dataclass config from the command line, `--batch-size` for `batch_size`; also return the given names."""
    helps = field_comments(cls)
    parser = argparse.ArgumentParser(description=(sys.modules[cls.__module__].__doc__ or "").splitlines()[0],
                                     argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default)
        help_text = f"{helps.get(f.name, '')} [{f.default}]".replace("%", "%%")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, type=kind, help=help_text, metavar=f.name.upper())
    given = vars(parser.parse_args(argv))
    return cls(**given), set(given)


def check_config(cfg: TrainConfig) -> None:
    """Reject values that cannot work, with one line naming the flag."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: choose from {', '.join(allowed)}")
    if not cfg.data:
        raise ConfigError("--data is required (a shards folder written by prepare_shards.py)")
    if cfg.steps <= 0 and cfg.epochs <= 0:
        raise ConfigError("give --steps N or --epochs E")
    for name in ("batch_size", "log_every", "sample_steps", "max_nonfinite", "timesteps"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("warmup", "ckpt_every", "keep", "sample_every", "grad_clip", "min_snr_gamma", "weight_decay"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.p_uncond <= 1.0 or not 0.0 <= cfg.ema_decay <= 1.0:
        raise ConfigError("--p-uncond and --ema-decay must be in [0, 1]")


def merge_resumed_config(cfg: TrainConfig, saved: dict, given: Collection[str]) -> tuple[TrainConfig, list[str]]:
    """Architecture fields from the checkpoint's config, run fields from `cfg`; returns the config and what changed.

    An architecture flag that was given (or differs from its default) and differs from the checkpoint is an error.
    """
    updates, changes = {}, []
    for f in dataclasses.fields(cfg):
        if f.name not in saved:
            continue
        new, old = getattr(cfg, f.name), saved[f.name]
        if f.name in ARCH_FIELDS:
            if (f.name in given or new != f.default) and new != old:
                raise ConfigError(f"--{f.name.replace('_', '-')} {new!r} changes the architecture: the checkpoint "
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


def pick_device(name: str, local_rank: int) -> torch.device:
    """auto -> this rank's GPU when CUDA is present, else the CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def pick_precision(name: str, device: torch.device) -> str:
    """auto -> fp16 on CUDA (with a GradScaler), fp32 on the CPU."""
    if name == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return name


def versions() -> dict[str, str]:
    """Versions of what produced a checkpoint, for the record."""
    out = {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": str(np.__version__)}
    for package in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "torch-ema"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[package] = importlib.metadata.version(package)
    return out


def trim_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl records after `step`, written by a run that was killed after its last checkpoint."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, TypeError):
            if json.loads(line)["step"] <= step:
                kept.append(line)
    atomic_write_bytes("".join(line + "\n" for line in kept).encode(), path)


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor is free of NaN and inf (one read-back)."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the parameters' bytes: the same on every rank while DDP keeps them in step."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def gather(obj: object, world_size: int, group: object = None) -> list:
    """Every rank's `obj`, in rank order (just [obj] without a process group)."""
    if world_size == 1:
        return [obj]
    out: list = [None] * world_size
    dist.all_gather_object(out, obj, group=group)
    return out


def format_status(m: dict, total: int) -> str:
    """The fixed-format log line for one metrics record."""
    eta = time.strftime("%H:%M:%S", time.gmtime(m["eta_s"])) if m["eta_s"] < 86400 else f"{m['eta_s'] / 86400:.1f}d"
    mem = f" | mem {m['gpu_mem_gb']:.1f} GB" if "gpu_mem_gb" in m else ""
    loss = "nan" if m["loss"] is None else f"{m['loss']:.4f}"
    return (f"step {m['step']}/{total} ep {m['epoch']} | loss {loss} | lr {m['lr']:.2e} | "
            f"gnorm {m['grad_norm']:.3f} | scale {m['loss_scale']:g} | {m['images_per_s']:.1f} img/s | "
            f"data {100 * m['data_wait']:.0f}%{mem} | skipped {m['skipped_steps']} | eta {eta}")


# -------------------------------------------------------------------------------------------------------------- main

def main(cfg: TrainConfig, given: Collection[str] = ()) -> Path | None:
    """Train (or continue training) the run in `cfg.out`; returns the last checkpoint written, if any."""
    check_config(cfg)

    # Join the process group when torchrun started several processes; rank 0 alone writes files.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg.device, local_rank)
    control = None
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        control = dist.new_group(backend="gloo")  # CPU-side flags and gathers, without touching the GPU stream
    if cfg.batch_size % world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} does not split over {world_size} ranks")
    is_main = rank == 0
    console = Console(quiet=not is_main, highlight=False, soft_wrap=True)
    run_dir = Path(cfg.out)

    # Pick the checkpoint to continue from; architecture comes from it, run control from the command line.
    ckpt_path, ckpt = None, None
    if cfg.resume == "auto":
        found = find_latest(run_dir)
        if found is None and list_checkpoints(run_dir):
            raise CheckpointError(f"{run_dir / 'checkpoints'}: no checkpoint there loads and verifies")
        ckpt_path, ckpt = found if found else (None, None)
    elif cfg.resume != "never":
        ckpt_path = resolve_checkpoint(cfg.resume)
        ckpt = load_checkpoint(ckpt_path)
    elif list_checkpoints(run_dir):
        raise ConfigError(f"--resume never: {run_dir / 'checkpoints'} already holds checkpoints; use a new --out")
    if ckpt is not None:
        cfg, changes = merge_resumed_config(cfg, ckpt["config"], given)
        console.print(f"[bold green]resuming[/] from {ckpt_path} (step {ckpt['step']})")
        for change in changes:
            console.print(f"  changed since the checkpoint: {change}")

    # Show the configuration and write it to the run folder.
    precision = pick_precision(cfg.precision, device)
    table = Table(title=f"train.py -> {run_dir}", show_header=False, box=None)
    for key, value in asdict(cfg).items():
        table.add_row(key, repr(value))
    table.add_row("[dim]device / precision / world", f"[dim]{device} / {precision} / {world_size}")
    console.print(table)
    if is_main:
        atomic_write_bytes((json.dumps(asdict(cfg), indent=2) + "\n").encode(), run_dir / "config.json")

    # Open this rank's part of the training data, continuing at the checkpoint's position.
    data_state = ckpt["data_state"] if ckpt is not None else None
    if data_state is not None and "ranks" in data_state:  # a torchrun run saves one position per rank
        data_state = data_state["ranks"][rank] if data_state["world_size"] == world_size else None
    elif data_state is not None and world_size > 1:
        data_state = None
    if ckpt is not None and data_state is None:
        console.print("[yellow]warning:[/] the number of ranks changed: the data order restarts")
    loader_args = dict(split="train", backend=cfg.loader, device=device, shuffle=True, flip=True, seed=cfg.seed,
                       rank=rank, world_size=world_size, drop_last=True,
                       num_threads=None if cfg.num_workers < 0 else cfg.num_workers)
    try:
        loader = make_loader(cfg.data, cfg.batch_size // world_size, **loader_args, state=data_state)
    except DataError as e:
        if data_state is None:
            raise
        # A changed --batch-size, --seed or --loader cannot continue the old order: say so and start a new one.
        console.print(f"[yellow]warning:[/] {e}; the data order restarts")
        loader = make_loader(cfg.data, cfg.batch_size // world_size, **loader_args)
    if len(loader) == 0:
        raise ConfigError(f"{cfg.data}: fewer training images than one batch of {cfg.batch_size // world_size}")
    if cfg.cond and not loader.attributes:
        raise ConfigError(f"--cond: {cfg.data}/manifest.json lists no attributes")
    total_steps = cfg.steps if cfg.steps > 0 else cfg.epochs * len(loader)

    # Build the model and the diffusion, identically on every rank (DDP checks that).
    torch.manual_seed(cfg.seed)
    if ckpt is not None:
        model = UNet(**ckpt["model_config"])
        if ckpt["image_size"] != loader.image_size:
            raise ConfigError(f"{cfg.data}: images are {loader.image_size} px, the checkpoint's model "
                              f"{ckpt['image_size']} px")
        if cfg.cond and list(ckpt["attributes"]) != list(loader.attributes):
            raise ConfigError(f"{cfg.data}: the attributes differ from the checkpoint's")
    else:
        overrides = {"image_size": loader.image_size, "cond_dim": len(loader.attributes) if cfg.cond else 0}
        if cfg.base_channels > 0:
            overrides["base_channels"] = cfg.base_channels
        if cfg.dropout >= 0:
            overrides["dropout"] = cfg.dropout
        model = build_unet(cfg.preset, **overrides)
    diffusion = GaussianDiffusion(timesteps=cfg.timesteps, schedule=cfg.schedule, objective=cfg.objective,
                                  min_snr_gamma=cfg.min_snr_gamma or None).to(device)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    console.print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                  f"{loader.image_size} px, {loader.num_samples} images per epoch on each of {world_size} rank(s)")

    # Optimizer, schedule, loss scaler and EMA; only fp16 needs loss scaling.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i, cfg.warmup, total_steps, cfg.lr_schedule))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ema = EMA(model, decay=cfg.ema_decay, warmup=cfg.ema_warmup)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
                              enabled=precision in ("fp16", "bf16"))
    # t, the noise and the unconditional rows come from this generator, so its state is part of the checkpoint.
    noise_gen = torch.Generator(device).manual_seed(cfg.seed + 1_000_003 * (rank + 1))
    torch.manual_seed(cfg.seed + rank)  # dropout masks differ across ranks
    np.random.seed(cfg.seed + rank)

    # Restore everything a step depends on, the random states last.
    step, epoch, images_seen = 0, 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
        if scaler.is_enabled() and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        step, epoch, images_seen = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["images_seen"])
        # --lr and --weight-decay may change on resume; unchanged they reproduce the saved values exactly.
        scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["initial_lr"], group["weight_decay"] = cfg.lr, cfg.weight_decay
            group["lr"] = cfg.lr * lr_factor(scheduler.last_epoch, cfg.warmup, total_steps, cfg.lr_schedule)
        rng = ckpt["rng"]
        if world_size > 1 and len(rng.get("ranks", [])) == world_size:
            rng = rng["ranks"][rank]
        noise_gen.set_state(rng["noise"])
        restore_rng(rng)
        if is_main:
            trim_metrics(run_dir / "metrics.jsonl", step)
    del ckpt  # the restored state lives in the objects now; free the copies

    # Wrap for training: DDP across ranks, then torch.compile; checkpoints always come from the plain `model`.
    net: torch.nn.Module = model
    if world_size > 1:
        net = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # Fixed noise for the sample grids: the same 64 starting points every time, so the grids show progress.
    sample_noise = torch.randn((64, model.config["in_channels"], loader.image_size, loader.image_size),
                               generator=torch.Generator().manual_seed(cfg.seed)).to(device)

    # Logs: metrics.jsonl, optional TensorBoard, and a live display on a terminal (plain lines otherwise).
    # `cleanup` closes them, restores the signal handlers and leaves the process group however the loop ends.
    cleanup = contextlib.ExitStack()
    if world_size > 1:
        cleanup.callback(dist.destroy_process_group)
    writer = None
    if is_main and cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = cleanup.enter_context(SummaryWriter(str(run_dir / "tensorboard"), purge_step=step + 1))
        except ImportError:
            console.print("[yellow]warning:[/] --tensorboard needs the tensorboard package (pip install tensorboard)")
    metrics_file = cleanup.enter_context(open(run_dir / "metrics.jsonl", "a")) if is_main else None
    progress = cleanup.enter_context(Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"), console=console, disable=not console.is_terminal))
    task = progress.add_task("train", total=total_steps, completed=step, status="")

    # SIGTERM/SIGINT ask for a checkpoint after the current step; a second SIGINT stops at once.
    stop_signal: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        if stop_signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop_signal.append(signum)  # acted on after the step (printing from a handler is not safe)
    for s in (signal.SIGTERM, signal.SIGINT):
        cleanup.callback(signal.signal, s, signal.signal(s, on_signal))

    # Running sums stay on the device and are read back only when logging.
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    loss_count = torch.zeros((), device=device, dtype=torch.float64)
    streak = torch.zeros((), device=device, dtype=torch.int64)  # consecutive non-finite losses
    worst_streak = torch.zeros((), device=device, dtype=torch.int64)
    grad_norm = torch.zeros((), device=device)
    lr = optimizer.param_groups[0]["lr"]
    last_log_time, last_log_images, data_wait = time.perf_counter(), images_seen, 0.0
    saved_step, ckpt_written = -1, None
    batches = iter(loader)
    if step >= total_steps:
        console.print(f"already at step {step} of {total_steps}; nothing to train")

    with cleanup:
        while step < total_steps:
            # Fetch the next batch; an exhausted loader starts the next epoch.
            t0 = time.perf_counter()
            epoch = loader.epoch  # the epoch this batch belongs to
            batch = next(batches, None)
            if batch is None:
                batches = iter(loader)
                continue
            data_wait += time.perf_counter() - t0
            x0 = batch["image"]
            if cfg.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            cond = batch["attr"].float() if cfg.cond else None

            # Forward and backward under autocast; the diffusion maths runs in fp32 inside loss().
            with autocast:
                loss = diffusion.loss(net, x0, cond=cond, p_uncond=cfg.p_uncond if cfg.cond else 0.0,
                                      generator=noise_gen)
            if cfg.fault_nan_at_step and step + 1 >= cfg.fault_nan_at_step and (
                    not cfg.fault_nan_steps or step + 1 < cfg.fault_nan_at_step + cfg.fault_nan_steps):
                loss = loss * float("nan")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()

            # Unscale, clip by the global norm, and update unless the gradients are not finite.
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            lr = optimizer.param_groups[0]["lr"]
            if scaler.is_enabled():
                scaler.step(optimizer)  # skips the update on inf/NaN gradients and lowers the scale
                scaler.update()
            elif bool(torch.isfinite(grad_norm)):  # one read-back per step: bf16/fp32 have no scaler to skip for us
                optimizer.step()
            with warnings.catch_warnings():  # stepping the schedule after a skipped update is intended
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                scheduler.step()

            # Update the EMA and the running statistics.
            ema.update()
            step += 1
            images_seen += cfg.batch_size
            finite = torch.isfinite(loss.detach())
            loss_sum += torch.where(finite, loss.detach().double(), 0.0)
            loss_count += finite.double()
            streak = torch.where(finite, 0, streak + 1)
            worst_streak = torch.maximum(worst_streak, streak)
            progress.update(task, completed=step)

            # Agree across ranks whether a signal asked us to stop (a CPU flag on the gloo group).
            stopping = bool(stop_signal)
            if world_size > 1:
                flag = torch.tensor([int(stopping)])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control)
                stopping = bool(flag.item())
            checkpoint_now = (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == total_steps or stopping

            # Log: read the device values back, average the loss over ranks, one line and one JSON record.
            if step % cfg.log_every == 0 or checkpoint_now:
                sums = torch.stack([loss_sum, loss_count])
                if world_size > 1:
                    dist.all_reduce(sums)
                    dist.all_reduce(worst_streak, op=dist.ReduceOp.MAX)  # every rank stops together
                if int(worst_streak) >= cfg.max_nonfinite:
                    raise FloatingPointError(
                        f"the loss was NaN/inf for {int(worst_streak)} consecutive steps (now at step {step}, "
                        f"non-finite since step {step - int(streak) + 1}); stopping without a checkpoint "
                        f"(last good one: {ckpt_written or 'none in this process'})")
                now = time.perf_counter()
                adam_state = optimizer.state.get(next(iter(model.parameters())), {})
                record = {
                    "step": step, "epoch": epoch, "images_seen": images_seen,
                    "loss": float(sums[0] / sums[1]) if float(sums[1]) > 0 else None,
                    "lr": lr, "grad_norm": float(grad_norm), "loss_scale": float(scaler.get_scale()),
                    "images_per_s": (images_seen - last_log_images) / max(now - last_log_time, 1e-9),
                    "data_wait": data_wait / max(now - last_log_time, 1e-9),
                    "skipped_steps": step - int(adam_state.get("step", 0)),  # updates the optimizer did not take
                }
                record["eta_s"] = (total_steps - step) * cfg.batch_size / max(record["images_per_s"], 1e-9)
                if device.type == "cuda":
                    record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                if is_main:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    if writer is not None:
                        for key, value in record.items():
                            if key not in ("step", "epoch") and value is not None:
                                writer.add_scalar(f"train/{key}", value, step)
                    if progress.disable:
                        console.print(format_status(record, total_steps))
                    else:
                        progress.update(task, status=format_status(record, total_steps))
                loss_sum.zero_()
                loss_count.zero_()
                worst_streak.copy_(streak)
                last_log_time, last_log_images, data_wait = now, images_seen, 0.0

            # Sample a grid from the EMA weights (rank 0; the global random states are left untouched).
            if is_main and cfg.sample_every and (step % cfg.sample_every == 0 or step == total_steps):
                model.eval()
                with ema.average_parameters(), torch.random.fork_rng(devices=[device] if device.type == "cuda"
                                                                      else []), autocast:
                    grid = diffusion.sample(model, tuple(sample_noise.shape), sampler="ddim",
                                            steps=min(cfg.sample_steps, cfg.timesteps), noise=sample_noise)
                model.train()
                grid_path = save_grid(grid, run_dir / "samples" / f"step-{step:08d}.png", nrow=8)
                if writer is not None:
                    writer.add_images("samples", (grid.clamp(-1, 1) + 1) / 2, step)
                console.print(f"samples: {grid_path}")

            # Checkpoint: every rank's random and data states, gathered; rank 0 writes; all wait for it.
            # No batch has been fetched since this step's, so the loader's state is the position right after it.
            if checkpoint_now and saved_step != step:
                rng = {**capture_rng(), "noise": noise_gen.get_state()}
                rngs, data_states = gather(rng, world_size, control), gather(loader.state_dict(), world_size, control)
                if world_size > 1:
                    if len(set(gather(weights_digest(model), world_size, control))) > 1:
                        raise RuntimeError(f"step {step}: the ranks hold different weights (DDP out of step)")
                    console.print(f"weights identical on {world_size} ranks at step {step}")
                if is_main:
                    ema_state = ema.state_dict()
                    if not all_finite([*model.parameters(), *ema_state["shadow_params"]]):
                        raise FloatingPointError(f"step {step}: the weights are not finite; not writing a "
                                                 f"checkpoint over {ckpt_written or 'the previous ones'}")
                    ckpt_written = save_checkpoint(run_dir, {
                        "model": model.state_dict(), "ema": ema_state, "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(), "lr_scheduler": scheduler.state_dict(), "step": step,
                        "epoch": epoch, "images_seen": images_seen,
                        "data_state": data_states[0] if world_size == 1 else {"world_size": world_size,
                                                                                "ranks": data_states},
                        "rng": rngs[0] if world_size == 1 else {**rngs[0], "ranks": rngs},
                        "config": asdict(cfg), "model_config": model.config, "diffusion_config": diffusion.config,
                        "image_size": loader.image_size, "attributes": list(loader.attributes) if cfg.cond else [],
                        "versions": versions(),
                    }, step, cfg.keep)
                    console.print(f"checkpoint: {ckpt_written}")
                saved_step = step
                if world_size > 1:
                    dist.barrier(group=control)
            if stopping:
                name = signal.Signals(stop_signal[0]).name if stop_signal else "a signal on another rank"
                console.print(f"[yellow]stopped by {name} at step {step}[/]; run the same command to continue")
                break

    if step >= total_steps and ckpt_written is not None:
        console.print(f"[bold green]done[/]: step {step}, {images_seen} images; last checkpoint {ckpt_written}")
    return ckpt_written


if __name__ == "__main__":
    config, given_flags = parse_config(TrainConfig)
    try:
        main(config, given_flags)
    except (ConfigError, CheckpointError, DataError, ShardReadError, DaliMissingError, FileNotFoundError,
            FloatingPointError) as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None

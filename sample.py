"""Faces out of a run: sample grids and image folders, a noise-to-face strip, export.

    python sample.py --ckpt RUN --n 64 --out grid.png              # DDIM-50 grid from the EMA weights
    python sample.py --ckpt RUN --sampler dpm++2m --steps 15       # DPM-Solver++(2M), second order (docs/sampling.md)
    python sample.py --ckpt RUN --n 50000 --outdir samples/        # 000000.png, 000001.png ... resumable (for FID)
    python sample.py --ckpt RUN --trajectory traj.png              # noise -> face: predicted x0 at several steps
    python sample.py --ckpt RUN --attrs "Smiling=1,Eyeglasses=1" --guidance 3 --out smiling.png
    python sample.py --ckpt RUN --sweep Eyeglasses,Smiling --n 8 --guidance 3 --out sweep.png  # rows: =0 / free / =1
    python sample.py --ckpt RUN --attrs Wearing_Hat=1 --sweep guidance=1,2,3,5 --out hats.png  # rows: guidance scales
    python sample.py --ckpt RUN --like face.jpg --like face2.png --n 8 --guidance 3   # faces like these (--cond-embed)
    python sample.py --ckpt RUN --like-key valid:0 --sweep guidance=1,2,4 --n 8      # a face of the shards, 3 rows
    python pictures.py --progress-gif RUN                          # progress GIF and loss curve: now in pictures.py
    python sample.py --ckpt RUN --export model.safetensors         # EMA weights + configs in the metadata

`--ckpt` is a run folder (its newest valid checkpoint), a checkpoint file, or a safetensors file written by --export.
The model comes back from the configs stored with the weights (`UNet(**model_config)`,
`GaussianDiffusion(**diffusion_config)`), with the EMA weights unless --no-ema.

Determinism. Image i starts from its own x_T, drawn by a CPU generator seeded from (seed, i); the n images are made in
the fixed batches [k*B, (k+1)*B) and a batch's per-step noise (DDPM, or DDIM with eta > 0) comes from a generator
seeded from (seed, k*B). So the same command gives the same PNG bytes, an --outdir run that was interrupted and
started again gives the images an uninterrupted run gives, and the grid of --n 16 shows the first 16 images of an
--outdir run. With deterministic DDIM (eta = 0, the default) or DPM-Solver++ an image depends only on (seed, i), not
on --batch-size or --n (up to float rounding of batched kernels); with stochastic sampling it also depends on the batch
layout.

Conditioning. `--attrs "Smiling=1,Eyeglasses=0"` sets those attributes and leaves every other one free: the model draws
it as the data has it (three-state models, trained with attributes dropped to "unknown" one by one). A conditional
model sampled without --attrs leaves them all free: unconditional samples. --guidance w > 1 is classifier-free
guidance, null + w * (cond - null) with null = every attribute free, so it pushes towards the named attributes only.
Checkpoints from before free attributes (two-state models, no "cond_free" in their model config) load and sample as
they always did: an attribute left out is 0 (absent), and no --attrs is the learned null embedding.

Faces like a reference (models trained with --cond-embed). `--like FILE` (repeat it, or give FILE,FILE) crops and
resizes each reference as the shards were (their crop, size and encoding, recorded in the checkpoint), embeds it with
the encoder named in the checkpoint (its weights checked by sha256; --encoder gives another path to the same
weights), and the grid gets one row per reference: the reference first, then --n faces. `--like-key KEY` takes the
shard image of that sample key (a source file's stem, e.g. 182640) or `SPLIT:I` (valid:0, the first face of the
valid split), from --data (default the run's shards). --guidance w > 1 contrasts the reference
(and any --attrs) with the null embedding: null + w * (cond - null). With --outdir, image i follows reference
i mod R. Without --like, such a model samples unconditionally (its learned null embedding).

Sweep grid (`--sweep`): the same starting noise in every column, one row per setting: "Eyeglasses,Smiling" gives rows
Eyeglasses=0, free, =1 then Smiling=0, free, =1 (on top of --attrs; no "free" row for two-state models);
"guidance=1,3,5" gives one row per guidance scale with --attrs (or --like: the rows of each reference in turn, each
starting with the reference). Each row is labelled on the left.

Checks. What cannot work is one line naming the flag, before any sampling: an attribute named twice in --attrs, more
--steps than the model has, a grid (--n, a --sweep, a --trajectory) or a batch (--batch-size) whose images cannot fit
in the memory available (check_memory's estimate; --outdir holds one batch at a time, so it takes any --n).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import config
import diffusion
from atomic import atomic_write
from config import UserError
from grids import png_bytes, save_grid, to_uint8
from utills import (
    PRECISIONS,
    LoadedModel,
    autocast,
    export_safetensors,
    load_model,
    os_errors_as_write_error,
    pick_device,
    remove_stale_temporaries,
    set_threads,
    weights_digest,
)

console = Console(stderr=True)

IMAGE_RE = re.compile(r"^(\d{6,})\.png$")
SETTINGS_FILE = "sample.json"  # what made the images of an --outdir (checked before adding to it)


@dataclass
class SampleConfig:
    ckpt: str = ""  # run folder (newest valid checkpoint), checkpoint .pt, or .safetensors written by --export
    n: int = 64  # images to make (grid or --outdir)
    batch_size: int = 256  # images per sampling batch
    sampler: str = "ddim"  # ddim | ddpm | dpm++2m (diffusion.SAMPLERS; dpm++2m: DPM-Solver++(2M), 10-20 steps)
    steps: int = 50  # sampling steps (respaced when fewer than the training timesteps)
    spacing: str = "auto"  # which timesteps: auto (uniform for ddim/ddpm, linspace for dpm++2m) | uniform |
    # quadratic | linspace | leading | trailing (the last three as diffusers; see diffusion.make_timesteps)
    clip: str = "auto"  # clamp each predicted x0 to [-1, 1]: auto (on for ddim/ddpm, off for dpm++2m) | on | off
    eta: float = 0.0  # DDIM noise: 0 deterministic, 1 DDPM-like
    variance: str = "fixed_small"  # DDPM posterior variance: fixed_small (beta~) or fixed_large (beta)
    seed: int = 0  # image i starts from noise seeded by (seed, i)
    out: str = ""  # one PNG grid of the n images (default grid.png when nothing else is asked for)
    outdir: str = ""  # one PNG per image, 000000.png ...; images already there are kept and counted
    ema: bool = True  # sample with the EMA weights (--no-ema: the trained weights)
    device: str = "auto"  # auto | cuda | cuda:N | cpu
    threads: int = 0  # intra-op CPU threads (0 = PyTorch's default, one per core)
    precision: str = "fp32"  # fp32 | fp16 | bf16: autocast for the UNet (the diffusion maths stays fp32/float64)
    attrs: str = ""  # conditional models: "Smiling=1,Eyeglasses=0"; attributes left out are free
    guidance: float = 1.0  # classifier-free guidance scale (1 = plain conditional)
    sweep: str = ""  # a sweep grid to --out: "Eyeglasses,Smiling" (rows =0 / free / =1) or "guidance=1,3,5"
    trajectory: str = ""  # PNG strip: a few samples from noise to face (predicted x0 at several steps)
    trajectory_rows: int = 4  # samples in the --trajectory strip
    export: str = ""  # write the weights (EMA unless --no-ema) and configs to this .safetensors file
    like: str = ""  # --cond-embed models: reference face file(s), FILE[,FILE...] or --like repeated: one row each
    like_key: str = ""  # reference face(s) of the shards (--data): a sample key or SPLIT:I (valid:0), comma-separated
    data: str = ""  # shards folder for --like-key (default: the one the model was trained on)
    encoder: str = ""  # the reference encoder's weights, when no longer where the checkpoint says (checked by sha256)

    CHOICES: ClassVar[dict] = {"sampler": diffusion.SAMPLERS, "precision": tuple(PRECISIONS),
                               "variance": ("fixed_small", "fixed_large"), "spacing": ("auto",) + diffusion.SPACINGS,
                               "clip": ("auto", "on", "off")}
    BOUNDS: ClassVar[dict] = {"n": ">= 1", "batch_size": ">= 1", "steps": ">= 1", "trajectory_rows": ">= 1",
                              "seed": ">= 0", "eta": "0..1", "threads": ">= 0", "guidance": ">= 0"}


class SampleError(UserError, ValueError):
    """Bad input for sampling (unknown attribute, unusable file, mismatched folder): a one-line message."""


# ------------------------------------------------------------------------------------------------ command line

def check_config(cfg: SampleConfig) -> None:
    """Reject values that cannot work, with one line each (--device: pick_device, before the model is loaded)."""
    if not cfg.ckpt:
        raise SampleError("--ckpt is required (a run folder, a checkpoint .pt or an exported .safetensors)")
    config.check(cfg)
    if not Path(cfg.ckpt).exists():
        raise SampleError(f"{cfg.ckpt}: no such checkpoint file or run folder")
    attr_values(cfg.attrs)  # the spec's own mistakes, before the model is loaded (its names are checked after)
    if cfg.sampler == "dpm++2m" and cfg.eta != 0:
        raise SampleError(f"--eta {cfg.eta}: dpm++2m is deterministic (eta is DDIM's noise); drop --eta or use "
                          f"--sampler ddim")


def spacing_of(cfg: SampleConfig) -> str:
    """The timestep spacing these settings sample with (--spacing auto: the sampler's default)."""
    return diffusion.DEFAULT_SPACING[cfg.sampler] if cfg.spacing == "auto" else cfg.spacing


def clip_of(cfg: SampleConfig) -> bool:
    """Whether these settings clamp the predicted x0 (--clip auto: the sampler's default)."""
    return diffusion.DEFAULT_CLIP[cfg.sampler] if cfg.clip == "auto" else cfg.clip == "on"


def check_model_settings(cfg: SampleConfig, loaded: LoadedModel) -> None:
    """Reject what the loaded model cannot take (more steps than its timesteps, attributes, a --sweep) and pictures
    that cannot fit in memory, before any sampling."""
    timesteps = loaded.diffusion.num_timesteps
    if cfg.steps > timesteps:
        raise SampleError(f"--steps {cfg.steps}: the model has {timesteps} timesteps; choose 1..{timesteps}")
    try:
        diffusion.make_timesteps(timesteps, cfg.steps, spacing_of(cfg))
    except config.ConfigError as e:
        raise SampleError(f"--spacing {spacing_of(cfg)} --steps {cfg.steps}: {str(e).removeprefix('diffusion: ')}"
                          ) from None
    parse_attrs(cfg.attrs, loaded)
    rows = len(sweep_rows(cfg, loaded)) if cfg.sweep else 0
    references = len(split_list(cfg.like)) + len(split_list(cfg.like_key))
    if references:  # a grid row per reference (per sweep row and reference with --sweep)
        rows = max(rows, 1) * references
    device = next(loaded.model.parameters()).device
    gpu_free = None
    if device.type == "cuda":  # what the driver has free, plus what PyTorch's cache holds unused
        gpu_free = (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                    - torch.cuda.memory_allocated(device))
    check_memory(cfg, loaded.image_size, loaded.channels, sweep_rows=rows, gpu_free=gpu_free)


def check_memory(cfg: SampleConfig, image_size: int, channels: int, sweep_rows: int = 0,
                 available: int | None = None, gpu_free: int | None = None) -> None:
    """Refuse, before anything is allocated, pictures that cannot fit in memory: one line naming the flag to change.

    Estimates in float32 images of channels x image_size^2 (4 bytes a value; uint8 pictures 1 byte):
    - a batch: the sampler's own tensors, ~8 batches (x_t, its noise, the model's output, the predictions; twice
      that with guidance), not counting the network's activations; on the GPU (gpu_free) when sampling there;
    - a grid (--out, or a --sweep of sweep_rows rows of --n) or a --trajectory strip (rows x 9): all its images at
      once, 4 times in float32 at the peak (the images, to_uint8's two temporaries, the allocator's slack) and twice
      in uint8 (the pictures and the grid), plus the batch when it is sampled in RAM. --outdir writes image by
      image: a batch only.
    available: bytes of RAM free for us (default psutil's available memory); gpu_free: bytes free on the GPU, or
    None when sampling on the CPU.
    """
    if available is None:
        import psutil

        available = psutil.virtual_memory().available

    def size(nbytes: float) -> str:
        for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
            if nbytes >= scale or unit == "MB":
                return f"{nbytes / scale:,.0f} {unit}" if nbytes >= 10 * scale else f"{nbytes / scale:.1f} {unit}"

    values = channels * image_size * image_size
    grid_bytes = values * (4 * 4 + 2 * 1)  # per image of a grid held whole
    batch_bytes = values * 4 * 8 * (2 if cfg.guidance != 1 else 1)  # per image of a batch being sampled
    batch = min(cfg.batch_size, cfg.n)
    px = f"{image_size}x{image_size}"
    checks = [("--batch-size", cfg.batch_size, f"a batch of {batch:,} {px} images", batch * batch_bytes,
               "use a smaller --batch-size", gpu_free is not None)]
    in_ram = 0 if gpu_free is not None else batch * batch_bytes
    if cfg.out and sweep_rows:
        kind = "a --sweep grid" if cfg.sweep else "a grid"
        checks.append(("--n", cfg.n, f"{kind} of {sweep_rows} rows of {cfg.n:,} {px} images",
                       sweep_rows * cfg.n * grid_bytes + in_ram, "use a smaller --n", False))
    elif cfg.out:
        checks.append(("--n", cfg.n, f"a grid of {cfg.n:,} {px} images", cfg.n * grid_bytes + in_ram,
                       "use --outdir or a smaller --n", False))
    if cfg.trajectory:
        rows = min(cfg.trajectory_rows, cfg.batch_size)
        checks.append(("--trajectory-rows", cfg.trajectory_rows, f"a --trajectory strip of {rows:,} x 9 {px} images",
                       rows * 9 * grid_bytes + (0 if gpu_free is not None else rows * batch_bytes),
                       "use a smaller --trajectory-rows", False))
    for flag, value, what, need, advice, on_gpu in checks:
        have, where = (gpu_free, "the GPU") if on_gpu else (available, "this machine")
        if need > have:
            raise SampleError(f"{flag} {value}: {what} needs ~{size(need)}, {where} has {size(have)} available; "
                              f"{advice}")


# ------------------------------------------------------------------------------------------------ conditioning

def parse_attrs(spec: str, loaded: LoadedModel) -> torch.Tensor | None:
    """"Smiling=1,Eyeglasses=0" -> a [cond_dim] float vector; "" -> None (every attribute free / unconditional).

    Unnamed attributes are -1 (free) for a three-state model and 0 for a two-state one (see the module's text).
    """
    if not spec.strip():
        return None
    if not loaded.conditional:
        raise SampleError(f"{loaded.source}: the model has no conditioning (trained without attributes); drop --attrs")
    names = loaded.attributes
    cond_dim = int(loaded.model_config["cond_dim"])
    if len(names) != cond_dim:
        raise SampleError(f"{loaded.source}: the checkpoint names {len(names)} attributes for cond_dim {cond_dim}")
    vec = torch.full((cond_dim,), -1.0 if loaded.free_attributes else 0.0)
    for name, value in attr_values(spec).items():
        if name not in names:
            raise SampleError(f"--attrs: unknown attribute {name!r}; valid names: {', '.join(names)}")
        vec[names.index(name)] = float(value)
    return vec


def conditioning(loaded: LoadedModel, cfg: SampleConfig, ref: torch.Tensor | None = None) -> torch.Tensor | None:
    """The [cond_width] conditioning vector of these settings: the attributes (parse_attrs), then for a model with a
    reference embedding the embedding `ref` [E] and its flag (1; -1 and a null embedding without a reference, see
    unet.py). None when nothing is given (unconditional)."""
    attrs = parse_attrs(cfg.attrs, loaded)
    if not loaded.embed_dim:
        if ref is not None:
            raise SampleError(f"{loaded.source}: the model was not trained with --cond-embed; drop --like")
        return attrs
    if attrs is None and ref is None:
        return None
    if attrs is None and loaded.conditional:
        attrs = torch.full((int(loaded.model_config["cond_dim"]),), -1.0 if loaded.free_attributes else 0.0)
    e = ref.float().reshape(-1) if ref is not None else torch.full((loaded.embed_dim,), -1.0)
    if e.numel() != loaded.embed_dim:
        raise SampleError(f"{loaded.source}: a reference embedding of {e.numel()} values for a model of "
                          f"{loaded.embed_dim}")
    flag = torch.ones(1) if ref is not None else -torch.ones(1)
    return torch.cat([v for v in (attrs, e, flag) if v is not None])


def split_list(spec: str) -> list[str]:
    """"a.jpg, b.png" -> ["a.jpg", "b.png"] (what --like and --like-key take)."""
    return [item.strip() for item in spec.split(",") if item.strip()]


@dataclass
class References:
    """The reference faces of --like / --like-key: shard-style images [R, C, S, S] in [-1, 1], their embeddings
    [R, E], and a short label each."""
    images: torch.Tensor
    embeddings: torch.Tensor
    labels: list[str]


def load_references(loaded: LoadedModel, cfg: SampleConfig, device: torch.device | str = "cpu") -> References | None:
    """Prepare and embed the references of cfg (None without --like/--like-key); one line for what cannot work."""
    files, keys = split_list(cfg.like), split_list(cfg.like_key)
    if not files and not keys:
        return None
    if not loaded.embed_dim or not loaded.embedding:
        raise SampleError(f"{loaded.source}: the model was not trained with --cond-embed (no reference embedding); "
                          f"drop --like/--like-key")
    import embed

    record = loaded.embedding
    data = cfg.data or record.get("data", "")
    images, labels = [], []
    try:
        for f in files:
            images.append(embed.prepare_reference(f, record["shards"]))
            labels.append(Path(f).stem[:14])
        for key in keys:
            if not data or not Path(data).is_dir():
                raise SampleError(f"--like-key {key}: the shards folder {data!r} is not there; give it with --data")
            image, split, _ = embed.shard_image(data, key)
            if image.shape[-1] != loaded.image_size:
                raise SampleError(f"--like-key {key}: {data} holds {image.shape[-1]} px images, the model "
                                  f"{loaded.image_size} px; give the run's shards with --data")
            images.append(image)
            labels.append(key[:14])
        encoder = embed.encoder_for(record, cfg.encoder, data if data and Path(data).is_dir() else None, device)
    except embed.EmbedError as e:
        raise SampleError(str(e)) from None
    batch = torch.stack(images)
    return References(batch, encoder(batch), labels)


def attr_values(spec: str) -> dict[str, str]:
    """"Smiling=1, Eyeglasses=0" -> {"Smiling": "1", "Eyeglasses": "0"}, checked without the model: each item NAME=0
    or NAME=1, each name once (Smiling=1,Smiling=0 asks for both), at least one name in a spec that is not blank."""
    values: dict[str, str] = {}
    for item in spec.split(","):
        if not item.strip():
            continue  # "Smiling=1," : a stray comma
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not name or value not in ("0", "1"):
            raise SampleError(f"--attrs: expected NAME=0 or NAME=1, got {item.strip()!r}")
        if name in values:
            raise SampleError(f"--attrs: {name} is named twice ({name}={values[name]} and {name}={value}); "
                              f"name each attribute once")
        values[name] = value
    if spec.strip() and not values:
        raise SampleError(f"--attrs {spec!r}: names no attribute; leave --attrs out for every attribute free")
    return values


def sweep_rows(cfg: SampleConfig, loaded: LoadedModel) -> list[tuple[str, SampleConfig]]:
    """The rows of a --sweep grid: (label, the settings of that row), checked before any sampling."""
    spec = cfg.sweep.strip()
    if spec.startswith("guidance="):
        try:
            scales = [float(v) for v in spec.partition("=")[2].split(",") if v.strip()]
        except ValueError:
            raise SampleError(f"--sweep: expected guidance=W1,W2,..., got {spec!r}") from None
        if not scales or any(not math.isfinite(w) or w < 0 for w in scales):
            raise SampleError(f"--sweep: guidance scales must be numbers >= 0, got {spec!r}")
        if scales != [1.0] * len(scales):
            parse_attrs(cfg.attrs, loaded)
            if not cfg.attrs.strip() and not (cfg.like.strip() or cfg.like_key.strip()):
                raise SampleError("--sweep guidance=...: name the attributes to guide towards with --attrs (or a "
                                  "reference face with --like)")
        return [(f"w={w:g}", dataclasses.replace(cfg, guidance=w)) for w in scales]
    if not loaded.conditional:
        raise SampleError(f"{loaded.source}: the model has no conditioning; --sweep over attributes needs one")
    base = [item.strip() for item in cfg.attrs.split(",") if item.strip()]
    rows = []
    names = [n.strip() for n in spec.split(",")]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise SampleError(f"--sweep: {name} is named twice; name each attribute once")
        if name not in loaded.attributes:
            raise SampleError(f"--sweep: unknown attribute {name!r}; valid names: {', '.join(loaded.attributes)}")
        others = [item for item in base if item.partition("=")[0].strip() != name]
        values = ["0", "free", "1"] if loaded.free_attributes else ["0", "1"]
        for value in values:
            attrs = ",".join(others + ([] if value == "free" else [f"{name}={value}"]))
            rows.append((f"{name}={value}", dataclasses.replace(cfg, attrs=attrs)))
    for _, row in rows:
        parse_attrs(row.attrs, loaded)
    return rows


def sweep_grid(loaded: LoadedModel, cfg: SampleConfig, path: str | os.PathLike, refs: References | None = None
               ) -> Path:
    """One labelled row of cfg.n images per sweep setting; column j starts from image j's noise in every row.

    With references: the sweep's rows for each reference in turn, each row starting with its reference."""
    rows = sweep_rows(cfg, loaded)
    plan = [(label, row, None) for label, row in rows] if refs is None else \
        [(f"{refs.labels[r]} {label}", row, r) for r in range(len(refs.labels)) for label, row in rows]
    pictures = []
    with progress_bar() as bar:
        task = bar.add_task(f"sweep {cfg.sweep}", total=len(plan) * cfg.n)
        for _, row, r in plan:
            if r is not None:
                pictures.append(refs.images[r:r + 1].clamp(-1, 1))
            for start, count in batches(cfg.n, cfg.batch_size):
                pictures.append(sample_images(loaded, row, start, count, ref=None if r is None else refs.embeddings[r]))
                bar.advance(task, count)
    with os_errors_as_write_error(path):
        return save_grid(torch.cat(pictures), path, nrow=cfg.n + (refs is not None), padding=2,
                         labels=[label for label, _, _ in plan])


def like_grid(loaded: LoadedModel, cfg: SampleConfig, refs: References, path: str | os.PathLike) -> Path:
    """One row per reference: the reference, then cfg.n faces like it (column j from image j's noise in each row)."""
    pictures = []
    with progress_bar() as bar:
        task = bar.add_task(f"like {len(refs.labels)} reference(s)", total=len(refs.labels) * cfg.n)
        for r in range(len(refs.labels)):
            pictures.append(refs.images[r:r + 1].clamp(-1, 1))
            for start, count in batches(cfg.n, cfg.batch_size):
                pictures.append(sample_images(loaded, cfg, start, count, ref=refs.embeddings[r]))
                bar.advance(task, count)
    with os_errors_as_write_error(path):
        return save_grid(torch.cat(pictures), path, nrow=cfg.n + 1, padding=2, labels=refs.labels)


# ------------------------------------------------------------------------------------------------ sampling

def image_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for image `index` of run `seed` (no collisions between nearby pairs)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]) & (2**63 - 1)


def batch_seed(seed: int, start: int) -> int:
    """The seed of the per-step noise of the batch starting at image `start` (apart from every image_seed)."""
    return int(np.random.SeedSequence([seed, start, 1]).generate_state(1, np.uint64)[0]) & (2**63 - 1)


def initial_noise(seed: int, start: int, count: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """x_T for images start..start+count-1 -> [count, C, H, W] float32 on the CPU, one generator per image."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(seed, i)))
                        for i in range(start, start + count)])


def sample_images(loaded: LoadedModel, cfg: SampleConfig, start: int, count: int,
                  return_trajectory: bool = False, ref: torch.Tensor | None = None
                  ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Images start..start+count-1 of the run `cfg.seed` -> [count, C, H, W] float32 in [-1, 1] on the CPU.

    With return_trajectory, also the predicted x0 [count, C, H, W] at about 8 evenly spaced steps. ref: a reference
    embedding [E] for every image, or [count, E], one per image (--cond-embed models).
    """
    device = next(loaded.model.parameters()).device
    s = loaded.image_size
    noise = initial_noise(cfg.seed, start, count, (loaded.channels, s, s))
    step_gen = torch.Generator().manual_seed(batch_seed(cfg.seed, start))
    if ref is not None and ref.ndim == 2:
        cond = torch.stack([conditioning(loaded, cfg, r) for r in ref]).to(device)
    else:
        cond = conditioning(loaded, cfg, ref)
        if cond is not None:
            cond = cond.expand(count, -1).to(device)
    with torch.inference_mode(), autocast(device, cfg.precision):
        out = loaded.diffusion.sample(loaded.model, tuple(noise.shape), sampler=cfg.sampler, steps=cfg.steps,
                                      eta=cfg.eta, generator=step_gen, cond=cond, guidance=cfg.guidance,
                                      noise=noise.to(device), return_trajectory=return_trajectory,
                                      variance=cfg.variance, spacing=spacing_of(cfg), clip_denoised=clip_of(cfg))
    if return_trajectory:
        x, traj = out
        return x.float().cpu(), [t.float().cpu() for t in traj]
    return out.float().cpu()


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=False)


def batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """The fixed batch layout of n images: [(start, count), ...]."""
    return [(start, min(batch_size, n - start)) for start in range(0, n, batch_size)]


def reference_rows(refs: References | None, start: int, count: int) -> torch.Tensor | None:
    """The embeddings of images start..start+count-1 when image i follows reference i mod R ([count, E])."""
    if refs is None:
        return None
    return refs.embeddings[torch.arange(start, start + count) % refs.embeddings.shape[0]]


def sample_n(loaded: LoadedModel, cfg: SampleConfig, n: int | None = None, refs: References | None = None
             ) -> torch.Tensor:
    """Images 0..n-1 -> [n, C, H, W] in [-1, 1] (CPU), batch by batch with a progress bar (image i like reference
    i mod R when refs are given)."""
    n = cfg.n if n is None else n
    out = []
    with progress_bar() as bar:
        task = bar.add_task(f"sampling {cfg.sampler}-{cfg.steps}", total=n)
        for start, count in batches(n, cfg.batch_size):
            out.append(sample_images(loaded, cfg, start, count, ref=reference_rows(refs, start, count)))
            bar.advance(task, count)
    return torch.cat(out)


def grid_columns(n: int) -> int:
    """Columns of a square-ish grid of n images (16 -> 4x4, 64 -> 8x8, 10 -> 4x3)."""
    return max(1, math.ceil(math.sqrt(n)))


def outdir_settings(loaded: LoadedModel, cfg: SampleConfig, refs: References | None = None) -> dict:
    """What decides the pixels of an --outdir; a folder is only added to with the same values."""
    settings = {
        "weights_sha256": weights_digest(loaded.model),
        "step": loaded.step,
        "weights": loaded.weights,
        "image_size": loaded.image_size,
        "sampler": cfg.sampler,
        "steps": cfg.steps,
        "eta": cfg.eta,
        "variance": cfg.variance if cfg.sampler == "ddpm" else None,
        "seed": cfg.seed,
        "attrs": cfg.attrs,
        "guidance": cfg.guidance,
        "precision": cfg.precision,
    }
    # Spacing and clipping only where they differ from what folders made before they were settings had.
    if spacing_of(cfg) != "uniform":
        settings["spacing"] = spacing_of(cfg)
    if not clip_of(cfg):
        settings["clip"] = False
    if cfg.sampler == "ddpm" or (cfg.sampler == "ddim" and cfg.eta > 0):  # per-step noise is drawn per batch
        settings["batch_size"] = cfg.batch_size
    if refs is not None:  # the references themselves: a digest of their embeddings, in order
        import hashlib

        settings["like"] = hashlib.sha256(refs.embeddings.float().numpy().tobytes()).hexdigest()
    return settings


def existing_images(outdir: Path, n: int) -> set[int]:
    """Indices < n of the NNNNNN.png files already in outdir."""
    if not outdir.is_dir():
        return set()
    return {i for p in outdir.iterdir() if (m := IMAGE_RE.match(p.name)) and (i := int(m.group(1))) < n}


def write_outdir(loaded: LoadedModel, cfg: SampleConfig, outdir: str | os.PathLike, n: int | None = None,
                 refs: References | None = None) -> int:
    """Make images 0..n-1 as outdir/NNNNNN.png, keeping those already there; returns how many were made now.

    A batch whose images all exist is skipped; a partly written one is made again and only its missing files are
    written (the same seeds give the same pixels). The folder's sample.json records the settings, and a folder made
    with other settings (weights, sampler, steps, seed, ...) is refused rather than mixed.
    """
    n = cfg.n if n is None else n
    outdir = Path(outdir)
    settings = outdir_settings(loaded, cfg, refs)
    settings_path = outdir / SETTINGS_FILE
    if settings_path.exists():
        try:
            old = json.loads(settings_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if not isinstance(old, dict):
            raise SampleError(f"{settings_path}: not valid JSON; remove it or use another --outdir")
        diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        if diff:
            k = diff[0]
            raise SampleError(f"{outdir}: holds images made with other settings ({k}: {old.get(k)!r} there, "
                              f"{settings.get(k)!r} now); use another --outdir")
    elif existing_images(outdir, n):
        raise SampleError(f"{outdir}: holds images but no {SETTINGS_FILE}; use an empty or new --outdir")
    with os_errors_as_write_error(settings_path):
        atomic_write(settings_path, (json.dumps(settings, indent=2) + "\n").encode())
    for tmp in remove_stale_temporaries(outdir, ".*.tmp-*"):  # what a killed run was writing
        console.print(f"removed {tmp.name}, left by an interrupted run")

    have = existing_images(outdir, n)
    todo = [(s, c) for s, c in batches(n, cfg.batch_size) if not all(i in have for i in range(s, s + c))]
    made = 0
    with progress_bar() as bar:
        task = bar.add_task(f"{outdir.name}: {cfg.sampler}-{cfg.steps}", total=n, completed=n - sum(c for _, c in todo))
        for start, count in todo:
            pictures = to_uint8(sample_images(loaded, cfg, start, count, ref=reference_rows(refs, start, count)))
            for k, picture in enumerate(pictures):
                if start + k not in have:
                    with os_errors_as_write_error(outdir / f"{start + k:06d}.png"):
                        atomic_write(outdir / f"{start + k:06d}.png", png_bytes(picture))
                    made += 1
            bar.advance(task, count)
    return made


def trajectory_strip(loaded: LoadedModel, cfg: SampleConfig, path: str | os.PathLike,
                     refs: References | None = None) -> Path:
    """A [rows x 9] picture: x_T, then the predicted x0 at ~8 evenly spaced steps (the last is the sample)."""
    rows = min(cfg.trajectory_rows, cfg.batch_size)
    s = loaded.image_size
    noise = initial_noise(cfg.seed, 0, rows, (loaded.channels, s, s))
    _, traj = sample_images(loaded, cfg, 0, rows, return_trajectory=True, ref=reference_rows(refs, 0, rows))
    columns = [noise.clamp(-1, 1)] + traj
    strip = torch.stack(columns, dim=1).reshape(rows * len(columns), *noise.shape[1:])  # row-major: one row per image
    with os_errors_as_write_error(path):
        return save_grid(strip, path, nrow=len(columns), padding=2)


# ------------------------------------------------------------------------------------------------ main

def main(cfg: SampleConfig) -> list[Path]:
    """Do what cfg asks; returns the files written."""
    check_config(cfg)
    set_threads(cfg.threads)
    wrote: list[Path] = []
    if not (cfg.out or cfg.outdir or cfg.trajectory or cfg.export):
        cfg.out = "sweep.png" if cfg.sweep else "grid.png"
    console.print(f"[bold]sample[/] {dataclasses.asdict(cfg)}")

    device = pick_device(cfg.device)
    loaded = load_model(cfg.ckpt, use_ema=cfg.ema, device=device)
    console.print(f"loaded {loaded.source} (step {loaded.step}, {loaded.weights} weights, {loaded.image_size} px, "
                  f"{'conditional' if loaded.conditional else 'unconditional'}) on {device}")
    check_model_settings(cfg, loaded)
    if cfg.sweep and not cfg.out:
        raise SampleError("--sweep writes its grid to --out; give one")
    refs = load_references(loaded, cfg, device)
    if refs is not None:
        console.print(f"references: {', '.join(refs.labels)} (encoder {loaded.embedding['encoder']['name']})")

    if cfg.export:
        with os_errors_as_write_error(cfg.export):
            wrote.append(export_safetensors(loaded, cfg.export))
    if cfg.out and cfg.sweep:
        wrote.append(sweep_grid(loaded, cfg, cfg.out, refs))
    elif cfg.out and refs is not None:
        wrote.append(like_grid(loaded, cfg, refs, cfg.out))
    elif cfg.out:
        images = sample_n(loaded, cfg)
        with os_errors_as_write_error(cfg.out):
            wrote.append(save_grid(images, cfg.out, nrow=grid_columns(cfg.n), padding=2))
        del images  # not held through --outdir and --trajectory (check_memory counts each part alone)
    if cfg.outdir:
        made = write_outdir(loaded, cfg, cfg.outdir, refs=refs)
        console.print(f"{cfg.outdir}: made {made} images, {cfg.n - made} were already there")
        wrote.append(Path(cfg.outdir))
    if cfg.trajectory:
        wrote.append(trajectory_strip(loaded, cfg, cfg.trajectory, refs))
    for p in wrote:
        console.print(f"wrote {p}")
    return wrote


def merge_repeated(args: list[str], flags: tuple[str, ...]) -> list[str]:
    """["--like", "a.jpg", "--like=b.png"] -> ["--like", "a.jpg,b.png"]: a repeated list flag keeps every value (the
    parser alone would keep the last)."""
    values: dict[str, list[str]] = {}
    rest, i = [], 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name in flags and (eq or i + 1 < len(args)):
            values.setdefault(name, []).append(value if eq else args[i + 1])
            i += 1 if eq else 2
            continue
        rest.append(args[i])
        i += 1
    for name, vals in values.items():
        rest += [name, ",".join(vals)]
    return rest


PICTURE_FLAGS = ("--progress-gif", "--noising")  # moved to pictures.py; the old command lines are forwarded there


def cli(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if any(a.split("=", 1)[0] in PICTURE_FLAGS for a in args):
        import pictures  # lazily: plain sampling does not need matplotlib or the data loader

        return pictures.cli(args)
    with config.user_errors():
        main(config.parse(SampleConfig, merge_repeated(args, ("--like", "--like-key")))[0])


if __name__ == "__main__":
    cli(sys.argv[1:])

"""Faces out of a run: sample grids and image folders, a noise-to-face strip, export.

    python sample.py --ckpt RUN --n 64 --out grid.png              # DDIM-50 grid from the EMA weights
    python sample.py --ckpt RUN --n 50000 --outdir samples/        # 000000.png, 000001.png ... resumable (for FID)
    python sample.py --ckpt RUN --trajectory traj.png              # noise -> face: predicted x0 at several steps
    python sample.py --ckpt RUN --attrs "Smiling=1,Eyeglasses=1" --guidance 3 --out smiling.png
    python pictures.py --progress-gif RUN                          # progress GIF and loss curve: now in pictures.py
    python sample.py --ckpt RUN --export model.safetensors         # EMA weights + configs in the metadata

`--ckpt` is a run folder (its newest valid checkpoint), a checkpoint file, or a safetensors file written by --export.
The model comes back from the configs stored with the weights (`UNet(**model_config)`,
`GaussianDiffusion(**diffusion_config)`), with the EMA weights unless --no-ema.

Determinism. Image i starts from its own x_T, drawn by a CPU generator seeded from (seed, i); the n images are made in
the fixed batches [k*B, (k+1)*B) and a batch's per-step noise (DDPM, or DDIM with eta > 0) comes from a generator
seeded from (seed, k*B). So the same command gives the same PNG bytes, an --outdir run that was interrupted and
started again gives the images an uninterrupted run gives, and the grid of --n 16 shows the first 16 images of an
--outdir run. With deterministic DDIM (eta = 0, the default) an image depends only on (seed, i), not on --batch-size
or --n (up to float rounding of batched kernels); with stochastic sampling it also depends on the batch layout.

Conditioning. `--attrs "Smiling=1,Eyeglasses=0"` sets those attributes; every attribute left out is set to 0 (absent),
as in CelebA's own 0/1 labels, so name the ones you care about (e.g. "Young=1,No_Beard=1"). A conditional model
sampled without --attrs gives unconditional samples (the null embedding); --guidance w > 1 mixes the conditional and
unconditional predictions as classifier-free guidance does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from diffusion import GaussianDiffusion
from ema import EMA
from images import atomic_write_bytes, save_grid, to_uint8
from train import parse_config  # the project's dataclass -> command line helper (field comments as help)
from unet import UNet
from utills import CheckpointError, load_checkpoint, resolve_checkpoint

console = Console(stderr=True)

SAMPLERS = ("ddim", "ddpm")
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGE_RE = re.compile(r"^(\d{6,})\.png$")
SETTINGS_FILE = "sample.json"  # what made the images of an --outdir (checked before adding to it)


@dataclass
class SampleConfig:
    ckpt: str = ""  # run folder (newest valid checkpoint), checkpoint .pt, or .safetensors written by --export
    n: int = 64  # images to make (grid or --outdir)
    batch_size: int = 256  # images per sampling batch
    sampler: str = "ddim"  # ddim | ddpm
    steps: int = 50  # sampling steps (respaced when fewer than the training timesteps)
    eta: float = 0.0  # DDIM noise: 0 deterministic, 1 DDPM-like
    variance: str = "fixed_small"  # DDPM posterior variance: fixed_small (beta~) or fixed_large (beta)
    seed: int = 0  # image i starts from noise seeded by (seed, i)
    out: str = ""  # one PNG grid of the n images (default grid.png when nothing else is asked for)
    outdir: str = ""  # one PNG per image, 000000.png ...; images already there are kept and counted
    no_ema: bool = False  # use the trained weights instead of their EMA
    device: str = "auto"  # auto | cuda | cpu
    precision: str = "fp32"  # fp32 | fp16 | bf16: autocast for the UNet (the diffusion maths stays fp32/float64)
    attrs: str = ""  # conditional models: "Smiling=1,Eyeglasses=0"; attributes left out are 0
    guidance: float = 1.0  # classifier-free guidance scale (1 = plain conditional)
    trajectory: str = ""  # PNG strip: a few samples from noise to face (predicted x0 at several steps)
    trajectory_rows: int = 4  # samples in the --trajectory strip
    export: str = ""  # write the weights (EMA unless --no-ema) and configs to this .safetensors file


class SampleError(ValueError):
    """Bad input for sampling (unknown attribute, unusable file, mismatched folder): a one-line message."""


# ------------------------------------------------------------------------------------------------ command line

def check_config(cfg: SampleConfig) -> None:
    """Reject values that cannot work, with one line each."""
    if cfg.sampler not in SAMPLERS:
        raise SampleError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {cfg.sampler!r}")
    if cfg.precision not in PRECISIONS:
        raise SampleError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise SampleError(f"--device must be auto, cuda or cpu, got {cfg.device!r}")
    if cfg.n < 1 or cfg.batch_size < 1 or cfg.steps < 1 or cfg.trajectory_rows < 1:
        raise SampleError("--n, --batch-size, --steps and --trajectory-rows must be at least 1")
    if cfg.seed < 0:
        raise SampleError(f"--seed must be >= 0, got {cfg.seed}")
    if not 0.0 <= cfg.eta <= 1.0:
        raise SampleError(f"--eta must be in [0, 1], got {cfg.eta}")
    if cfg.variance not in ("fixed_small", "fixed_large"):
        raise SampleError(f"--variance must be fixed_small or fixed_large, got {cfg.variance!r}")


def pick_device(name: str) -> torch.device:
    """auto -> cuda when present, else cpu; asking for cuda without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SampleError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return torch.device(name)


# ------------------------------------------------------------------------------------------------ loading

@dataclass
class Loaded:
    """A model ready to sample, with where it came from."""
    model: UNet  # in eval() on the sampling device, the chosen weights in place
    diffusion: GaussianDiffusion
    attributes: list[str]  # conditioning attribute names ([] for an unconditional model)
    source: Path  # the checkpoint or safetensors file
    step: int  # training step of the weights (-1 when unknown)
    weights: str  # "ema" or "raw"
    model_config: dict
    diffusion_config: dict

    @property
    def image_size(self) -> int:
        return int(self.model_config["image_size"])

    @property
    def channels(self) -> int:
        return int(self.model_config.get("in_channels", 3))

    @property
    def conditional(self) -> bool:
        return int(self.model_config.get("cond_dim", 0) or 0) > 0


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names and raw bytes): says whether two folders of images share their weights."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_model(ckpt: str | os.PathLike, use_ema: bool = True, device: torch.device | str = "cpu") -> Loaded:
    """Rebuild the UNet and diffusion from a run folder, a checkpoint file or an exported safetensors file."""
    path = Path(ckpt)
    if path.suffix == ".safetensors":
        return _load_safetensors(path, use_ema, device)
    path = resolve_checkpoint(path)
    ckpt_dict = load_checkpoint(path)
    model_config, diffusion_config = dict(ckpt_dict["model_config"]), dict(ckpt_dict["diffusion_config"])
    model = UNet(**model_config)
    try:
        model.load_state_dict(ckpt_dict["model"])
        if use_ema:
            ema = EMA(model)
            ema.load_state_dict(ckpt_dict["ema"])
            ema.copy_to(model)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: weights do not fit model_config ({str(e).splitlines()[0][:200]})") from None
    return Loaded(model.to(device).eval(), GaussianDiffusion(**diffusion_config).to(device),
                  list(ckpt_dict.get("attributes") or []), path, int(ckpt_dict.get("step", -1)),
                  "ema" if use_ema else "raw", model_config, diffusion_config)


def _load_safetensors(path: Path, use_ema: bool, device: torch.device | str) -> Loaded:
    """An --export file: weights plus JSON configs in the header metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as e:  # a header that does not parse or a truncated body
        raise SampleError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:200]})") from None
    missing = [k for k in ("model_config", "diffusion_config") if k not in meta]
    if missing:
        raise SampleError(f"{path}: metadata lacks {', '.join(missing)} (not written by sample.py --export)")
    weights = meta.get("weights", "ema")
    if not use_ema and weights == "ema":
        raise SampleError(f"{path}: holds EMA weights only; --no-ema needs the run's checkpoint")
    model_config, diffusion_config = json.loads(meta["model_config"]), json.loads(meta["diffusion_config"])
    model = UNet(**model_config)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise SampleError(f"{path}: weights do not fit model_config ({str(e).splitlines()[0][:200]})") from None
    return Loaded(model.to(device).eval(), GaussianDiffusion(**diffusion_config).to(device),
                  json.loads(meta.get("attributes", "[]")), path, int(meta.get("step", -1)), weights,
                  model_config, diffusion_config)


def export_safetensors(loaded: Loaded, path: str | os.PathLike) -> Path:
    """Write the loaded weights with the UNet and diffusion configs (JSON strings) in the metadata, atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in loaded.model.state_dict().items()}
    meta = {
        "model_config": json.dumps(loaded.model_config),
        "diffusion_config": json.dumps(loaded.diffusion_config),
        "attributes": json.dumps(loaded.attributes),
        "step": str(loaded.step),
        "weights": loaded.weights,
        "source": str(loaded.source),
        "format": "celeba-ddpm unet v1",
    }
    return atomic_write_bytes(save(tensors, metadata=meta), path)


# ------------------------------------------------------------------------------------------------ conditioning

def parse_attrs(spec: str, loaded: Loaded) -> torch.Tensor | None:
    """"Smiling=1,Eyeglasses=0" -> a [cond_dim] float vector (unnamed attributes 0); "" -> None (unconditional)."""
    if not spec.strip():
        return None
    if not loaded.conditional:
        raise SampleError(f"{loaded.source}: the model has no conditioning (trained without attributes); drop --attrs")
    names = loaded.attributes
    cond_dim = int(loaded.model_config["cond_dim"])
    if len(names) != cond_dim:
        raise SampleError(f"{loaded.source}: the checkpoint names {len(names)} attributes for cond_dim {cond_dim}")
    vec = torch.zeros(cond_dim)
    for item in spec.split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or value not in ("0", "1"):
            raise SampleError(f"--attrs: expected NAME=0 or NAME=1, got {item.strip()!r}")
        if name not in names:
            raise SampleError(f"--attrs: unknown attribute {name!r}; valid names: {', '.join(names)}")
        vec[names.index(name)] = float(value)
    return vec


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


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def sample_images(loaded: Loaded, cfg: SampleConfig, start: int, count: int,
                  return_trajectory: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Images start..start+count-1 of the run `cfg.seed` -> [count, C, H, W] float32 in [-1, 1] on the CPU.

    With return_trajectory, also the predicted x0 [count, C, H, W] at about 8 evenly spaced steps.
    """
    device = next(loaded.model.parameters()).device
    s = loaded.image_size
    noise = initial_noise(cfg.seed, start, count, (loaded.channels, s, s))
    step_gen = torch.Generator().manual_seed(batch_seed(cfg.seed, start))
    cond = parse_attrs(cfg.attrs, loaded)
    if cond is not None:
        cond = cond.expand(count, -1).to(device)
    with torch.inference_mode(), _autocast(device, cfg.precision):
        out = loaded.diffusion.sample(loaded.model, tuple(noise.shape), sampler=cfg.sampler, steps=cfg.steps,
                                      eta=cfg.eta, generator=step_gen, cond=cond, guidance=cfg.guidance,
                                      noise=noise.to(device), return_trajectory=return_trajectory,
                                      variance=cfg.variance)
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


def sample_n(loaded: Loaded, cfg: SampleConfig, n: int | None = None) -> torch.Tensor:
    """Images 0..n-1 -> [n, C, H, W] in [-1, 1] (CPU), batch by batch with a progress bar."""
    n = cfg.n if n is None else n
    out = []
    with progress_bar() as bar:
        task = bar.add_task(f"sampling {cfg.sampler}-{cfg.steps}", total=n)
        for start, count in batches(n, cfg.batch_size):
            out.append(sample_images(loaded, cfg, start, count))
            bar.advance(task, count)
    return torch.cat(out)


def grid_columns(n: int) -> int:
    """Columns of a square-ish grid of n images (16 -> 4x4, 64 -> 8x8, 10 -> 4x3)."""
    return max(1, math.ceil(math.sqrt(n)))


def png_bytes(picture: np.ndarray) -> bytes:
    """[H, W, 3] uint8 -> PNG bytes (PIL's encoder is deterministic: same pixels, same bytes)."""
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    return buf.getvalue()


def outdir_settings(loaded: Loaded, cfg: SampleConfig) -> dict:
    """What decides the pixels of an --outdir; a folder is only added to with the same values."""
    settings = {
        "weights_sha256": weights_fingerprint(loaded.model),
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
    if cfg.sampler == "ddpm" or cfg.eta > 0:  # per-step noise is drawn per batch
        settings["batch_size"] = cfg.batch_size
    return settings


def existing_images(outdir: Path, n: int) -> set[int]:
    """Indices < n of the NNNNNN.png files already in outdir."""
    if not outdir.is_dir():
        return set()
    return {i for p in outdir.iterdir() if (m := IMAGE_RE.match(p.name)) and (i := int(m.group(1))) < n}


def write_outdir(loaded: Loaded, cfg: SampleConfig, outdir: str | os.PathLike, n: int | None = None) -> int:
    """Make images 0..n-1 as outdir/NNNNNN.png, keeping those already there; returns how many were made now.

    A batch whose images all exist is skipped; a partly written one is made again and only its missing files are
    written (the same seeds give the same pixels). The folder's sample.json records the settings, and a folder made
    with other settings (weights, sampler, steps, seed, ...) is refused rather than mixed.
    """
    n = cfg.n if n is None else n
    outdir = Path(outdir)
    settings = outdir_settings(loaded, cfg)
    settings_path = outdir / SETTINGS_FILE
    if settings_path.exists():
        try:
            old = json.loads(settings_path.read_text())
        except json.JSONDecodeError:
            raise SampleError(f"{settings_path}: not valid JSON; remove it or use another --outdir") from None
        diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        if diff:
            k = diff[0]
            raise SampleError(f"{outdir}: holds images made with other settings ({k}: {old.get(k)!r} there, "
                              f"{settings.get(k)!r} now); use another --outdir")
    elif existing_images(outdir, n):
        raise SampleError(f"{outdir}: holds images but no {SETTINGS_FILE}; use an empty or new --outdir")
    atomic_write_bytes((json.dumps(settings, indent=2) + "\n").encode(), settings_path)

    have = existing_images(outdir, n)
    todo = [(s, c) for s, c in batches(n, cfg.batch_size) if not all(i in have for i in range(s, s + c))]
    made = 0
    with progress_bar() as bar:
        task = bar.add_task(f"{outdir.name}: {cfg.sampler}-{cfg.steps}", total=n, completed=n - sum(c for _, c in todo))
        for start, count in todo:
            pictures = to_uint8(sample_images(loaded, cfg, start, count))
            for k, picture in enumerate(pictures):
                if start + k not in have:
                    atomic_write_bytes(png_bytes(picture), outdir / f"{start + k:06d}.png")
                    made += 1
            bar.advance(task, count)
    return made


def trajectory_strip(loaded: Loaded, cfg: SampleConfig, path: str | os.PathLike) -> Path:
    """A [rows x 9] picture: x_T, then the predicted x0 at ~8 evenly spaced steps (the last is the sample)."""
    rows = min(cfg.trajectory_rows, cfg.batch_size)
    s = loaded.image_size
    noise = initial_noise(cfg.seed, 0, rows, (loaded.channels, s, s))
    _, traj = sample_images(loaded, cfg, 0, rows, return_trajectory=True)
    columns = [noise.clamp(-1, 1)] + traj
    strip = torch.stack(columns, dim=1).reshape(rows * len(columns), *noise.shape[1:])  # row-major: one row per image
    return save_grid(strip, path, nrow=len(columns), padding=2)


# ------------------------------------------------------------------------------------------------ main

def main(cfg: SampleConfig) -> list[Path]:
    """Do what cfg asks; returns the files written."""
    check_config(cfg)
    wrote: list[Path] = []
    if not cfg.ckpt:
        raise SampleError("--ckpt is required (a run folder, a checkpoint .pt or an exported .safetensors)")
    if not (cfg.out or cfg.outdir or cfg.trajectory or cfg.export):
        cfg.out = "grid.png"
    console.print(f"[bold]sample[/] {dataclasses.asdict(cfg)}")

    device = pick_device(cfg.device)
    loaded = load_model(cfg.ckpt, use_ema=not cfg.no_ema, device=device)
    console.print(f"loaded {loaded.source} (step {loaded.step}, {loaded.weights} weights, {loaded.image_size} px, "
                  f"{'conditional' if loaded.conditional else 'unconditional'}) on {device}")
    parse_attrs(cfg.attrs, loaded)  # fail before any sampling

    if cfg.export:
        wrote.append(export_safetensors(loaded, cfg.export))
    if cfg.out:
        images = sample_n(loaded, cfg)
        wrote.append(save_grid(images, cfg.out, nrow=grid_columns(cfg.n), padding=2))
    if cfg.outdir:
        made = write_outdir(loaded, cfg, cfg.outdir)
        console.print(f"{cfg.outdir}: made {made} images, {cfg.n - made} were already there")
        wrote.append(Path(cfg.outdir))
    if cfg.trajectory:
        wrote.append(trajectory_strip(loaded, cfg, cfg.trajectory))
    for p in wrote:
        console.print(f"wrote {p}")
    return wrote


PICTURE_FLAGS = ("--progress-gif", "--noising")  # moved to pictures.py; the old command lines are forwarded there


def cli(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if any(a.split("=", 1)[0] in PICTURE_FLAGS for a in args):
        import pictures  # lazily: plain sampling does not need matplotlib or the data loader

        return pictures.cli(args)
    cfg, _ = parse_config(SampleConfig, argv)
    try:
        main(cfg)
    except (SampleError, CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    cli(sys.argv[1:])

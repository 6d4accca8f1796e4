"""Pictures of a run and of the data: the progress GIF and loss curve of a run folder, the forward-process strip.

    python pictures.py --progress-gif RUN                          # RUN/progress.gif and RUN/loss.png
    python pictures.py --noising SHARDS --out noising.png          # a few faces under q(x_t | x_0), t = 0 ... 999

Neither needs a checkpoint: the GIF is made of the fixed-noise grids train.py wrote to RUN/samples, the loss curve
of RUN/metrics.jsonl, the strip of the shards and DDPM's linear schedule. (`sample.py --progress-gif` and
`sample.py --noising` still work: sample.py forwards them here.)
"""
from __future__ import annotations

import io
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from rich.console import Console

import config
from atomic import atomic_write
from config import UserError
from diffusion import GaussianDiffusion
from grids import save_grid
from manifest import MANIFEST
from utills import read_metrics, run_paths

console = Console(stderr=True)

NOISING_STEPS = (0, 50, 100, 200, 300, 400, 600, 999)


@dataclass
class PicturesConfig:
    progress_gif: str = ""  # RUN folder: RUN/samples/*.png -> RUN/progress.gif, RUN/metrics.jsonl -> RUN/loss.png
    noising: str = ""  # SHARDS folder: a strip of a few of its faces under the forward process q(x_t | x_0) -> --out
    out: str = "noising.png"  # the PNG that --noising writes
    seed: int = 0  # --noising: seed of the one fixed eps per face

    BOUNDS: ClassVar[dict[str, str]] = {"seed": ">= 0"}  # checked by config.check


class PicturesError(UserError, ValueError):
    """Nothing to draw, or bad input for a picture: a one-line message."""


# ------------------------------------------------------------------------------------------------ the data

def noising_strip(shards: str | os.PathLike, path: str | os.PathLike, rows: int = 4, seed: int = 0,
                  timesteps: tuple[int, ...] = NOISING_STEPS) -> Path:
    """A [rows x len(timesteps)] picture of x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps for the first faces of the
    shards' train split, with DDPM's linear schedule (T = 1000) and one fixed eps per face."""
    from data import make_loader  # the loader pulls in DALI when present; --progress-gif should not pay for it

    loader = make_loader(shards, rows, backend="torch", device="cpu", shuffle=False, flip=False, num_threads=0)
    x0 = next(iter(loader))["image"]
    diffusion = GaussianDiffusion(timesteps=1000, schedule="linear", objective="eps")
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    columns = [diffusion.q_sample(x0, torch.full((len(x0),), t), eps).clamp(-1, 1) for t in timesteps]
    strip = torch.stack(columns, dim=1).reshape(len(x0) * len(columns), *x0.shape[1:])  # one row per face
    return save_grid(strip, path, nrow=len(columns), padding=2)


# ------------------------------------------------------------------------------------------------ pictures of a run

def _step_of(path: Path) -> int:
    m = re.search(r"(\d+)", path.stem)
    return int(m.group(1)) if m else -1


def progress_gif(run: str | os.PathLike, frame_ms: int = 400, last_ms: int = 2000) -> Path:
    """RUN/samples/*.png (the fixed-noise grids, in step order) -> RUN/progress.gif with a "step N" label per frame."""
    paths = run_paths(run)
    frames_paths = sorted(paths.samples.glob("*.png"), key=lambda p: (_step_of(p), p.name))
    if not frames_paths:
        raise PicturesError(f"{paths.samples}: no sample grids (*.png) to make a GIF from")
    font = ImageFont.load_default()
    frames = []
    for p in frames_paths:
        with Image.open(p) as im:
            grid = im.convert("RGB")
        band = 16
        frame = Image.new("RGB", (grid.width, grid.height + band), (0, 0, 0))
        frame.paste(grid, (0, band))
        step = _step_of(p)
        ImageDraw.Draw(frame).text((3, 2), f"step {step}" if step >= 0 else p.stem, fill=(255, 255, 255), font=font)
        frames.append(frame)
    buf = io.BytesIO()
    durations = [frame_ms] * (len(frames) - 1) + [last_ms]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return atomic_write(paths.progress_gif, buf.getvalue())


def smooth(values: np.ndarray, weight: float | None = None) -> np.ndarray:
    """TensorBoard-style debiased exponential moving average; by default over ~1/10 of the curve (at most ~100)."""
    if weight is None:
        weight = float(np.clip(1 - 10 / max(len(values), 1), 0.0, 0.99))
    out, avg = np.empty_like(values, dtype=np.float64), 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * float(v)
        out[i] = avg / (1 - weight ** (i + 1))
    return out


def loss_plot(run: str | os.PathLike) -> Path:
    """RUN/metrics.jsonl -> RUN/loss.png: raw and smoothed loss on a log scale, the training-time FID (train.py
    --eval-every) on a second axis when the run has one, and the learning rate below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = run_paths(run)
    path = paths.metrics
    if not path.is_file():  # read_metrics reads a missing file as [], which would hide the cause
        raise PicturesError(f"{path}: no such metrics file")
    recs = [r for r in read_metrics(path) if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    if not recs:
        raise PicturesError(f"{path}: no records with a finite loss")
    steps = np.array([r["step"] for r in recs])
    loss = np.array([r["loss"] for r in recs], dtype=np.float64)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=(3, 1))
    ax1.plot(steps, loss, color="tab:blue", alpha=0.3, lw=0.8, label="loss")
    ax1.plot(steps, smooth(loss), color="tab:blue", lw=1.8, label="smoothed")
    if (loss > 0).all():
        ax1.set_yscale("log")
    ax1.set_ylabel("loss")
    fid = [(r["step"], r["fid"]) for r in read_metrics(path) if isinstance(r.get("fid"), (int, float))]
    handles, labels = ax1.get_legend_handles_labels()
    if fid:  # its own axis: FID falls from hundreds while the loss moves by a factor of two
        ax3 = ax1.twinx()
        ax3.plot([s for s, _ in fid], [v for _, v in fid], "o-", color="tab:red", lw=1.5, ms=4, label="FID (EMA)")
        ax3.set_ylabel("FID", color="tab:red")
        handles, labels = handles + ax3.get_legend_handles_labels()[0], labels + ["FID (EMA)"]
    ax1.legend(handles, labels, loc="upper right")
    ax1.grid(alpha=0.3, which="both")
    lr = [(r["step"], r["lr"]) for r in recs if isinstance(r.get("lr"), (int, float))]
    if lr:
        ax2.plot([s for s, _ in lr], [v for _, v in lr], color="tab:orange")
    ax2.set_ylabel("lr")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    ax1.set_title(f"{paths.root.name}: training loss" + (" and FID" if fid else ""))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write(paths.loss_plot, buf.getvalue())


def run_pictures(run: str | os.PathLike) -> list[Path]:
    """--progress-gif: the GIF and the loss curve, whichever the run has the inputs for (at least one)."""
    run = Path(run)
    if not run.is_dir():
        raise PicturesError(f"{run}: no such run folder")
    made, problems = [], []
    for make in (progress_gif, loss_plot):
        try:
            made.append(make(run))
        except PicturesError as e:  # nothing to draw this one from: the other may still be made
            problems.append(str(e))
    if not made:
        raise PicturesError(f"{run}: nothing to draw ({'; '.join(problems)})")
    for p in problems:
        console.print(f"[yellow]warning:[/] {p}")
    return made


# ------------------------------------------------------------------------------------------------ main

def check_config(cfg: PicturesConfig) -> None:
    """Reject values that cannot work, with one line each (config.check for the BOUNDS; main may be called directly)."""
    config.check(cfg)
    if not (cfg.progress_gif or cfg.noising):
        raise PicturesError("nothing asked for: give --progress-gif RUN and/or --noising SHARDS [--out noising.png]")
    if cfg.noising and not (Path(cfg.noising) / MANIFEST).is_file():
        raise PicturesError(f"{Path(cfg.noising) / MANIFEST}: no manifest here (make shards with prepare_shards.py)")


def main(cfg: PicturesConfig) -> list[Path]:
    """Do what cfg asks; returns the files written."""
    check_config(cfg)
    wrote: list[Path] = []
    if cfg.progress_gif:
        wrote += run_pictures(cfg.progress_gif)
    if cfg.noising:
        wrote.append(noising_strip(cfg.noising, cfg.out, seed=cfg.seed))
    for p in wrote:
        console.print(f"wrote {p}")
    return wrote


def cli(argv: list[str] | None = None) -> None:
    with config.user_errors():
        main(config.parse(PicturesConfig, argv)[0])


if __name__ == "__main__":
    cli(sys.argv[1:])

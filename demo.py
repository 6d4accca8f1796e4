"""The whole job on the embedded fake CelebA: make data, shard it, train, get interrupted, resume, sample, show.

    python demo.py --out demo            # what `make demo` runs

Every step is the project's own command line, run as a user would run it, so the demo doubles as a smoke test of
the README. On a machine with CUDA the training run is longer and larger than on a CPU.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rich.console import Console

import config
from config import UserError

console = Console()


@dataclass
class DemoConfig:
    out: str = "demo"  # folder for everything the demo writes (fake data, shards, run, pictures)
    count: int = 3000  # fake CelebA images to draw
    size: int = 0  # shard resolution in pixels; 0 picks 32 on CPU (a tiny UNet trains faster there) and 64 on CUDA
    preset: str = "tiny"  # UNet preset to train
    steps: int = 0  # training steps; 0 picks 800 on CPU and 6000 on CUDA
    batch_size: int = 0  # 0 picks 32 on CPU and 128 on CUDA
    interrupt_at: int = 0  # the first run gets SIGTERM once its metrics.jsonl reaches this step; 0 picks 40% of steps
    device: str = "auto"  # auto | cuda | cpu

    CHOICES: ClassVar[dict[str, tuple]] = {"device": ("auto", "cuda", "cpu")}
    BOUNDS: ClassVar[dict[str, str]] = {"count": ">= 1", "size": ">= 0", "steps": ">= 0", "batch_size": ">= 0",
                                        "interrupt_at": ">= 0"}


class DemoError(UserError):
    """A step of the demo failed (its own message is printed above): a one-line message naming the step."""


def run(cmd: list[str], **kw) -> None:
    console.print(f"[bold cyan]$ {' '.join(cmd)}")
    code = subprocess.run(cmd, **kw).returncode
    if code != 0:
        raise DemoError(f"{Path(cmd[1]).name} exited with status {code} (its messages are above)")


def logged_step(metrics: Path, offset: int) -> int:
    """The highest step in the records appended to metrics.jsonl after byte `offset` (0 when there is none yet)."""
    try:
        with open(metrics, "rb") as f:
            f.seek(offset)
            lines = f.read().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line).get("step", 0) for line in lines if line.strip().endswith(b"}")]  # whole lines only
    return max(steps, default=0)


def main(cfg: DemoConfig) -> None:
    import torch

    from ema import average_name
    from utills import run_paths

    py = sys.executable
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = "cuda" if cuda else "cpu"
    steps = cfg.steps or (6000 if cuda else 800)
    batch = cfg.batch_size or (128 if cuda else 32)
    size = cfg.size or (64 if cuda else 32)
    console.print(f"[bold]demo[/] {dataclasses.asdict(cfg)} -> device={device} steps={steps} batch={batch}")

    # Draw a fake CelebA in the official layout (skipped when it is already there).
    src = out / "fake_celeba"
    if not (src / "list_eval_partition.txt").exists():
        run([py, "fake_celeba.py", "--out", str(src), "--count", str(cfg.count), "--seed", "0"])

    # Shard it once; a rerun keeps every complete shard.
    shards = out / f"shards{size}"
    run([py, "prepare_shards.py", "--src", str(src), "--out", str(shards), "--size", str(size), "--split", "all"])

    # Train, and interrupt the first run with SIGTERM as a cluster's preemption would; the same command resumes.
    # A short run: a high learning rate, a fast EMA, and the v objective, which gives recognisable samples sooner
    # than eps at a few hundred steps.
    run_dir = out / "run"
    train = [py, "train.py", "--data", str(shards), "--out", str(run_dir), "--preset", cfg.preset,
             "--batch-size", str(batch), "--steps", str(steps), "--device", device, "--lr", "1e-3",
             "--warmup", "100", "--ema-decay", "0.995", "--objective", "v", "--ckpt-every", str(max(steps // 8, 1)),
             "--sample-every", str(max(steps // 8, 1)), "--sample-steps", "25", "--log-every", "50",
             "--loader", "dali",
             # The training-time FID curve (on the loss plot): few samples and reference images on the CPU, where
             # the FID Inception is slow.
             "--eval-every", str(max(steps // 4, 1)), "--eval-n", "500" if cuda else "64", "--eval-steps", "25",
             "--eval-ref-max", "0" if cuda else "256",
             # Post-hoc EMA: two power-function profiles, 16 snapshots of each; the EMA length is chosen afterwards.
             "--phema", "0.05,0.10", "--phema-every", str(max(steps // 16, 1))]
    # The interruption is timed by the run's own log, not the clock, so a slow or busy machine changes nothing.
    metrics = run_paths(run_dir).metrics
    logged = metrics.stat().st_size if metrics.is_file() else 0  # a rerun of the demo: only new records count
    target = cfg.interrupt_at or max(1, int(0.4 * steps))
    first = subprocess.Popen(train)
    console.print(f"[bold cyan]$ {' '.join(train)}[/]  (interrupted once it logs step {target})")
    while first.poll() is None and logged_step(metrics, logged) < target:
        time.sleep(0.5)
    if first.poll() is None:
        console.print("[bold yellow]demo: sending SIGTERM to the training run (a preemption)")
        first.send_signal(signal.SIGTERM)
    if first.wait() != 0:
        raise DemoError(f"the first training run exited with {first.returncode}")
    console.print("[bold]demo: starting the same command again; it resumes from its newest checkpoint")
    run(train)

    # Pictures: the forward process on a few faces, a sample grid, a trajectory strip, the progress GIF, the loss.
    grid, traj, noising = out / "grid.png", out / "trajectory.png", out / "noising.png"
    run([py, "pictures.py", "--noising", str(shards), "--out", str(noising)])
    run([py, "sample.py", "--ckpt", str(run_dir), "--n", "64", "--steps", "50", "--device", device,
         "--out", str(grid), "--trajectory", str(traj)])
    run([py, "pictures.py", "--progress-gif", str(run_dir)])
    # Post-hoc EMA: reconstruct two other EMA lengths from the snapshots; a grid from one, with the same noise.
    run([py, "ema.py", "--run", str(run_dir), "--sigma-rel", "0.08,0.15"])
    grid_phema = out / "grid-phema.png"
    run([py, "sample.py", "--ckpt", str(run_paths(run_dir).phema / average_name(0.15, steps)), "--n", "64",
         "--steps", "50", "--device", device, "--out", str(grid_phema)])

    paths = run_paths(run_dir)
    console.print("\n[bold green]demo done.[/] Pictures:")
    for p in [noising, grid, traj, grid_phema, paths.progress_gif, paths.loss_plot, paths.samples]:
        console.print(f"  {p}")
    console.print(f"  checkpoints: {paths.checkpoints}   metrics: {paths.metrics}")
    # Last: the web page over this run (app.py; gradio comes with requirements.lock).
    python = os.path.relpath(py) if Path(py).is_relative_to(Path.cwd()) else py
    console.print("\n[bold]Faces in a web page[/] (open http://127.0.0.1:7860 once it serves):")
    console.print(f"  {shlex.join([python, 'app.py', '--ckpt', str(run_dir)])}", markup=False, highlight=False)


def cli(argv: list[str] | None = None) -> None:
    with config.user_errors():
        main(config.parse(DemoConfig, argv, config_file=False)[0])


if __name__ == "__main__":
    cli(sys.argv[1:])

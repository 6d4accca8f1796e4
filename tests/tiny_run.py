"""Runs for the sample/evaluate tests: one short real `tiny` training run per session, and a hand-made conditional one.

Both are made once per test session under pytest's base temp folder and shared by tests/test_sample.py and
tests/test_evaluate.py (whichever asks first builds them); treat them as read-only.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TRAIN_STEPS = 4  # checkpoints at 2 and 4, sample grids at 2 and 4


def one_thread_env() -> dict[str, str]:
    """The environment for subprocesses of these tests: one intra-op thread (the CPU is shared with other tests)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def tiny_run(tmp_path_factory: pytest.TempPathFactory, shards: Path) -> Path:
    """A real `python train.py --preset tiny` run of a few steps on the 32 px shards (CPU)."""
    run = tmp_path_factory.getbasetemp() / "sample-tests" / "tiny-run"
    if (run / "DONE").exists():
        return run
    cmd = [sys.executable, str(REPO / "train.py"), "--data", str(shards), "--out", str(run), "--preset", "tiny",
           "--steps", str(TRAIN_STEPS), "--batch-size", "4", "--device", "cpu", "--loader", "torch",
           "--warmup", "1", "--lr", "1e-3", "--ema-decay", "0.9", "--ckpt-every", "2", "--keep", "2",
           "--sample-every", "2", "--sample-steps", "2", "--log-every", "1", "--seed", "0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=one_thread_env())
    assert proc.returncode == 0, f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (run / "DONE").write_text("ok\n")
    return run


def conditional_run(tmp_path_factory: pytest.TempPathFactory, free: bool = False) -> Path:
    """A run folder holding one checkpoint of an untrained conditional `tiny` UNet, made by utills.make_checkpoint
    (the one function that builds checkpoints) without an optimizer: enough to sample, not to resume.

    free=False: a two-state model (0/1 attributes and a null row), as every conditional model was before attributes
    could be left free; free=True: a three-state model (cond_free), as train.py --cond builds now."""
    from diffusion import GaussianDiffusion
    from ema import EMA
    from fake_celeba import ATTRIBUTES
    from unet import build_unet
    from utills import TrainState, make_checkpoint, run_paths, save_checkpoint

    run = tmp_path_factory.getbasetemp() / "sample-tests" / ("cond-free-run" if free else "cond-run")
    if (run / "DONE").exists():
        return run
    torch.manual_seed(0)
    model = build_unet("tiny", image_size=16, cond_dim=len(ATTRIBUTES), cond_free=free)
    with torch.no_grad():  # the zero-initialised output layers would make an untrained model ignore its input
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.05)
    diffusion = GaussianDiffusion(timesteps=100)
    ema = EMA(model, decay=0.9)
    ema.update()
    config = {"preset": "tiny", "cond": True}
    ckpt = make_checkpoint(TrainState(model, ema, step=1), config=config, diffusion_config=diffusion.config,
                           image_size=16, attributes=list(ATTRIBUTES))
    save_checkpoint(run, ckpt, step=1, keep=1)
    run_paths(run).config.write_text(json.dumps(config) + "\n")
    (run / "DONE").write_text("ok\n")
    return run

"""train.py: exact resume after kill -9 at three moments, SIGTERM/SIGINT, checkpoint fallback, the NaN guard,
architecture clashes, torchrun on gloo, and that the model learns. CPU, a 16-channel `tiny` UNet at 32 px."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import config
import train
from config import ConfigError
from diffusion import GaussianDiffusion
from ema import EMA
from train import TrainConfig, lr_factor, merge_resumed_config
from unet import UNet
from utills import FORMAT_VERSION, NAN_ENV, PAUSE_ENV, CheckpointWarning, list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TRAIN = [sys.executable, str(ROOT / "train.py")]
# Small and quick: 16 base channels, 16 images a step (10 steps an epoch on the 163 training images), a log record
# every step so tests can watch the progress.
FAST = ["--preset", "tiny", "--base-channels", "16", "--batch-size", "16", "--device", "cpu", "--seed", "0",
        "--lr", "1e-3", "--warmup", "2", "--sample-every", "0", "--num-workers", "1", "--log-every", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop(PAUSE_ENV, None)
ENV.pop(NAN_ENV, None)
TIMEOUT = 240


def train_cmd(shards: Path, out: Path, loader: str = "dali", steps: int = 12, ckpt_every: int = 4,
              *extra: str) -> list[str]:
    """The command line the resume tests run (12 steps cross an epoch at step 10)."""
    return [*TRAIN, "--data", str(shards), "--out", str(out), *FAST, "--loader", loader, "--steps", str(steps),
            "--ckpt-every", str(ckpt_every), *extra]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def train_here(cmd: list[str]) -> Path | None:
    """Run a train_cmd() command line in this process (saves the start-up of a new one)."""
    cfg, given = config.parse(TrainConfig, cmd[2:])
    return train.main(cfg, given)


def run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=TIMEOUT)
    return proc


def check_ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def last_step(out: Path) -> int:
    """The step of the newest metrics.jsonl record (0 before the first)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
    return json.loads(lines[-1])["step"] if lines else 0


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended (rc={proc.returncode}) before {what}\n{out[-2000:]}\n{err[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def assert_same_weights(a: Path, b: Path) -> None:
    """Bit-identical "model" and "ema" tensors in two checkpoint files."""
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["model"].keys() == cb["model"].keys()
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key
    assert ca["ema"]["num_updates"] == cb["ema"]["num_updates"]
    for i, (x, y) in enumerate(zip(ca["ema"]["shadow_params"], cb["ema"]["shadow_params"], strict=True)):
        assert torch.equal(x, y), f"ema tensor {i}"


@pytest.fixture(scope="module")
def reference(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 12-step DALI run with checkpoints at 4, 8, 12 (it crosses an epoch at step 10)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train_here(train_cmd(shards, out))
    return out


# ------------------------------------------------------------------------------------------------- exact resume

@pytest.mark.parametrize("moment", ["between-checkpoints", "just-after-checkpoint", "during-checkpoint-write"])
def test_kill9_then_resume_is_bit_identical(reference: Path, shards: Path, tmp_path: Path, moment: str, capsys):
    out = tmp_path / "run"
    env = {**ENV, PAUSE_ENV: "1.0"} if moment == "during-checkpoint-write" else ENV
    proc = subprocess.Popen(train_cmd(shards, out), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    ckpts = out / "checkpoints"
    if moment == "between-checkpoints":
        wait_for(lambda: last_step(out) >= 6, proc, "step 6")
        expect_resume = 8 if (ckpts / "step-00000008.pt").exists() else 4
    elif moment == "just-after-checkpoint":
        wait_for(lambda: (ckpts / "step-00000008.pt").exists(), proc, "step-00000008.pt")
        expect_resume = 8
    else:
        wait_for(lambda: any(ckpts.glob(".step-00000008.pt.tmp-*")), proc, "the temporary file of step 8")
        expect_resume = 4
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    if moment == "during-checkpoint-write":
        assert not (ckpts / "step-00000008.pt").exists() and any(ckpts.glob(".step-00000008.pt.tmp-*"))

    train_here(train_cmd(shards, out))
    assert f"resuming from {ckpts / f'step-{expect_resume:08d}.pt'}" in capsys.readouterr().out
    assert_same_weights(ckpts / "step-00000012.pt", reference / "checkpoints" / "step-00000012.pt")
    assert not list(ckpts.glob(".*tmp*"))
    # The records the killed run wrote after its checkpoint were dropped: every step logged exactly once.
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_truncated_newest_checkpoint_falls_back_with_warning(reference: Path, shards: Path, tmp_path: Path,
                                                              capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    newest = out / "checkpoints" / "step-00000012.pt"
    newest.write_bytes(newest.read_bytes()[:5000])
    with pytest.warns(CheckpointWarning, match="skipping checkpoint .*step-00000012.pt"):
        train_here(train_cmd(shards, out))
    assert f"resuming from {out / 'checkpoints' / 'step-00000008.pt'}" in capsys.readouterr().out
    assert_same_weights(newest, reference / "checkpoints" / "step-00000012.pt")


def test_checkpoint_contents(reference: Path):
    ckpt = load_checkpoint(reference / "checkpoints" / "step-00000012.pt")
    assert set(ckpt) >= {"model", "ema", "optimizer", "scaler", "lr_scheduler", "step", "epoch", "images_seen",
                         "data_state", "rng", "config", "model_config", "diffusion_config", "image_size",
                         "attributes", "versions"}
    assert (ckpt["step"], ckpt["epoch"], ckpt["images_seen"]) == (12, 1, 12 * 16)
    assert ckpt["config"]["base_channels"] == 16 and ckpt["model_config"]["base_channels"] == 16
    assert ckpt["ema"]["num_updates"] == 12 and ckpt["attributes"] == []
    assert ckpt["format_version"] == FORMAT_VERSION
    assert ckpt["rng"]["world_size"] == 1
    assert {"python", "numpy", "torch", "cuda"} <= set(ckpt["rng"]["ranks"][0])
    assert "noise" not in ckpt["rng"]["ranks"][0]  # a step's noise comes from (seed, step): no state to keep
    data_state = ckpt["data_state"]  # one position (epoch 1, 2 steps of 16 into it) for all ranks
    assert data_state["order"] == "global" and (data_state["epoch"], data_state["samples"]) == (1, 32)
    assert [p.name for p in list_checkpoints(reference)] == ["step-00000004.pt", "step-00000008.pt",
                                                             "step-00000012.pt"]
    assert json.loads((reference / "config.json").read_text())["steps"] == 12
    # A sampler can rebuild the model and swap the EMA weights in from the checkpoint alone.
    model = UNet(**ckpt["model_config"])
    ema = EMA(model)
    ema.load_state_dict(ckpt["ema"])
    ema.copy_to(model)
    GaussianDiffusion(**ckpt["diffusion_config"])
    record = json.loads((reference / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "epoch", "images_seen", "loss", "lr", "grad_norm", "loss_scale", "images_per_s", "data_wait",
            "skipped_steps"} <= set(record)
    assert record["skipped_steps"] == 0 and record["loss_scale"] == 1.0


# ----------------------------------------------------------------------------------------------------- signals

@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_sigterm_writes_a_checkpoint_and_exits_zero_then_resumes(shards: Path, tmp_path: Path, capsys, loader: str):
    out = tmp_path / "run"
    # The torch loader with worker processes: Slurm's SIGTERM reaches the workers too, and must not crash the run.
    cmd = train_cmd(shards, out, loader, 1000, 0, *(["--num-workers", "2"] if loader == "torch" else []))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for(lambda: last_step(out) >= 3, proc, "step 3")
    os.killpg(proc.pid, signal.SIGTERM)  # to the whole process group, as Slurm does
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, stderr[-2000:]
    assert "stopped by SIGTERM" in stdout
    (ckpt,) = list_checkpoints(out)
    stopped = load_checkpoint(ckpt)["step"]
    assert ckpt.name == f"step-{stopped:08d}.pt" and stopped == last_step(out) >= 3

    # Continue to a nearer end with a grid; the changed run field is reported.
    train_here(train_cmd(shards, out, loader, stopped + 2, 0, "--sample-every", "100", "--sample-steps", "3",
                         *(["--num-workers", "2"] if loader == "torch" else [])))
    assert f"steps: 1000 -> {stopped + 2}" in capsys.readouterr().out
    assert load_checkpoint(out / "checkpoints" / f"step-{stopped + 2:08d}.pt")["step"] == stopped + 2
    grid = Image.open(out / "samples" / f"step-{stopped + 2:08d}.png")
    assert grid.size == (8 * 34 + 2, 8 * 34 + 2)


def test_second_sigint_exits_at_once_without_leaving_a_partial_file(shards: Path, tmp_path: Path):
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(shards, out, "torch", 1000, 2), cwd=ROOT, env={**ENV, PAUSE_ENV: "60"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpts = out / "checkpoints"
    wait_for(lambda: any(ckpts.glob(".step-00000002.pt.tmp-*")), proc, "the temporary file of step 2")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)  # the pause is 60 s: returning sooner means the second SIGINT cut it short
    assert proc.returncode == 130
    assert list(ckpts.iterdir()) == []


# ------------------------------------------------------------------------------------------------------ guards

def _cfg(shards: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(shards), out=str(out), preset="tiny", base_channels=16, batch_size=16, device="cpu",
                lr=1e-3, warmup=2, sample_every=0, log_every=1, loader="torch", num_workers=0)
    return TrainConfig(**{**base, **kw})


def test_nan_losses_are_skipped_then_stop_the_run(shards: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv(NAN_ENV, "3")  # the loss of step 3 and later is NaN
    with pytest.raises(FloatingPointError, match=r"NaN/inf for 3 consecutive steps \(now at step 5, non-finite "
                                                 r"since step 3\)"):
        train.main(_cfg(shards, out, steps=20, ckpt_every=2, max_nonfinite=3))
    # Checkpoints 2 and 4 were written, 4 after two skipped updates: its weights are step 2's, and finite.
    assert [p.name for p in list_checkpoints(out)] == ["step-00000002.pt", "step-00000004.pt"]
    c2, c4 = (load_checkpoint(p) for p in list_checkpoints(out))
    for key in c2["model"]:
        assert torch.equal(c2["model"][key], c4["model"][key]), key
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 2]
    assert records[2]["loss"] is None


def test_a_few_nan_losses_do_not_stop_the_run(shards: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv(NAN_ENV, "2:2")  # steps 2 and 3
    last = train.main(_cfg(shards, out, steps=5, ckpt_every=0))
    assert last == out / "checkpoints" / "step-00000005.pt"
    load_checkpoint(last)  # verifies finite weights
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["skipped_steps"] == 2 and np.isfinite(record["loss"])


def test_architecture_clash_is_refused(reference: Path, tmp_path: Path, shards: Path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    with pytest.raises(ConfigError, match=r"--base-channels 32 changes the architecture: the checkpoint has "
                                          r"base_channels=16"):
        train.main(_cfg(shards, out, base_channels=32, steps=20, loader="dali"))
    with pytest.raises(ConfigError, match="--schedule 'cosine'"):
        train.main(_cfg(shards, out, schedule="cosine", steps=20, loader="dali"))


def test_changed_batch_size_continues_the_data_order(reference: Path, shards: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    train_here(train_cmd(shards, out, "dali", 14, 4, "--batch-size", "8"))
    log = capsys.readouterr().out
    assert "batch_size: 16 -> 8" in log and "the data order restarts" not in log
    ckpt = load_checkpoint(out / "checkpoints" / "step-00000014.pt")
    assert ckpt["images_seen"] == 12 * 16 + 2 * 8
    assert ckpt["data_state"]["batch_size"] == 8 and ckpt["data_state"]["samples"] == 32 + 2 * 8


def test_resume_never_refuses_a_run_with_checkpoints(reference: Path, shards: Path, tmp_path: Path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    with pytest.raises(ConfigError, match="--resume never"):
        train.main(_cfg(shards, out, steps=20, resume="never"))


# ------------------------------------------------------------------------------------------- pure helpers, CLI

def test_merge_takes_architecture_from_the_checkpoint_and_reports_run_changes():
    saved = {**vars(TrainConfig(preset="tiny", base_channels=16, steps=100, lr=1e-3))}
    cfg, changes = merge_resumed_config(TrainConfig(steps=200, lr=1e-3), saved, given={"steps", "lr"})
    assert (cfg.preset, cfg.base_channels, cfg.steps) == ("tiny", 16, 200)
    assert changes == ["steps: 100 -> 200"]
    # A flag given explicitly at its default value still clashes.
    with pytest.raises(ConfigError, match="--preset 'celeba64'"):
        merge_resumed_config(TrainConfig(steps=100), saved, given={"preset"})


def test_parse_config_flags_booleans_and_help(capsys):
    cfg, given = config.parse(TrainConfig, ["--data", "d", "--batch-size", "8", "--no-ema-warmup", "--compile",
                                            "--lr", "1e-3"])
    assert (cfg.data, cfg.batch_size, cfg.ema_warmup, cfg.compile, cfg.lr) == ("d", 8, False, True, 1e-3)
    assert given == {"data", "batch_size", "ema_warmup", "compile", "lr"}
    with pytest.raises(SystemExit):
        config.parse(TrainConfig, ["--help"])
    help_text = capsys.readouterr().out
    assert "images per step, summed over all ranks" in help_text
    assert "--fault" not in help_text and "test hook" not in help_text  # test hooks are not flags


def test_bad_flags_are_one_line_errors(shards: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="give --steps N or --epochs E"):
        train.main(_cfg(shards, tmp_path, steps=0))
    with pytest.raises(ConfigError, match="--loader 'tf'"):
        train.main(_cfg(shards, tmp_path, steps=1, loader="tf"))
    proc = run([*TRAIN, "--out", str(tmp_path), "--steps", "1"])
    assert proc.returncode == 1 and proc.stderr.strip() == "error: --data is required (a shards folder written " \
                                                           "by prepare_shards.py)"


def test_lr_schedule():
    assert [lr_factor(i, 4, 100, "constant") for i in (0, 1, 3, 4, 50)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert lr_factor(4, 4, 104, "cosine") == 1.0
    assert lr_factor(54, 4, 104, "cosine") == pytest.approx(0.5)
    assert lr_factor(104, 4, 104, "cosine") == pytest.approx(0.0)


def test_sampler_settings_that_cannot_work_are_refused_at_start(shards: Path, tmp_path: Path):
    # dpm++2m samples in diffusers' linspace spacing, which repeats a timestep at as many steps as the model has.
    with pytest.raises(ConfigError, match="--sample-sampler dpm\\+\\+2m --sample-steps 60: spacing 'linspace' "
                                          "repeats timesteps at 50 steps of 50"):
        train.main(_cfg(shards, tmp_path / "a", steps=2, timesteps=50, sample_every=1, sample_sampler="dpm++2m",
                        sample_steps=60))
    with pytest.raises(ConfigError, match="--eval-sampler 'euler': choose from ddim, ddpm, dpm\\+\\+2m"):
        train.main(_cfg(shards, tmp_path / "b", steps=2, eval_sampler="euler"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_tensorboard_scalars_and_grids(shards: Path, tmp_path: Path):
    """Read back with TensorBoard's own event reader: the loss, the sample grid and the config as text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    # The grid from DPM-Solver++ (--sample-sampler; DDIM by default).
    train.main(_cfg(shards, out, steps=2, ckpt_every=0, tensorboard=True, sample_every=2, sample_steps=2,
                    sample_sampler="dpm++2m"))
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert tags["images"] == ["samples"] and events.Images("samples")[0].step == 2
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"preset": "tiny"' in text and '"steps": 2' in text


def test_fid_during_training_with_the_real_network_and_resume(shards: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    """--eval-every on a tiny run with the packaged FID Inception (6 samples, 12 reference images: it runs at a few
    images per second here): FID/KID in metrics.jsonl, TensorBoard and the status line; the best checkpoint kept
    apart from pruning; a resume keeps the history and the best FID."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from utills import read_metrics
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the reference statistics' cache
    out = tmp_path / "run"
    kw = dict(ckpt_every=2, keep=1, eval_every=2, eval_n=6, eval_steps=2, eval_ref_max=12, tensorboard=True)
    train.main(_cfg(shards, out, steps=4, **kw))
    records = read_metrics(out / "metrics.jsonl")
    evals = [r for r in records if "fid" in r]
    assert [r["step"] for r in evals] == [2, 4] and [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["fid"] > 0 and np.isfinite(r["kid"]) and r["eval_n"] == 6 and "loss" in r for r in evals)
    best = min(evals, key=lambda r: r["fid"])
    best_ckpt = load_checkpoint(out / "checkpoints" / "best-fid.pt")
    assert (best_ckpt["step"], best_ckpt["best_fid"]) == (best["step"], best["fid"])
    assert [p.name for p in list_checkpoints(out)] == ["step-00000004.pt"]  # keep=1 prunes step-* only
    assert len(list((tmp_path / "cache" / "celeba-ddpm" / "ref-stats").glob("ref-*.npz"))) == 1
    # Resume to step 6: the history is kept, the cached reference statistics reused, the best FID carried over.
    train.main(_cfg(shards, out, steps=6, **kw))
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if "fid" in r] == [2, 4, 6]
    assert [r["fid"] for r in records if r["step"] in (2, 4)] == [r["fid"] for r in evals]
    last = load_checkpoint(out / "checkpoints" / "step-00000006.pt")
    assert last["best_fid"] == min(r["fid"] for r in records if "fid" in r)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("eval/fid")] == [2, 4, 6]
    assert [e.step for e in events.Scalars("eval/kid")] == [2, 4, 6]

    # --patience 1 to step 12: the run stops at the first evaluation that does not beat the best FID so far (the
    # evaluations of steps 2-6 count too: if step 6's was not better, the start itself says the run has stopped),
    # worked out here from the FIDs it logs, with a final checkpoint; a rerun trains nothing.
    train.main(_cfg(shards, out, steps=12, patience=1, **kw))
    records = read_metrics(out / "metrics.jsonl")
    fids = [(r["step"], r["fid"]) for r in records if "fid" in r]
    best, since, expected, stopped = math.inf, 0, 12, False
    for step, value in fids:
        best, since = (value, 0) if value < best else (best, since + 1)
        if step >= 6 and since >= 1:
            expected, stopped = step, True
            break
    assert records[-1]["step"] == expected and fids[-1][0] == expected
    final = load_checkpoint(out / "checkpoints" / f"step-{expected:08d}.pt")
    assert final["evals_since_best"] == since and final["best_fid"] == best
    if stopped:  # the same command again says so and trains nothing
        train.main(_cfg(shards, out, steps=12, patience=1, **kw))
        assert read_metrics(out / "metrics.jsonl")[-1]["step"] == expected
        assert [p.name for p in list_checkpoints(out)] == [f"step-{expected:08d}.pt"]
        # A larger --patience trains on, and stops in the loop when the count reaches it (or runs to the end).
        patience = since + 1
        train.main(_cfg(shards, out, steps=12, patience=patience, **kw))
        records = read_metrics(out / "metrics.jsonl")
        fids = [(r["step"], r["fid"]) for r in records if "fid" in r]
        stop = 12
        for step, value in fids[len([f for f in fids if f[0] <= expected]):]:
            best, since = (value, 0) if value < best else (best, since + 1)
            if since >= patience:
                stop = step
                break
        assert records[-1]["step"] == stop > expected
        assert load_checkpoint(out / "checkpoints" / f"step-{stop:08d}.pt")["evals_since_best"] == since


# ------------------------------------------------------------------------------------------------- multi-process

def test_torchrun_two_ranks_on_gloo_agree_and_resume(shards: Path, tmp_path: Path):
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [*torchrun, *train_cmd(shards, out, "dali", 4, 2)[1:]]
    log = check_ok(run(cmd))
    assert "weights identical on 2 ranks at step 2" in log and "weights identical on 2 ranks at step 4" in log
    ckpt = load_checkpoint(out / "checkpoints" / "step-00000004.pt")
    assert ckpt["data_state"]["world_size"] == 2 and len(ckpt["rng"]["ranks"]) == 2
    assert ckpt["images_seen"] == 4 * 16 and ckpt["data_state"]["samples"] == 4 * 16
    log = check_ok(run([*torchrun, *train_cmd(shards, out, "dali", 6, 2)[1:]]))
    assert f"resuming from {out / 'checkpoints' / 'step-00000004.pt'}" in log
    assert "weights identical on 2 ranks at step 6" in log
    assert load_checkpoint(out / "checkpoints" / "step-00000006.pt")["step"] == 6


# ------------------------------------------------------------------------------------------------------ learning

def test_loss_falls_and_ema_samples_approach_the_data(shards: Path, tmp_path: Path):
    """150 steps of a 16-channel tiny UNet (v-prediction, which gives smooth samples soonest): no faces yet, but the
    loss halves and the EMA samples have the data's colours, contrast, smoothness and average face, unlike noise."""
    out = tmp_path / "run"
    last = train.main(_cfg(shards, out, epochs=15, ckpt_every=0, lr=2e-3, warmup=20, ema_decay=0.99, objective="v",
                           log_every=10, loader="dali", num_workers=1))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 15 and np.mean(losses[-3:]) < 0.6 * losses[0], losses

    # Data: one epoch of unflipped training images. Samples: 20 DDIM steps from the EMA weights.
    from data import make_loader
    data = torch.cat([b["image"] for b in make_loader(shards, 64, backend="torch", device="cpu", flip=False,
                                                      num_threads=0)])
    ckpt = load_checkpoint(last)
    model = UNet(**ckpt["model_config"]).eval()
    ema = EMA(model)
    ema.load_state_dict(ckpt["ema"])
    ema.copy_to(model)
    noise = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    samples = GaussianDiffusion(**ckpt["diffusion_config"]).sample(model, (64, 3, 32, 32), steps=20, noise=noise)

    def stats(x: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """Per-channel means, pixel std, and mean |difference| between horizontal neighbours (0 for flat areas)."""
        return x.mean((0, 2, 3)), float(x.std()), float((x[..., 1:] - x[..., :-1]).abs().mean())

    def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm()))

    (dm, ds, dd), (sm, ss, sd), (_, ns, nd) = stats(data), stats(samples), stats(noise.clamp(-1, 1))
    assert (sm - dm).abs().max() < 0.15, (sm, dm)
    assert abs(ss - ds) < 0.5 * abs(ns - ds), (ss, ds, ns)
    assert abs(sd - dd) < 0.3 * abs(nd - dd), (sd, dd, nd)
    # The average sample looks like the average face (noise's average does not: ~0).
    assert correlation(samples.mean(0), data.mean(0)) > 0.7
    assert correlation(noise.mean(0), data.mean(0)) < 0.3


# ------------------------------------------------------------------------------------------------------ CUDA only

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
def test_cuda_fp16_grad_scaler_and_resume(shards: Path, tmp_path: Path):
    out = tmp_path / "run"
    cmd = [*TRAIN, "--data", str(shards), "--out", str(out), *FAST, "--device", "cuda", "--loader", "dali",
           "--steps", "20", "--ckpt-every", "10"]
    check_ok(run(cmd))
    ckpt = load_checkpoint(out / "checkpoints" / "step-00000020.pt")
    assert ckpt["config"]["precision"] == "auto" and ckpt["scaler"]["scale"] > 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss_scale"] == 65536.0 and "gpu_mem_gb" in records[0]
    # Resume from step 10 in a copy: the same within floating-point tolerance.
    again = tmp_path / "again"
    shutil.copytree(out, again)
    (again / "checkpoints" / "step-00000020.pt").unlink()
    check_ok(run([*cmd[:cmd.index("--out") + 1], str(again), *cmd[cmd.index("--out") + 2:]]))
    a = load_checkpoint(out / "checkpoints" / "step-00000020.pt")["model"]
    b = load_checkpoint(again / "checkpoints" / "step-00000020.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
@cuda
def test_cuda_channels_last_compile_bf16(shards: Path, tmp_path: Path):
    out = tmp_path / "run"
    check_ok(run([*TRAIN, "--data", str(shards), "--out", str(out), *FAST, "--device", "cuda", "--loader", "dali",
                  "--steps", "6", "--ckpt-every", "0", "--channels-last", "--compile", "--precision", "bf16",
                  "--sample-every", "6", "--sample-steps", "3"]))
    ckpt = load_checkpoint(out / "checkpoints" / "step-00000006.pt")
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    UNet(**ckpt["model_config"]).load_state_dict(ckpt["model"])
    assert (out / "samples" / "step-00000006.png").exists()


# ------------------------------------------------------------------------------------------------ format versions

def test_a_version_0_run_resumes(shards: Path, tmp_path: Path, capsys):
    """tests/fixtures/v0-run was written by the code before checkpoints carried a format version (see its README)."""
    out = tmp_path / "run"
    shutil.copytree(ROOT / "tests" / "fixtures" / "v0-run", out)
    assert "format_version" not in torch.load(out / "checkpoints" / "step-00000002.pt", weights_only=True)
    # The run's own config.json (with the test hooks it still holds, retired since) and flags that override it.
    cfg, given = config.parse(TrainConfig, ["--config", str(out / "config.json"), "--data", str(shards), "--out",
                                            str(out), "--steps", "4", "--sample-every", "4", "--sample-steps", "2"])
    assert cfg.batch_size == 4 and cfg.base_channels == 8 and "batch_size" in given
    last = train.main(cfg, given)
    log = capsys.readouterr().out
    assert f"resuming from {out / 'checkpoints' / 'step-00000002.pt'}" in log and "data order restarts" not in log
    ckpt = load_checkpoint(last)
    assert ckpt["format_version"] == FORMAT_VERSION and ckpt["step"] == 4 and ckpt["images_seen"] == 4 * 4
    assert ckpt["model_config"]["base_channels"] == 8 and ckpt["config"]["preset"] == "tiny"
    assert (out / "samples" / "step-00000004.png").exists()
    saved = json.loads((out / "config.json").read_text())
    assert set(saved) == {f.name for f in dataclasses.fields(TrainConfig)} and "fault_nan_at_step" not in saved

"""sample.py on a short real `tiny` run: deterministic grids, resumable folders, export round trip, errors."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from sample import SampleConfig, SampleError
from tiny_run import REPO, TRAIN_STEPS, conditional_run, one_thread_env, tiny_run
from utills import CheckpointError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, shards: Path) -> Path:
    return tiny_run(tmp_path_factory, shards)


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return conditional_run(tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(run: Path) -> sample.LoadedModel:
    return sample.load_model(run)


def cfg(**kw) -> SampleConfig:
    """Small, fast settings (DDIM 3 steps on the CPU) with overrides."""
    return dataclasses.replace(SampleConfig(n=6, batch_size=4, steps=3, device="cpu"), **kw)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_cli_grid_is_square_and_byte_identical(run: Path, tmp_path: Path):
    # The check of the issue, at the fixture's 32 px: a 4x4 grid with 2 px padding, the same bytes on a rerun.
    cmd = [sys.executable, str(REPO / "sample.py"), "--ckpt", str(run), "--n", "16", "--sampler", "ddim", "--steps",
           "10", "--seed", "0", "--device", "cpu"]
    for name in ("g1.png", "g2.png"):
        proc = subprocess.run(cmd + ["--out", str(tmp_path / name)], cwd=tmp_path, capture_output=True, text=True,
                              env=one_thread_env())
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "g1.png").read_bytes() == (tmp_path / "g2.png").read_bytes()
    grid = pixels(tmp_path / "g1.png")
    assert grid.shape == (4 * 34 + 2, 4 * 34 + 2, 3)
    assert grid[:2].max() == 0 and grid[:, 34:36].max() == 0  # the padding lines
    cells = [grid[2 + 34 * r:34 + 34 * r, 2 + 34 * c:34 + 34 * c] for r in range(4) for c in range(4)]
    assert len({cell.tobytes() for cell in cells}) == 16  # 16 different images


def test_seed_changes_images_and_ema_is_default(loaded: sample.LoadedModel, run: Path):
    a = sample.sample_images(loaded, cfg(seed=0), 0, 2)
    b = sample.sample_images(loaded, cfg(seed=1), 0, 2)
    raw = sample.sample_images(sample.load_model(run, use_ema=False), cfg(seed=0), 0, 2)
    assert a.shape == (2, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a, b)
    assert not torch.equal(a, raw)
    assert loaded.weights == "ema" and loaded.step == TRAIN_STEPS


def test_image_depends_on_seed_and_index_not_batch(loaded: sample.LoadedModel):
    # Deterministic DDIM: image 5 is the same whether made in a batch of 4 (starting at 4) or alone.
    together = sample.sample_images(loaded, cfg(), 4, 2)
    alone = sample.sample_images(loaded, cfg(), 5, 1)
    assert torch.allclose(together[1], alone[0], atol=1e-4)


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddpm", 0.0), ("dpm++2m", 0.0)])
def test_outdir_resume_gives_the_uninterrupted_images(loaded: sample.LoadedModel, tmp_path: Path, sampler: str,
                                                      eta: float):
    c = cfg(sampler=sampler, eta=eta)
    full, part = tmp_path / "full", tmp_path / "part"
    assert sample.write_outdir(loaded, c, full) == 6
    assert sample.write_outdir(loaded, c, part) == 6
    # An interruption: the second batch (images 4, 5) half written, one image of the first batch lost.
    (part / "000005.png").unlink()
    (part / "000001.png").unlink()
    kept = (part / "000004.png").stat().st_mtime_ns
    assert sample.write_outdir(loaded, c, part) == 2  # existing files are kept and counted
    assert (part / "000004.png").stat().st_mtime_ns == kept
    for i in range(6):
        assert (full / f"{i:06d}.png").read_bytes() == (part / f"{i:06d}.png").read_bytes()
    assert sample.write_outdir(loaded, c, part) == 0
    # Growing n adds only the new images.
    assert sample.write_outdir(loaded, c, part, n=8) == 2
    assert sorted(p.name for p in part.glob("*.png"))[-1] == "000007.png"


def test_grid_shows_the_outdir_images(loaded: sample.LoadedModel, tmp_path: Path):
    c = cfg(n=4)
    sample.write_outdir(loaded, c, tmp_path / "dir")
    sample.save_grid(sample.sample_n(loaded, c), tmp_path / "g.png", nrow=sample.grid_columns(4))
    grid = pixels(tmp_path / "g.png")
    assert grid.shape == (2 * 34 + 2, 2 * 34 + 2, 3)
    np.testing.assert_array_equal(grid[2:34, 36:68], pixels(tmp_path / "dir" / "000001.png"))


def test_outdir_refuses_other_settings(loaded: sample.LoadedModel, tmp_path: Path):
    sample.write_outdir(loaded, cfg(n=2), tmp_path)
    with pytest.raises(SampleError, match="steps: 3 there, 4 now"):
        sample.write_outdir(loaded, cfg(n=2, steps=4), tmp_path)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "000000.png").write_bytes(b"x")
    with pytest.raises(SampleError, match="no sample.json"):
        sample.write_outdir(loaded, cfg(n=2), foreign)


def test_dpm_solver_settings_and_folders(loaded: sample.LoadedModel, run: Path, tmp_path: Path):
    """--sampler dpm++2m --steps N --spacing S, as the README gives it: the spacing and the (default off) x0 clipping
    are recorded with an --outdir and a folder made otherwise is refused; DDIM folders keep their old settings."""
    c = cfg(n=2, sampler="dpm++2m", steps=5, spacing="trailing")
    sample.write_outdir(loaded, c, tmp_path / "dpm")
    settings = json.loads((tmp_path / "dpm" / "sample.json").read_text())
    assert settings["sampler"] == "dpm++2m" and settings["spacing"] == "trailing" and settings["clip"] is False
    with pytest.raises(SampleError, match="spacing: 'trailing' there, 'linspace' now"):
        sample.write_outdir(loaded, dataclasses.replace(c, spacing="auto"), tmp_path / "dpm")
    ddim = sample.outdir_settings(loaded, cfg())
    assert "spacing" not in ddim and "clip" not in ddim  # the keys of folders made before these settings existed
    assert sample.outdir_settings(loaded, cfg(clip="off"))["clip"] is False
    # The spacing changes the images; clipping on changes DPM-Solver++'s (off by default).
    a = sample.sample_images(loaded, c, 0, 2)
    assert not torch.equal(a, sample.sample_images(loaded, dataclasses.replace(c, spacing="leading"), 0, 2))
    assert torch.isfinite(a).all()
    out = tmp_path / "g.png"
    sample.cli(["--ckpt", str(run), "--sampler", "dpm++2m", "--steps", "15", "--spacing", "trailing", "--n", "4",
                "--device", "cpu", "--threads", "1", "--out", str(out)])
    assert pixels(out).shape == (2 * 34 + 2, 2 * 34 + 2, 3)


def test_export_safetensors_round_trip(run: Path, loaded: sample.LoadedModel, tmp_path: Path):
    from safetensors import safe_open

    path = tmp_path / "model.safetensors"
    sample.main(cfg(ckpt=str(run), export=str(path)))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["model_config"]) == json.loads(json.dumps(loaded.model_config))
    assert json.loads(meta["diffusion_config"]) == loaded.diffusion_config
    assert meta["weights"] == "ema" and meta["step"] == str(TRAIN_STEPS)
    sample.main(cfg(ckpt=str(run), n=4, out=str(tmp_path / "from_ckpt.png")))
    sample.main(cfg(ckpt=str(path), n=4, out=str(tmp_path / "from_export.png")))
    assert (tmp_path / "from_ckpt.png").read_bytes() == (tmp_path / "from_export.png").read_bytes()
    with pytest.raises(CheckpointError, match="EMA weights only"):
        sample.load_model(path, use_ema=False)


def test_trajectory_strip(run: Path, tmp_path: Path):
    sample.main(cfg(ckpt=str(run), trajectory=str(tmp_path / "t.png"), trajectory_rows=2))
    strip = pixels(tmp_path / "t.png")
    # 2 rows; columns: x_T, then the predicted x0 at each of the 3 steps (at most 8 are kept).
    assert strip.shape == (2 * 34 + 2, 4 * 34 + 2, 3)
    assert not (tmp_path / "grid.png").exists()


def test_attributes_on_a_conditional_model(cond_run: Path, tmp_path: Path):
    loaded = sample.load_model(cond_run)
    vec = sample.parse_attrs("Smiling=1, Eyeglasses=0,Male=1", loaded)
    assert vec.shape == (40,) and vec.sum() == 2 and vec[loaded.attributes.index("Smiling")] == 1
    plain = sample.sample_images(loaded, cfg(), 0, 2)
    smiling = sample.sample_images(loaded, cfg(attrs="Smiling=1", guidance=3.0), 0, 2)
    assert not torch.equal(plain, smiling)
    with pytest.raises(SampleError, match=r"unknown attribute 'Smilng'; valid names: 5_o_Clock_Shadow, .*Young"):
        sample.parse_attrs("Smilng=1", loaded)
    with pytest.raises(SampleError, match="NAME=0 or NAME=1"):
        sample.parse_attrs("Smiling=yes", loaded)


def test_cli_errors_are_one_line(run: Path, tmp_path: Path):
    cases = [
        (["--ckpt", str(run), "--attrs", "Smiling=1"], "has no conditioning"),
        (["--ckpt", str(tmp_path / "nope")], "no such checkpoint file or run folder"),
        (["--ckpt", str(run), "--sampler", "euler"], "--sampler 'euler': choose from ddim, ddpm, dpm++2m"),
        (["--ckpt", str(run), "--sampler", "dpm++2m", "--eta", "0.5"], "dpm++2m is deterministic"),
        (["--ckpt", str(run), "--spacing", "karras"], "--spacing 'karras': choose from auto, uniform, quadratic"),
        # linspace would repeat a timestep at as many steps as the model has (1000).
        (["--ckpt", str(run), "--sampler", "dpm++2m", "--steps", "1000"],
         "--spacing linspace --steps 1000: spacing 'linspace' repeats timesteps at 1000 steps of 1000; choose at most"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            sample.cli(argv + ["--device", "cpu", "--out", str(tmp_path / "g.png")])
        assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value)



def test_config_file_with_a_flag_overriding_it(run: Path, tmp_path: Path):
    """`--config FILE` (YAML) sets the fields it names; a flag on the command line wins over the file."""
    (tmp_path / "s.yaml").write_text(f"ckpt: {run}\nn: 4\nsteps: 3\nseed: 1\ndevice: cpu\nthreads: 1\n")
    sample.cli(["--config", str(tmp_path / "s.yaml"), "--seed", "2", "--out", str(tmp_path / "a.png")])
    sample.cli(["--ckpt", str(run), "--n", "4", "--steps", "3", "--seed", "2", "--device", "cpu",
                "--out", str(tmp_path / "b.png")])
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    (tmp_path / "bad.yaml").write_text("ckpt: x\nsteps: many\n")
    with pytest.raises(SystemExit, match=r"^error: .*bad.yaml: steps: expected an integer, got 'many'"):
        sample.cli(["--config", str(tmp_path / "bad.yaml")])

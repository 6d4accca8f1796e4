"""sample.py refuses, before loading or sampling, what cannot work: a contradictory or malformed --attrs, pictures that
cannot fit in memory (check_memory's arithmetic, then the command line on the hand-made conditional run), and what
config.check refuses for every script (a float that is not finite, an empty --config file)."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import sample
from sample import SampleConfig, SampleError
from tiny_run import conditional_run

GB = 10**9


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return conditional_run(tmp_path_factory)


def cfg(**kw) -> SampleConfig:
    return dataclasses.replace(SampleConfig(ckpt="run", n=64, batch_size=256, out="grid.png"), **kw)


def refusal(c: SampleConfig, image_size: int = 64, **kw) -> str:
    with pytest.raises(SampleError) as e:
        sample.check_memory(c, image_size, 3, **kw)
    return str(e.value)


# ------------------------------------------------------------------------------------------------ --attrs

def test_attr_values_accepts_what_it_did():
    assert sample.attr_values("") == {} and sample.attr_values("  ") == {}
    assert sample.attr_values("Smiling=1, Eyeglasses = 0,") == {"Smiling": "1", "Eyeglasses": "0"}


@pytest.mark.parametrize("spec, message", [
    ("Smiling=1,Smiling=0", "--attrs: Smiling is named twice (Smiling=1 and Smiling=0); name each attribute once"),
    ("Smiling=1,Male=0,Smiling=1", "--attrs: Smiling is named twice (Smiling=1 and Smiling=1)"),
    ("Smiling=1,=0", "--attrs: expected NAME=0 or NAME=1, got '=0'"),
    ("Smiling", "--attrs: expected NAME=0 or NAME=1, got 'Smiling'"),
    ("Smiling=1=0", "--attrs: expected NAME=0 or NAME=1, got 'Smiling=1=0'"),
    ("Smiling=2", "--attrs: expected NAME=0 or NAME=1, got 'Smiling=2'"),
    (" , ,", "--attrs ' , ,': names no attribute"),
])
def test_attr_values_refuses_a_contradictory_or_malformed_spec(spec: str, message: str):
    with pytest.raises(SampleError) as e:
        sample.attr_values(spec)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_attribute_named_twice_is_one_line_before_the_model_is_loaded(cond_run: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded: --attrs should have been refused first")

    monkeypatch.setattr(sample, "load_model", no_loading)
    for attrs in ("Smiling=1,Smiling=0", "Smiling=1,Smiling=1"):
        with pytest.raises(SystemExit) as e:
            sample.cli(["--ckpt", str(cond_run), "--attrs", attrs, "--device", "cpu", "--out", str(tmp_path / "g.png")])
        assert re.fullmatch(r"error: --attrs: Smiling is named twice \(Smiling=1 and Smiling=[01]\); .*", str(e.value))
    assert not (tmp_path / "g.png").exists()


def test_sweep_naming_an_attribute_twice(cond_run: Path):
    loaded = sample.load_model(cond_run)
    with pytest.raises(SampleError, match="--sweep: Smiling is named twice"):
        sample.sweep_rows(cfg(sweep="Smiling,Eyeglasses,Smiling"), loaded)


# ------------------------------------------------------------------------------------------------ memory

def test_usual_commands_fit():
    for c in (cfg(), cfg(n=50_000, out="", outdir="samples"), cfg(trajectory="t.png"), cfg(sweep="Smiling", n=8)):
        sample.check_memory(c, 64, 3, sweep_rows=3, available=4 * GB)  # returns: nothing refused


def test_a_grid_too_big_names_n_with_the_estimate():
    line = refusal(cfg(n=1_000_000_000), available=20 * GB)
    # 1e9 images x 3 x 64 x 64 values x (4 float32 copies + 2 uint8 pictures) = 221 TB
    assert line == ("--n 1000000000: a grid of 1,000,000,000 64x64 images needs ~221 TB, this machine has 20 GB "
                    "available; use --outdir or a smaller --n"), line


def test_outdir_holds_only_a_batch():
    sample.check_memory(cfg(n=1_000_000_000, out="", outdir="samples"), 64, 3, available=1 * GB)
    line = refusal(cfg(n=1_000_000_000, out="", outdir="samples", batch_size=10_000_000), available=20 * GB)
    assert line.startswith("--batch-size 10000000: a batch of 10,000,000 64x64 images needs ~") and \
        line.endswith("this machine has 20 GB available; use a smaller --batch-size"), line


def test_the_batch_is_checked_against_the_gpu_when_sampling_there():
    c = cfg(n=100_000, out="", outdir="samples", batch_size=100_000)
    sample.check_memory(c, 64, 3, available=1000 * GB)  # fits in RAM
    line = refusal(c, available=1000 * GB, gpu_free=10 * GB)
    assert line.startswith("--batch-size 100000: a batch of 100,000 64x64 images needs ~") and \
        "the GPU has 10 GB available" in line, line
    # On the GPU the batch no longer counts against the RAM of a grid.
    sample.check_memory(cfg(n=100_000, batch_size=16), 64, 3, available=23 * GB, gpu_free=10 * GB)
    assert refusal(cfg(n=100_000, batch_size=16), available=22 * GB, gpu_free=10 * GB).startswith("--n 100000: ")


def test_sweep_and_trajectory_scale_with_their_rows():
    line = refusal(cfg(n=10_000_000, sweep="Smiling,Eyeglasses"), sweep_rows=6, available=20 * GB)
    assert line.startswith("--n 10000000: a --sweep grid of 6 rows of 10,000,000 64x64 images needs ~") and \
        line.endswith("use a smaller --n"), line
    sample.check_memory(cfg(n=100_000, sweep="Smiling"), 16, 3, sweep_rows=3, available=20 * GB)
    c = cfg(out="", trajectory="t.png", trajectory_rows=10_000_000, batch_size=10_000_000, n=10_000_000)
    line = refusal(c, available=20 * GB)
    assert line.startswith("--batch-size 10000000: a batch of 10,000,000 64x64 images"), line  # the batch first
    line = refusal(c, available=20 * GB, gpu_free=10**15)
    assert line.startswith("--trajectory-rows 10000000: a --trajectory strip of 10,000,000 x 9 64x64 images"), line


def test_cli_refuses_a_huge_grid_before_sampling(cond_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling started: the grid should have been refused first")

    monkeypatch.setattr(sample, "sample_images", no_sampling)
    out = tmp_path / "g.png"
    with pytest.raises(SystemExit) as e:  # 1e9 images of 3 x 16 x 16: ~14 TB, more than any test machine
        sample.cli(["--ckpt", str(cond_run), "--n", "1000000000", "--device", "cpu", "--out", str(out)])
    line = str(e.value)
    assert re.fullmatch(r"error: --n 1000000000: a grid of 1,000,000,000 16x16 images needs ~14 TB, this machine has "
                        r"[\d.,]+ [MGT]B available; use --outdir or a smaller --n", line), line
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ config.check's rules

@pytest.mark.parametrize("argv, flag", [(["--guidance", "inf"], "--guidance inf"),
                                        (["--guidance", "nan"], "--guidance nan"), (["--eta", "nan"], "--eta nan")])
def test_non_finite_floats_are_one_line(cond_run: Path, tmp_path: Path, argv: list[str], flag: str):
    with pytest.raises(SystemExit) as e:
        sample.cli(["--ckpt", str(cond_run), *argv, "--device", "cpu", "--out", str(tmp_path / "g.png")])
    assert str(e.value).startswith(f"error: {flag}: must be ") and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "g.png").exists()


def test_an_empty_config_file_is_one_line(tmp_path: Path):
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(SystemExit, match=r"^error: .*empty.yaml: the config file is empty"):
        sample.cli(["--config", str(tmp_path / "empty.yaml")])

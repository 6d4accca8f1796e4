"""sample.py refuses, before loading or sampling, what cannot work: a contradictory or malformed --attrs, and what
config.check refuses for every script (a float that is not finite, an empty --config file)."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import sample
from sample import SampleConfig, SampleError
from tiny_run import conditional_run


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return conditional_run(tmp_path_factory)


def cfg(**kw) -> SampleConfig:
    return dataclasses.replace(SampleConfig(ckpt="run", n=64, batch_size=256, out="grid.png"), **kw)


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

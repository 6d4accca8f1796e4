"""config.py: a dataclass becomes command-line flags and --config files, checked in one place, without torch."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

import config
from config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Cfg:
    data: str = ""  # shards folder (required)
    loader: str = "dali"  # data pipeline: dali | torch
    batch_size: int = 128  # images per step, 100% of them
    lr: float = 2e-4  # learning rate
    p_uncond: float = 0.1  # probability of a null label
    offset: int = 0  # anything from -1 up
    cap: int = 3  # at most 5
    margin: float = 0.5  # strictly positive
    ema: bool = True  # keep an EMA of the weights
    tensorboard: bool = False  # also write TensorBoard scalars

    CHOICES: ClassVar[dict[str, tuple]] = {"loader": ("dali", "torch")}
    BOUNDS: ClassVar[dict[str, str]] = {"batch_size": ">= 1", "lr": "> 0", "p_uncond": "0..1", "offset": "-1..",
                                        "cap": "..5", "margin": "> 0, <= 1"}
    REQUIRED: ClassVar[tuple[str, ...]] = ("data",)
    RETIRED: ClassVar[tuple[str, ...]] = ("old_knob",)


def parse(*argv: str) -> tuple[Cfg, set[str]]:
    return config.parse(Cfg, ["--data", "d", *argv])


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_import_does_not_load_torch_or_yaml():
    code = "import config, sys; sys.exit('torch' in sys.modules or 'yaml' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_flags_and_given_names():
    cfg, given = parse("--batch-size", "64", "--lr", "1e-3", "--loader", "torch")
    assert (cfg.batch_size, cfg.lr, cfg.loader, cfg.p_uncond) == (64, 1e-3, "torch", 0.1)
    assert given == {"data", "batch_size", "lr", "loader"}
    assert config.flag("batch_size") == "--batch-size"


def test_booleans_take_yes_and_no_flags():
    assert parse()[0].ema is True and parse()[0].tensorboard is False
    cfg, given = parse("--no-ema", "--tensorboard")
    assert cfg.ema is False and cfg.tensorboard is True and given == {"data", "ema", "tensorboard"}


def test_help_lists_fields_with_comments_defaults_choices_and_bounds(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as e:
        config.parse(Cfg, ["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "images per step, 100% of them; >= 1 [128]" in out  # '%' escaped for argparse
    assert "{dali,torch}" in out and "--no-ema" in out and "--config FILE" in out
    assert "in 0..1" in out and "(required) []" in out
    assert "CHOICES" not in out and "--retired" not in out and "--old-knob" not in out
    assert config.field_comments(Cfg)["lr"] == "learning rate"


def test_description_is_the_module_docstrings_first_line(capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit):
        config.parse(Cfg, ["--help"], config_file=False)
    out = " ".join(capsys.readouterr().out.split())
    assert __doc__.splitlines()[0] in out and "--config FILE" not in out


def test_choices_error():
    with pytest.raises(ConfigError, match=r"^--loader 'x': choose from dali, torch$"):
        parse("--loader", "x")


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--lr", "0"], "--lr 0.0: must be > 0"),
    (["--lr", "nan"], "--lr nan: must be > 0"),
    (["--p-uncond", "1.5"], "--p-uncond 1.5: must be in 0..1"),
    (["--p-uncond", "-0.1"], "--p-uncond -0.1: must be in 0..1"),
    (["--offset", "-2"], "--offset -2: must be >= -1"),
    (["--cap", "6"], "--cap 6: must be <= 5"),
    (["--margin", "0"], "--margin 0.0: must be > 0"),
    (["--margin", "1.5"], "--margin 1.5: must be <= 1"),
])
def test_each_bound_kind(argv: list[str], message: str):
    with pytest.raises(ConfigError) as e:
        parse(*argv)
    assert str(e.value) == message


def test_bounds_accept_their_edges():
    cfg, _ = parse("--batch-size", "1", "--p-uncond", "0", "--offset", "-1", "--cap", "5", "--margin", "1")
    assert (cfg.batch_size, cfg.p_uncond, cfg.offset, cfg.cap, cfg.margin) == (1, 0.0, -1, 5, 1.0)
    cfg, _ = parse("--p-uncond", "1")
    assert cfg.p_uncond == 1.0


def test_required():
    with pytest.raises(ConfigError, match=r"^--data is required \(shards folder\)$"):
        config.parse(Cfg, [])


def test_check_of_a_hand_built_config():
    config.check(Cfg(data="d"))
    with pytest.raises(ConfigError, match=r"^--batch-size -3 \(from run\.yaml\): must be >= 1$"):
        config.check(Cfg(data="d", batch_size=-3), {"batch_size": "run.yaml"})


def test_a_typo_in_the_classvars_is_a_bug():
    @dataclass
    class Bad:
        n: int = 1  # n

        BOUNDS: ClassVar[dict[str, str]] = {"m": ">= 1"}

    with pytest.raises(TypeError, match="'m'"):
        config.check(Bad())


def test_yaml_file_with_a_flag_overriding_it(tmp_path: Path):
    path = write(tmp_path / "run.yaml", "data: shards64\nbatch_size: 32\nlr: 1e-3\nema: false\n")
    cfg, given = config.parse(Cfg, ["--config", path, "--batch-size", "16"])
    assert (cfg.data, cfg.batch_size, cfg.lr, cfg.ema) == ("shards64", 16, 1e-3, False)  # 1e-3 read as a float
    assert given == {"data", "batch_size", "lr", "ema"}


def test_precedence_defaults_then_file_then_flags(tmp_path: Path):
    path = write(tmp_path / "run.yml", "data: d\nlr: 0.5\ncap: 4\n")
    cfg, given = config.parse(Cfg, ["--config", path, "--cap", "2"])
    assert (cfg.batch_size, cfg.lr, cfg.cap) == (128, 0.5, 2)
    assert given == {"data", "lr", "cap"}


def test_json_file_every_field_as_a_run_writes_it(tmp_path: Path):
    from dataclasses import asdict

    saved = asdict(Cfg(data="shards", batch_size=8, tensorboard=True))
    path = write(tmp_path / "config.json", json.dumps({**saved, "old_knob": 3}, indent=2))
    cfg, given = config.parse(Cfg, ["--config", path])
    assert asdict(cfg) == saved and given == set(saved)


def test_dashed_keys_and_ints_for_floats(tmp_path: Path):
    path = write(tmp_path / "run.yaml", "data: d\nbatch-size: 4\np-uncond: 1\n")
    cfg, given = config.parse(Cfg, ["--config", path])
    assert cfg.batch_size == 4 and cfg.p_uncond == 1.0 and isinstance(cfg.p_uncond, float)
    assert given == {"data", "batch_size", "p_uncond"}


def test_bad_value_in_the_file_names_the_file(tmp_path: Path):
    path = write(tmp_path / "run.yaml", "data: d\nlr: -1.0\n")
    with pytest.raises(ConfigError) as e:
        config.parse(Cfg, ["--config", path])
    assert str(e.value) == f"--lr -1.0 (from {path}): must be > 0"
    config.parse(Cfg, ["--config", path, "--lr", "0.1"])  # the flag overrides the file's bad value


@pytest.mark.parametrize("text, match", [
    ("data: d\nbach_size: 3\n", r"unknown key 'bach_size' .*did you mean batch_size"),
    ("batch_size: '3'\n", r"batch_size: expected an integer, got '3' \(str\)"),
    ("batch_size: true\n", r"batch_size: expected an integer, got True \(bool\)"),
    ("batch_size: 3.0\n", r"batch_size: expected an integer, got 3.0 \(float\)"),
    ("ema: 1\n", r"ema: expected true or false, got 1 \(int\)"),
    ("lr: true\n", r"lr: expected a number, got True \(bool\)"),
    ("data: 5\n", r"data: expected a string, got 5 \(int\)"),
    ("data:\n", r"data: expected a string, got null"),
    ("- data\n", r"expected a mapping of field names to values at the top level, got list"),
    ("data: [unclosed\n", r"run\.yaml:\d+:\d+: not valid YAML"),
    ("lr: 1\nlr-x: 2\nbatch-size: 1\nbatch_size: 2\n", r"unknown key 'lr-x'"),
    ("batch-size: 1\nbatch_size: 2\n", r"batch_size given twice"),
])
def test_file_errors_are_one_line_naming_file_and_key(tmp_path: Path, text: str, match: str):
    path = write(tmp_path / "run.yaml", text)
    with pytest.raises(ConfigError, match=match) as e:
        config.parse(Cfg, ["--config", path])
    assert str(e.value).startswith(path) and "\n" not in str(e.value)


def test_missing_and_unparsable_files(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"^--config .*nope\.yaml: no such file$"):
        config.parse(Cfg, ["--config", str(tmp_path / "nope.yaml")])
    path = write(tmp_path / "run.json", '{"data": "d",}')
    with pytest.raises(ConfigError, match=r"run\.json:1:\d+: not valid JSON"):
        config.parse(Cfg, ["--config", path])


def test_retired_keys_are_ignored(tmp_path: Path):
    path = write(tmp_path / "run.yaml", "data: d\nold_knob: 7\nold-knob: 8\n")
    cfg, given = config.parse(Cfg, ["--config", path])
    assert given == {"data"} and not hasattr(cfg, "old_knob")

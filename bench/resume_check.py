"""Train with train.py, stop it with SIGTERM half-way, run the same command again, and check that it resumes where it
stopped and that its loss curve continues the first run's.

    python bench/resume_check.py --data SHARDS --out RUN [--preset small64] [--precision fp16] [--loader dali]
                                 [--device cuda] [--steps 300] [--batch-size 128] [--log-every 10] [--json PATH]

The first run is sent SIGTERM once metrics.jsonl reaches --steps / 2; it must finish its step, write a checkpoint and
exit 0. The second, the same command line, must say it resumes from that checkpoint's step and reach --steps. Checks
(all must hold for "pass"): the stop came before the end, the resume started at the stop's step, the logged steps
have no gap wider than --log-every, images_seen = step x batch in every record, and the mean loss of the first three
records after the resume is within 50% of the last three before it and, when the first run learned, nearer to them
than to the first record (a restart from scratch would jump back up). Also reports images/s and train.py's data_wait
share of each run. Exit status 1 when a check fails.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import config  # noqa: E402
from bench import common  # noqa: E402
from utills import list_checkpoints, read_metrics, run_paths, step_in_name  # noqa: E402


@dataclass
class ResumeConfig:
    data: str = ""  # shards to train on
    out: str = ""  # run folder (must be new or empty: the check starts from scratch)
    preset: str = "small64"  # UNet preset
    precision: str = "fp16"  # train.py --precision
    loader: str = "dali"  # train.py --loader
    device: str = "cuda"  # train.py --device
    steps: int = 300  # steps of the whole run; SIGTERM at about half
    batch_size: int = 128  # images per step
    log_every: int = 10  # steps per metrics record
    lr: float = 2e-4  # learning rate (after a 20-step warm-up, so that the loss falls within the run)
    extra: str = ""  # more train.py flags, space-separated (e.g. "--channels-last --threads 1")
    timeout_s: float = 300.0  # the longest either run may take
    json: str = ""  # also write the JSON report to this path

    REQUIRED: ClassVar[tuple[str, ...]] = ("data", "out")
    BOUNDS: ClassVar[dict[str, str]] = {"steps": ">= 4", "batch_size": ">= 1", "log_every": ">= 1", "lr": "> 0",
                                        "timeout_s": "> 0"}


def train_command(cfg: ResumeConfig) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--data", cfg.data, "--out", cfg.out, "--preset", cfg.preset,
            "--precision", cfg.precision, "--loader", cfg.loader, "--device", cfg.device, "--steps", str(cfg.steps),
            "--batch-size", str(cfg.batch_size), "--log-every", str(cfg.log_every), "--lr", str(cfg.lr),
            "--warmup", "20", "--ckpt-every", "0", "--sample-every", "0", *cfg.extra.split()]


def first_run(cmd: list[str], cfg: ResumeConfig, log: Path) -> tuple[int, int | None, float]:
    """Start train.py, SIGTERM it once the metrics reach half the steps; (exit code, step signalled at, seconds)."""
    metrics = run_paths(cfg.out).metrics
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        signalled = None
        try:
            while proc.poll() is None and time.perf_counter() - t0 < cfg.timeout_s:
                records = read_metrics(metrics)
                if signalled is None and records and records[-1]["step"] >= cfg.steps // 2:
                    signalled = records[-1]["step"]
                    proc.send_signal(signal.SIGTERM)
                time.sleep(0.05)
            return proc.wait(timeout=max(1.0, cfg.timeout_s - (time.perf_counter() - t0))), signalled, \
                time.perf_counter() - t0
        finally:
            if proc.poll() is None:  # over time: stop it for good
                proc.kill()
                proc.wait()


def mean_loss(records: list[dict]) -> float | None:
    values = [r["loss"] for r in records if r.get("loss") is not None]
    return statistics.fmean(values) if values else None


def run_figures(records: list[dict]) -> dict:
    """images/s and data_wait of one run's records, leaving out its first (start-up, compilation, autotuning)."""
    steady = records[1:] or records
    return {"records": len(records),
            "images_per_s": round(statistics.median(r["images_per_s"] for r in steady), 2) if steady else None,
            "data_wait": round(statistics.median(r["data_wait"] for r in steady), 4) if steady else None}


def main(argv: list[str] | None = None) -> dict:
    try:
        cfg, _ = config.parse(ResumeConfig, argv, config_file=False)
    except config.ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    run = run_paths(cfg.out)
    if run.root.exists() and any(run.root.iterdir()):
        raise SystemExit(f"error: --out {cfg.out}: not empty (the check needs a run that starts from scratch)")
    # The logs go beside the run folder: train.py takes only an empty folder or a run of its own as --out.
    logs = run.root.with_name(run.root.name + "-logs")
    logs.mkdir(parents=True, exist_ok=True)
    cmd = train_command(cfg)
    print("$", " ".join(cmd), flush=True)

    # The first run, stopped by SIGTERM half-way.
    rc1, signalled, seconds1 = first_run(cmd, cfg, logs / "first.log")
    checkpoints = list_checkpoints(run.root)
    stop_step = step_in_name(checkpoints[-1]) if checkpoints else None
    first_records = read_metrics(run.metrics)

    # The same command again: it must resume from the stop's checkpoint and finish.
    t0 = time.perf_counter()
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=cfg.timeout_s,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds2 = time.perf_counter() - t0
    (logs / "second.log").write_text(second.stdout + second.stderr)
    records = read_metrics(run.metrics)
    first_log = (logs / "first.log").read_text()

    before = [r for r in records if stop_step is not None and r["step"] <= stop_step]
    after = [r for r in records if stop_step is not None and r["step"] > stop_step]
    steps = [r["step"] for r in records]
    loss_first, loss_before, loss_after = mean_loss(records[:1]), mean_loss(before[-3:]), mean_loss(after[:3])
    learned = loss_first is not None and loss_before is not None and loss_first - loss_before > 0.2 * loss_first
    checks = {
        "first_run_exit_0": rc1 == 0,
        "stopped_by_sigterm": signalled is not None and "stopped by SIGTERM" in first_log,
        "stopped_before_the_end": stop_step is not None and stop_step < cfg.steps,
        "resumed_at_the_stop": stop_step is not None and f"(step {stop_step})" in second.stdout
        and "resuming" in second.stdout,
        "second_run_exit_0": second.returncode == 0,
        "finished": bool(steps) and steps[-1] == cfg.steps,
        "no_gap_in_steps": bool(steps) and all(0 < b - a <= cfg.log_every for a, b in zip([0, *steps], steps)),
        "images_seen_consistent": all(r["images_seen"] == r["step"] * cfg.batch_size for r in records),
        "loss_continues": loss_before is not None and loss_after is not None
        and abs(loss_after - loss_before) <= 0.5 * loss_before
        and (not learned or abs(loss_after - loss_before) < abs(loss_after - loss_first)),
    }
    report = {"bench": "resume_check", "pass": all(checks.values()), "checks": checks, "command": cmd,
              "signalled_at_step": signalled, "stop_step": stop_step, "steps": cfg.steps,
              "loss_first_record": loss_first, "loss_before_stop": loss_before, "loss_after_resume": loss_after,
              "learned_before_stop": learned, "first_run": {"exit": rc1, "seconds": round(seconds1, 2),
                                                            **run_figures(first_records)},
              "second_run": {"exit": second.returncode, "seconds": round(seconds2, 2), **run_figures(after)},
              "curve": [{"step": r["step"], "loss": r["loss"]} for r in records],
              "config": dataclasses.asdict(cfg), "machine": common.machine(),
              "commit": common.commit("train.py", "step.py", "utills.py", "data.py")}
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    print(f"resume check {'PASS' if report['pass'] else 'FAIL'}: SIGTERM at step {signalled}, checkpoint at step "
          f"{stop_step}, loss {loss_first} at the first record, {loss_before} before the stop, {loss_after} after")
    if not report["pass"]:
        print("first run's log (end):\n" + first_log[-2000:] + "\nsecond run's log (end):\n"
              + (second.stdout + second.stderr)[-2000:])
    return common.finish_check(cfg.json, report)


if __name__ == "__main__":
    main()

"""What every benchmark under bench/ shares: the fake CelebA it times on when given no data, and what it records
beside its numbers: the machine it ran on and the commit measured."""
from __future__ import annotations

import os
import platform
import shlex
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Real CelebA: 202,599 aligned 178x218 JPEGs in about 1.4 GB, ~6.9 KB a file. fake_celeba's drawings compress better
# than photographs (5.2 KB at its default quality 90); at quality 95 their mean comes to CelebA's, ~6.9 KB, so the
# benches draw their fake CelebA at this quality. (Decoding them costs only ~5% more than at quality 90: at this size
# the IDCT and colour conversion, not the compressed bytes, take most of PIL's decode time.)
CELEBA_MEAN_JPEG_BYTES = 1.4e9 / 202_599
FAKE_QUALITY = 95


def fake_celeba(out: Path, count: int) -> Path:
    """A fake CelebA of `count` images whose raw JPEGs have real CelebA's mean size (see FAKE_QUALITY)."""
    from fake_celeba import make_fake_celeba  # the bench scripts put the repository on sys.path

    return make_fake_celeba(out, count, seed=0, quality=FAKE_QUALITY, progress=True)


def mean_file_bytes(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / max(1, len(paths))


def machine(**extra) -> dict:
    """CPU model, cores, system, Python, and the 1-minute load at start (these machines are shared: a high load
    means noisy numbers), plus whatever the caller adds (library versions, GPU)."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.platform(), "python": platform.python_version(),
            **extra, "load_1min_at_start": load}


def commit(*measured: str) -> str:
    """HEAD's short hash, with "-dirty" when the files measured have uncommitted changes."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *measured], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------------------ shared by the GPU benchmarks
# (bench/train_step.py, bench/sampling.py; torch is imported inside the functions so that the other benches, which
# do not need it, start as fast as before)

# Dense (no sparsity) fp16/bf16 tensor-core peaks in TFLOP/s from the vendors' datasheets, the denominator of MFU.
# Matched on torch.cuda.get_device_name(): the first entry whose words all appear in the name wins, so the PCIe and
# NVL variants come before the plain names (an H100 NVL or H200 NVL has lower clocks: unknown here, so MFU is null).
# The RTX 4090's 165 is its fp16 rate with fp16 accumulation; autocast accumulates in fp32, at half that rate.
GPU_PEAK_TFLOPS: list[tuple[tuple[str, ...], float | None]] = [
    (("H100", "PCIe"), 756.0),
    (("H100", "NVL"), None),
    (("H200", "NVL"), None),
    (("H100",), 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (("H200",), 989.0),  # SXM: the H100's compute with more memory
    (("A100",), 312.0),
    (("L40S",), 362.0),
    (("RTX 4090",), 165.0),
]


def gpu_peak_tflops(name: str | None) -> float | None:
    """The datasheet's dense fp16/bf16 peak of the GPU called `name`, or None for one not in GPU_PEAK_TFLOPS."""
    for words, peak in GPU_PEAK_TFLOPS:
        if name and all(w.lower() in name.lower() for w in words):
            return peak
    return None


def parse_config(cls: type, argv: list[str] | None, cpu_defaults: dict, check=None):
    """A bench's flags (config.parse, no --config file); with --cpu, `cpu_defaults` for every flag not given; then
    `check(cfg)`. A bad value is one line and exit 1."""
    import dataclasses

    import config

    try:
        cfg, given = config.parse(cls, argv, config_file=False)
        if cfg.cpu:
            cfg = dataclasses.replace(cfg, **{k: v for k, v in cpu_defaults.items() if k not in given})
        if check is not None:
            check(cfg)
    except config.ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    return cfg


def free(device) -> None:
    """Give the memory of the last benchmark row back, so that each row's peak is its own."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def is_oom(e: BaseException) -> bool:
    """Whether `e` is CUDA running out of memory (the benches then try a smaller batch)."""
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)


def sync(device) -> None:
    """Wait for the device's queued work, so that a wall-clock reading covers it (a no-op on the CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_machine(device) -> dict:
    """machine() plus the accelerator: torch, CUDA and DALI versions, the GPU's name, memory and datasheet peak."""
    import torch

    try:
        import nvidia.dali
        dali = nvidia.dali.__version__
    except ImportError:
        dali = None
    extra = {"torch": torch.__version__, "cuda": torch.version.cuda, "dali": dali, "device": str(device), "gpu": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        extra.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                     compute_capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                     peak_tflops=gpu_peak_tflops(props.name), cudnn=torch.backends.cudnn.version())
    return machine(**extra)


def matmul_tflops(device, n: int = 8192, repeats: int = 10) -> dict:
    """The rate of one large matrix product, measured here: the practical ceiling that MFU is read against.

    CUDA: n x n x n in bf16, the mean of `repeats` products after 3 warm-ups, timed with CUDA events. CPU: fp32 at
    n/8 (a bf16 product on the CPU measures its emulation, not the machine), so only as a sanity figure.
    """
    import time

    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n if device.type == "cuda" else max(64, n // 8)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(repeats):
            a @ b
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000 / repeats
    else:
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        seconds = (time.perf_counter() - t0) / repeats
    return {"tflops": round(2 * n**3 / seconds / 1e12, 3), "n": n, "dtype": str(dtype).removeprefix("torch."),
            "repeats": repeats}


def names(text: str) -> list[str]:
    """A comma-separated flag value as a list ("a, b," -> ["a", "b"])."""
    return [part.strip() for part in text.split(",") if part.strip()]


def finish_check(path: str, report: dict) -> dict:
    """The end of a pass/fail check: its report to `path` (atomically) and to stdout as one JSON line; exit 1 when
    report["pass"] is false."""
    import json

    write_json(path, report)
    print(json.dumps(report))
    if not report["pass"]:
        raise SystemExit(1)
    return report


def write_json(path: str, report: dict) -> None:
    """Write a benchmark's report atomically (a reader, or a kill half-way, never sees half a file)."""
    import json

    from atomic import atomic_write

    if path:
        atomic_write(path, (json.dumps(report, indent=1) + "\n").encode())  # makes the folder


def run_step(cmd: list[str], log: Path, budget_s: float = 0.0, loads: list[float] | None = None) -> tuple[float, bool]:
    """Run one of a proof's commands from the repository's root (printed, so that it can be rerun by hand), its
    output to `log`; returns its wall time and whether the budget stopped it. Once a minute the machine's 1-minute load
    is appended to `loads` (other jobs share it). With budget_s > 0 the command gets SIGTERM when it has run that long
    (train.py then finishes its step, writes a checkpoint and exits 0). Exits with the log's tail on failure."""
    print(f"$ {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    stopped = False
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        try:
            while True:
                try:
                    returncode = proc.wait(timeout=60)
                    break
                except subprocess.TimeoutExpired:
                    if loads is not None:
                        loads.append(round(os.getloadavg()[0], 2))
                    if budget_s and time.perf_counter() - t0 >= budget_s and not stopped:
                        print(f"  wall-time budget of {budget_s / 60:g} min reached: SIGTERM", flush=True)
                        proc.send_signal(signal.SIGTERM)
                        stopped = True
        except BaseException:
            proc.kill()
            raise
    seconds = time.perf_counter() - t0
    if returncode != 0:
        raise SystemExit(f"error: {cmd[1]} failed (exit {returncode}); see {log}:\n"
                         + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
    print(f"  {seconds:.0f} s", flush=True)
    return seconds, stopped

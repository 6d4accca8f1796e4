"""What every benchmark under bench/ shares: the fake CelebA it times on when given no data, and what it records
beside its numbers: the machine it ran on and the commit measured."""
from __future__ import annotations

import os
import platform
import subprocess
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

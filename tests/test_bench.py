"""bench/: both benchmarks run end to end as commands (tiny settings: nothing here is timed or compared) and write
the JSON they promise. The figures themselves come from full runs, never from tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def check_machine(report: dict) -> None:
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    assert report["commit"]


def test_loader_bench_json(tmp_path: Path):
    path = tmp_path / "loader.json"
    run_bench("loader.py", "--count", "300", "--batch-size", "32", "--epochs", "1", "--min-seconds", "0",
              "--rounds", "1", "--json", str(path))
    report = json.loads(path.read_text())
    check_machine(report)
    names = [r["name"] for r in report["results"]]
    assert names[:3] == ["seed-baseline", "torch", "dali-cpu"]
    for r in report["results"][:3]:
        assert r["images_per_s"] > 0 and r["cpu_s_per_1k"] > 0 and r["images"] > 0
    assert report["raw_images"] == 300 and report["raw_mean_bytes"] > 0
    assert report["results"][0]["x_seed_baseline"] == 1.0


def test_loader_bench_on_given_data(celeba_src: Path, shards64: Path, tmp_path: Path):
    path = tmp_path / "loader.json"
    run_bench("loader.py", "--src", str(celeba_src), "--shards", str(shards64), "--batch-size", "32",
              "--epochs", "1", "--min-seconds", "0", "--rounds", "1", "--json", str(path))
    report = json.loads(path.read_text())
    assert report["raw_images"] == 203 and report["shard_samples"] == 163


def test_loader_bench_needs_both_data_arguments(celeba_src: Path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "loader.py"), "--src", str(celeba_src)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--shards" in out.stderr


def test_shards_bench_json(tmp_path: Path):
    path = tmp_path / "shards.json"
    run_bench("shards.py", "--count", "60", "--repeat", "1", "--json", str(path))
    report = json.loads(path.read_text())
    check_machine(report)
    assert len(report["results"]) == 2 and all(r["images"] == 60 and r["images_per_s"] > 0
                                               for r in report["results"])
    assert report["ratio"] > 0 and report["raw_mean_bytes"] > 0


@pytest.mark.parametrize("script", ["loader.py", "shards.py"])
def test_bench_help(script: str):
    assert "--json" in run_bench(script, "--help").stdout

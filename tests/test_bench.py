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
    assert names[:4] == ["seed-baseline", "torch", "dali-cpu", "dali-cpu-v1"]  # v1: the last release's reader
    for r in report["results"][:4]:
        assert r["images_per_s"] > 0 and r["cpu_s_per_1k"] > 0 and r["images"] > 0
        assert len(r["rounds_images_per_s"]) == 1 and r["x_seed_baseline"] > 0
    assert report["raw_images"] == 300 and report["raw_mean_bytes"] > 0
    assert report["results"][0]["x_seed_baseline"] == 1.0
    new, old = report["results"][2], report["results"][3]
    assert new["x_v1"] == pytest.approx(new["images_per_s"] / old["images_per_s"], rel=1e-2)
    assert new["x_v1_rounds_median"] > 0 and "x_v1" not in old
    ratios = report["ratios"]
    assert ratios["dali-cpu / seed-baseline"] == new["x_seed_baseline"]
    assert ratios["dali-cpu / dali-cpu-v1"] == new["x_v1"] and "dali-cpu / dali-cpu-v1, median round" in ratios


def test_loader_bench_contenders(tmp_path: Path):
    """--contenders times a subset (seed-baseline always: the ratios are against it); a wrong name is one line."""
    path = tmp_path / "loader.json"
    run_bench("loader.py", "--count", "120", "--batch-size", "32", "--epochs", "1", "--min-seconds", "0",
              "--rounds", "2", "--contenders", "dali-cpu-v1,dali-cpu", "--json", str(path))
    results = json.loads(path.read_text())["results"]
    assert [r["name"] for r in results] == ["seed-baseline", "dali-cpu", "dali-cpu-v1"]
    assert all(len(r["rounds_images_per_s"]) == 2 for r in results) and results[1]["x_v1"] > 0
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "loader.py"), "--contenders", "dali-cpu,pil"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--contenders" in out.stderr and "dali-cpu-v1" in out.stderr


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


# ------------------------------------------------------------------------------------------ the GPU check's CPU mode
# bench/gpu_check.sh --cpu runs every step of the GPU check with tiny sizes on the CPU (so the script and both GPU
# benchmarks cannot rot between GPU runs); its figures are CPU figures and only their presence and shape are checked.

GPU_CHECK_STEPS = ["env", "data", "train_grid", "sampling", "ema", "decode", "resume", "pytest_cuda", "data_e2e"]


@pytest.fixture(scope="module")
def gpu_check_cpu(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict, Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TMPDIR": str(out)}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out / "out"), "--cpu"], cwd=ROOT,
                          capture_output=True, text=True, timeout=500, env=env)
    report = json.loads((out / "out" / "gpu_check.json").read_text())
    return proc, report, out / "out"


@pytest.mark.slow
def test_gpu_check_cpu_runs_every_step(gpu_check_cpu):
    proc, report, out = gpu_check_cpu
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert [s["name"] for s in report["steps"]] == GPU_CHECK_STEPS
    assert all(s["status"] == "ok" for s in report["steps"]), report["steps"]
    assert report["gpu_figures"] is False and report["env"]["mode"] == "cpu" and not report["env"]["missing"]
    # The summary table comes last, and says that nothing in it is a GPU figure.
    tail = proc.stdout.strip().splitlines()
    assert tail[-1].startswith("9 steps, 0 not ok")
    assert any("CPU mode: no GPU figures" in line for line in tail[-25:])
    assert (out / "summary.txt").read_text().splitlines()[-1] == tail[-1]
    assert "=== resume" in (out / "gpu_check.log").read_text()
    assert report["decode"]["pass"] and report["decode"]["candidate"] == "dali-cpu"
    assert report["resume"]["pass"] and report["resume"]["stop_step"] < report["resume"]["steps"]
    assert report["pytest_cuda"]["failed"] == 0 and report["pytest_cuda"]["tests"] >= 1


@pytest.mark.slow
def test_train_step_bench_json(gpu_check_cpu):
    _, report, _ = gpu_check_cpu
    grid = report["train_grid"]["grid"]
    assert report["train_grid"]["gpu_figures"] is False and grid["matmul"]["tflops"] > 0
    assert {"peak_mem_gb", "mfu"} <= set(grid["nulls"])  # nulls, each with its reason
    rows = grid["rows"]
    assert {(r["precision"], r["channels_last"]) for r in rows} == {("fp32", False), ("fp32", True),
                                                                   ("fp16", False), ("fp16", True)}
    for r in rows:
        assert r["images_per_s"] > 0 and r["ms_per_step"] > 0 and r["flops_per_step"] > 0 and r["loss_finite"]
        assert r["mfu"] is None and "peak_mem_gb" not in r and r["batch"] == 4 and not r["compile"]
        assert r["flops_by_op"]["convolution"] > 0 and r["flops_by_op"]["bmm"] > 0  # attention counted too
    ema = report["ema"]["ema"]
    assert ema["torch_ema_ms"] > 0 and ema["foreach_ms"] > 0 and ema["step_ms"] > 0
    assert ema["foreach_max_abs_diff"] < 1e-6 and ema["foreach_advised"] is None
    check_draws(report["ema"]["draws"], worlds=[1, 2, 4, 8], batch=4)  # the ema step also times the draws
    data, e2e = report["data_e2e"]["data"], report["data_e2e"]["e2e"]
    assert [d["loader"] for d in data["rows"]] == ["dali-cpu", "torch"] and "dali-mixed" in data["nulls"]
    assert all(0 <= d["data_wait"] < 1 and d["images_per_s"] > 0 for d in data["rows"])
    assert [r["name"] for r in e2e["rows"]] == ["seed-style", "ours"] and e2e["ratio"] > 0
    assert not e2e["rows"][0]["fused_adamw"] and e2e["rows"][1]["ema"]


@pytest.mark.slow
def test_sampling_bench_json(gpu_check_cpu):
    _, report, _ = gpu_check_cpu
    s = report["sampling"]
    assert s["gpu_figures"] is False and s["nulls"]["graphs"] == "needs CUDA"
    timed = [r for r in s["rows"] if "seconds" in r]
    assert {(r["sampler"], r["steps"]) for r in timed} == {("ddim", 10), ("dpm++2m", 10), ("ddpm", 20)}
    assert all(r["seconds"] > 0 and r["images_per_s"] > 0 and r["finite"] and r["batch"] == 4 for r in timed)
    assert all(r["skipped"] == "needs CUDA" for r in s["rows"] if r["mode"] == "graphs")
    (t,) = s["throughput"]
    assert t["largest_batch"] == 8 and t["ddim50_images_per_s"] > 0 and [p["batch"] for p in t["points"]] == [4, 8]


def check_draws(d: dict, worlds: list[int], batch: int) -> None:
    assert d["batch"] == batch and d["step_ms"] > 0 and d["step_generator_ms"] > 0 and d["cond"]["cond_dim"] == 40
    assert [r["world_size"] for r in d["rows"]] == worlds
    for r in d["rows"]:
        assert r["rows_drawn"] == r["world_size"] * batch
        assert r["draw_ms"] > 0 and r["draw_ms_cond"] > 0
        assert r["share_of_step"] == pytest.approx(r["draw_ms"] / d["step_ms"], rel=1e-2, abs=1e-5)
    assert d["rows"][0]["extra_share_of_step"] == 0 and d["rows"][0]["extra_share_of_step_cond"] == 0


def test_train_step_bench_rejects_bad_worlds():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "train_step.py"), "--cpu", "--draws-worlds", "1,0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--draws-worlds '1,0'" in out.stderr


def test_sampling_bench_budget(tmp_path: Path):
    """A budget spent before a chain starts skips it and says why."""
    path = tmp_path / "sampling.json"
    run_bench("sampling.py", "--cpu", "--samplers", "dpm++2m2,ddpm1000", "--modes", "eager", "--max-batch", "4",
              "--budget-s", "0.5", "--json", str(path))
    rows = json.loads(path.read_text())["rows"]
    assert rows[0]["sampler"] == "dpm++2m" and rows[0]["steps"] == 2 and rows[0]["seconds"] > 0
    assert rows[1]["steps"] == 1000 and rows[1]["skipped"].startswith("--budget-s")


def test_fid_steps_bench_rows_table_and_plot(tmp_path: Path, shards: Path, tmp_path_factory):
    """bench/fid_steps.py on a real tiny run, with the stand-in features (the plumbing; the real network is slow)."""
    from tiny_run import tiny_run

    run = tiny_run(tmp_path_factory, shards)
    report, plot, md = tmp_path / "r.json", tmp_path / "fid.png", tmp_path / "fid.md"
    args = ["--ckpt", str(run), "--ref", str(shards), "--n", "4", "--samplers", "ddim,dpm++2m", "--steps", "2",
            "--features", "standin", "--device", "cpu", "--threads", "1", "--work", str(tmp_path / "work"),
            "--json", str(report), "--plot", str(plot), "--md", str(md)]
    run_bench("fid_steps.py", *args)
    first = json.loads(report.read_text())["rows"]
    # Then with DPM-Solver++ on uniform timesteps too: the two rows scored before are reused, one is new.
    out = run_bench("fid_steps.py", *args, "--spacings", "auto,uniform").stdout
    assert out.count("scored before") == 2 and out.count("evaluate.py") == 1
    rows = json.loads(report.read_text())["rows"]
    # DDIM's default spacing is uniform: one DDIM row; DPM-Solver++ in its default (linspace) and uniform.
    assert [(r["sampler"], r["steps"], r["spacing"]) for r in rows] == [
        ("ddim", 2, "uniform"), ("dpm++2m", 2, "linspace"), ("dpm++2m", 2, "uniform")]
    assert [r["fid"] for r in rows[:2]] == [r["fid"] for r in first] and all(r["seconds"] > 0 for r in rows)
    assert all(r["fid"] > 0 for r in rows) and rows[1]["fid"] != rows[0]["fid"]  # other timesteps, other images
    assert plot.stat().st_size > 0 and "| dpm++2m (linspace) |" in md.read_text()


def test_gpu_peaks_match_datasheet_names():
    from bench.common import gpu_peak_tflops

    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3") == gpu_peak_tflops("NVIDIA H200") == 989.0
    assert gpu_peak_tflops("NVIDIA H100 PCIe") == 756.0 and gpu_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_peak_tflops("NVIDIA H100 NVL") is None and gpu_peak_tflops("Tesla T4") is None


@pytest.mark.parametrize("script", ["train_step.py", "sampling.py", "decode_check.py", "resume_check.py",
                                    "fid_steps.py"])
def test_gpu_bench_help(script: str):
    assert "--json" in run_bench(script, "--help").stdout


def test_train_step_bench_rejects_unknown_names():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "train_step.py"), "--cpu", "--precisions", "fp8"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "--precisions 'fp8'" in out.stderr and "fp16" in out.stderr


def test_gpu_check_skips_dali_steps_without_dali(tmp_path: Path):
    """Without DALI the DALI steps are skipped with the reason (to be run later with --only dali), not failed."""
    (tmp_path / "hide" / "nvidia").mkdir(parents=True)
    (tmp_path / "hide" / "nvidia" / "__init__.py").write_text("")  # a plain package that shadows nvidia.dali
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path),
           "PYTHONPATH": str(tmp_path / "hide")}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "out"), "--cpu", "--only",
                           "decode,resume"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [(s["name"], s["status"]) for s in report["steps"]] == [("env", "ok"), ("data", "ok"),
                                                                   ("decode", "skipped"), ("resume", "skipped")]
    assert "no NVIDIA DALI" in report["steps"][2]["reason"] and report["env"]["missing"] == ["nvidia-dali"]

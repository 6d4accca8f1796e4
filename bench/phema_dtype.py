"""What fp16 post-hoc EMA snapshots cost against fp32 ones: train.py --phema-dtype's measurement.

    python bench/phema_dtype.py --run RUN --sigma-rel 0.03,0.08,0.15,0.25 --json bench/results/phema-dtype.json

RUN must have been trained with --phema-dtype fp32. Its snapshots are rounded to fp16 into a scratch run folder (what
--phema-dtype fp16 would have written: the same averages, rounded once), and every --sigma-rel is reconstructed from
both sets with ema.py's solve. Reported per sigma_rel: the coefficients' largest and summed magnitude, the relative RMS
difference of the reconstructed weights ||w16 - w32|| / ||w32|| and their largest absolute difference, beside the
rounding of one snapshot itself; and the mean absolute pixel difference (0..255) between --n samples of both with the
same noise (DDIM, --steps), beside that between the fp32 reconstruction and the classic EMA (the scale of a real
difference).
"""
from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import config  # noqa: E402
import ema  # noqa: E402
from atomic import atomic_write  # noqa: E402
from bench import common  # noqa: E402
from grids import to_uint8  # noqa: E402
from utills import load_model, resolve_checkpoint, run_paths  # noqa: E402


@dataclass
class DtypeConfig:
    run: str = ""  # a run trained with --phema ... --phema-dtype fp32
    sigma_rel: str = "0.03,0.08,0.15,0.25"  # the lengths to reconstruct from both
    n: int = 64  # samples per model for the pixel differences
    steps: int = 20  # DDIM steps of those samples
    seed: int = 0
    json: str = ""  # also write the report here


def relative(a: dict, b: dict) -> tuple[float, float]:
    """(||a - b|| / ||b||, max |a - b|) over every tensor of two state dicts."""
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b)
    den = sum(float(b[k].double().pow(2).sum()) for k in b)
    top = max(float((a[k].double() - b[k].double()).abs().max()) for k in b)
    return (num / den) ** 0.5, top


def samples(path: Path, noise: torch.Tensor, steps: int) -> np.ndarray:
    loaded = load_model(path, device="cpu")
    with torch.no_grad():
        x = loaded.diffusion.sample(loaded.model, tuple(noise.shape), sampler="ddim", steps=steps, noise=noise)
    return np.asarray(to_uint8(x), dtype=np.float64)


def main(cfg: DtypeConfig) -> dict:
    run = run_paths(cfg.run)
    snapshots = ema.read_snapshots(run.phema_snapshots)
    first = torch.load(snapshots[0].path, map_location="cpu", weights_only=True)
    if first.get("dtype") != "fp32":
        raise config.ConfigError(f"--run {cfg.run}: its snapshots are {first.get('dtype')}; train with "
                                 f"--phema-dtype fp32 to compare")
    sigma_rels = ema.parse_sigma_rels(cfg.sigma_rel, "--sigma-rel")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        half = run_paths(tmp / "run16")
        for s in snapshots:  # what --phema-dtype fp16 writes: the fp32 averages rounded once
            d = torch.load(s.path, map_location="cpu", weights_only=True)
            d["model"] = {k: v.half() if v.is_floating_point() else v for k, v in d["model"].items()}
            d["dtype"] = "fp16"
            atomic_write(half.phema_snapshots / s.path.name, lambda f, obj=d: torch.save(obj, f), durable=False)
        rounding = relative({k: v.half().float() for k, v in first["model"].items()}, first["model"])
        files32 = ema.reconstruct(run.root, sigma_rels, out=tmp / "fp32", log=lambda *a: None)
        files16 = ema.reconstruct(half.root, sigma_rels, out=tmp / "fp16", log=lambda *a: None)
        shape = (cfg.n, int(first["model_config"].get("in_channels", 3)), first["image_size"], first["image_size"])
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed))
        classic = samples(resolve_checkpoint(run.root), noise, cfg.steps)
        rows = []
        for sigma_rel, f32, f16 in zip(sigma_rels, files32, files16):
            a, b = (torch.load(f, map_location="cpu", weights_only=True) for f in (f16, f32))
            rel, top = relative(a["model"], b["model"])
            x32, x16 = samples(f32, noise, cfg.steps), samples(f16, noise, cfg.steps)
            rows.append({"sigma_rel": sigma_rel, "max_abs_coefficient": b["max_abs_coefficient"],
                         "sum_abs_coefficient": float(np.abs(b["coefficients"]).sum()),
                         "fit_error": b["fit_error"], "weights_relative_rms_diff": rel, "weights_max_abs_diff": top,
                         "pixels_mean_abs_diff_fp16_vs_fp32": float(np.abs(x16 - x32).mean()),
                         "pixels_mean_abs_diff_fp32_vs_classic_ema": float(np.abs(x32 - classic).mean())})
            print(json.dumps(rows[-1]))
    report = {"bench": "phema_dtype", "run": str(run.root), "snapshots": len(snapshots),
              "snapshot_step": snapshots[-1].step, "snapshot_fp16_rounding": {"relative_rms": rounding[0],
                                                                                "max_abs": rounding[1]},
              "n": cfg.n, "steps": cfg.steps, "rows": rows, "machine": common.machine(torch=torch.__version__),
              "commit": common.commit("ema.py", "bench/phema_dtype.py")}
    if cfg.json:
        atomic_write(cfg.json, (json.dumps(report, indent=2) + "\n").encode())
    return report


if __name__ == "__main__":
    with config.user_errors():
        print(json.dumps(main(config.parse(DtypeConfig, config_file=False)[0]), indent=2))

"""Check DALI's GPU JPEG decode ("mixed") against its CPU decode on the same shards: every pixel within --tol levels.

    python bench/decode_check.py --shards SHARDS [--tol 2] [--json PATH]
    python bench/decode_check.py --shards SHARDS --cpu     # no GPU: DALI's CPU decode against the torch loader's PIL

Both loaders read the --split in manifest order (no shuffle, no flips), so batch i of one holds the images of batch i
of the other; the images come back in [-1, 1] (x / 127.5 - 1), so a difference d is d * 127.5 levels of 255. nvJPEG
and libjpeg-turbo may round their IDCT and chroma upsampling differently; the issue allows 2/255. Prints a line and
writes {"candidate", "reference", "images", "max_abs_levels", "mean_abs_levels", "pixels_over_tol", "pass", ...}.
Exit status 1 when the check fails.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import config  # noqa: E402
import data  # noqa: E402
from bench import common  # noqa: E402


@dataclass
class DecodeConfig:
    shards: str = ""  # a prepare_shards.py output folder of JPEG shards
    split: str = "train"  # which split to compare (all of it)
    batch_size: int = 256  # images per batch of both loaders
    tol: float = 2.0  # the largest difference allowed, in levels of 255
    cpu: bool = False  # no GPU: compare DALI's CPU decode with the torch loader's (PIL) instead
    json: str = ""  # also write the JSON report to this path

    REQUIRED: ClassVar[tuple[str, ...]] = ("shards",)
    BOUNDS: ClassVar[dict[str, str]] = {"batch_size": ">= 1", "tol": ">= 0"}


def compare(candidate: data.Loader, reference: data.Loader, tol: float) -> dict:
    """Walk both loaders batch by batch and sum up the pixel differences, in levels of 255."""
    images = over = 0
    worst, total, attrs_equal = 0.0, 0.0, True
    for a, b in zip(candidate, reference, strict=True):
        x, y = a["image"].float().cpu(), b["image"].float().cpu()
        if x.shape != y.shape:
            raise SystemExit(f"error: batch shapes differ: {tuple(x.shape)} and {tuple(y.shape)}")
        diff = (x - y).abs() * 127.5
        worst = max(worst, float(diff.max()))
        total += float(diff.sum())
        over += int((diff > tol + 1e-3).sum())  # 1e-3: the [-1, 1] scaling rounds
        images += len(x)
        if "attr" in a:
            attrs_equal &= torch.equal(a["attr"].cpu(), b["attr"].cpu())
    pixels = max(1, images * x.shape[1] * x.shape[2] * x.shape[3]) if images else 1
    return {"images": images, "max_abs_levels": round(worst, 3), "mean_abs_levels": round(total / pixels, 4),
            "pixels_over_tol": over, "fraction_over_tol": over / pixels, "attrs_equal": attrs_equal}


def main(argv: list[str] | None = None) -> dict:
    try:
        cfg, _ = config.parse(DecodeConfig, argv, config_file=False)
    except config.ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    gpu = torch.cuda.is_available() and not cfg.cpu
    common_args = dict(split=cfg.split, shuffle=False, flip=False, drop_last=False)
    if gpu:
        device = torch.device("cuda", torch.cuda.current_device())
        candidate = data.make_loader(cfg.shards, cfg.batch_size, backend="dali", device=device, **common_args)
        reference = data.make_loader(cfg.shards, cfg.batch_size, backend="dali", device="cpu", **common_args)
        names = ("dali-mixed", "dali-cpu")
    else:
        device = torch.device("cpu")
        candidate = data.make_loader(cfg.shards, cfg.batch_size, backend="dali", device="cpu", **common_args)
        reference = data.make_loader(cfg.shards, cfg.batch_size, backend="torch", device="cpu", num_threads=0,
                                     **common_args)
        names = ("dali-cpu", "torch (PIL)")
    result = compare(candidate, reference, cfg.tol)
    report = {"bench": "decode_check", "candidate": names[0], "reference": names[1], "tol_levels": cfg.tol,
              **result, "pass": result["images"] > 0 and result["max_abs_levels"] <= cfg.tol + 1e-3
              and result["attrs_equal"], "gpu_figures": gpu, "config": dataclasses.asdict(cfg),
              "machine": common.gpu_machine(device), "commit": common.commit("data.py", "bench/decode_check.py")}
    if not gpu:
        report["nulls"] = {"dali-mixed": "needs CUDA (DALI's CPU decode checked against PIL instead)"}
    verdict = "PASS" if report["pass"] else "FAIL"
    print(f"decode check {verdict}: {names[0]} vs {names[1]} over {result['images']} images: max "
          f"{result['max_abs_levels']:.2f} levels, mean {result['mean_abs_levels']:.3f}, "
          f"{result['pixels_over_tol']} values over {cfg.tol:g}; attributes equal: {result['attrs_equal']}")
    return common.finish_check(cfg.json, report)


if __name__ == "__main__":
    main()

"""Time prepare_shards.py against a naive one-process PIL loop, side by side in one run on the same fake CelebA.

    python bench/shards.py [--count 3000] [--size 64] [--workers 0] [--repeat 2] [--json bench/shards.json]

The naive loop is what a first script would do per image: open, convert to RGB, crop the CelebA box, LANCZOS
resize, encode JPEG at quality 95 (4:4:4), in one process, writing nothing. prepare_shards does the same work and
also writes the tars, indexes and manifest, with --workers processes (0 = all cores). Both read the same files,
already in the page cache; each is run --repeat times, alternating, and the best run counts. Prints a table and a
JSON line {"results": [{"name", "images_per_s", ...}], "ratio": ours / naive, "machine": {...}, "commit": "..."}.
"""
from __future__ import annotations

import dataclasses
import io
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import PIL  # noqa: E402
from PIL import Image  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import config  # noqa: E402
import prepare_shards  # noqa: E402
from atomic import atomic_write  # noqa: E402
from bench import common  # noqa: E402

console = Console()


@dataclass
class BenchConfig:
    count: int = 3000  # fake CelebA images to time on (178x218 JPEGs, as CelebA's)
    size: int = 64  # output side in pixels
    workers: int = 0  # prepare_shards processes; 0 = all cores
    repeat: int = 2  # runs of each contender, alternating; the best counts
    json: str = ""  # also write the JSON result to this path

    BOUNDS: ClassVar[dict[str, str]] = {"count": ">= 1", "size": "16..256", "workers": ">= 0", "repeat": ">= 1"}


def naive_loop(paths: list[Path], size: int) -> float:
    """One process, one image at a time, full-resolution decode: seconds for all of paths."""
    start = time.perf_counter()
    for path in paths:
        img = Image.open(path).convert("RGB")
        img = img.crop(prepare_shards.CELEBA_BOX).resize((size, size), Image.Resampling.LANCZOS)
        img.save(io.BytesIO(), format="JPEG", quality=95, subsampling=0)
    return time.perf_counter() - start


def ours(src: Path, out: Path, size: int, workers: int) -> float:
    """prepare_shards end to end (plan, decode, write tars, indexes, manifest): seconds."""
    start = time.perf_counter()
    prepare_shards.prepare(prepare_shards.PrepareConfig(src=str(src), out=str(out), size=size, workers=workers))
    return time.perf_counter() - start


def machine() -> dict:
    return {**common.machine(pillow=PIL.__version__), "cores": prepare_shards._cpu_count()}


def commit() -> str:
    return common.commit("prepare_shards.py", "bench/shards.py")


def main(argv: list[str] | None = None) -> dict:
    try:
        cfg, _ = config.parse(BenchConfig, argv, config_file=False)
    except config.ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    console.print(f"[bold]bench/shards[/] {dataclasses.asdict(cfg)}")
    info = machine()
    workers = cfg.workers or info["cores"]

    with tempfile.TemporaryDirectory(prefix="bench_shards_") as tmp:
        # A fake CelebA of the requested size, drawn once.
        t0 = time.perf_counter()
        src = common.fake_celeba(Path(tmp) / "celeba", cfg.count)
        paths = sorted((src / "img_align_celeba").glob("*.jpg"))
        raw_bytes = common.mean_file_bytes(paths)
        console.print(f"fake CelebA: {cfg.count} images, {raw_bytes / 1e3:.1f} KB on average (real CelebA: "
                      f"{common.CELEBA_MEAN_JPEG_BYTES / 1e3:.1f} KB), in {time.perf_counter() - t0:.1f} s")

        # Alternate the contenders so that a busy neighbour slows both alike.
        naive_s, ours_s = [], []
        for i in range(max(cfg.repeat, 1)):
            naive_s.append(naive_loop(paths, cfg.size))
            ours_s.append(ours(src, Path(tmp) / f"shards{i}", cfg.size, workers))  # a fresh folder: no reuse
            shutil.rmtree(Path(tmp) / f"shards{i}")

    results = [
        {"name": "naive PIL loop (1 process, full decode, LANCZOS, JPEG q95)", "images": cfg.count,
         "seconds": round(min(naive_s), 3), "images_per_s": round(cfg.count / min(naive_s), 1)},
        {"name": f"prepare_shards --size {cfg.size} --workers {workers} (writes tars, idx, manifest)",
         "images": cfg.count, "seconds": round(min(ours_s), 3), "images_per_s": round(cfg.count / min(ours_s), 1)},
    ]
    report = {"results": results, "ratio": round(results[1]["images_per_s"] / results[0]["images_per_s"], 2),
              "size": cfg.size, "raw_mean_bytes": round(raw_bytes), "machine": info, "commit": commit(),
              "runs_seconds": {"naive": [round(s, 3) for s in naive_s], "ours": [round(s, 3) for s in ours_s]}}

    table = Table(title=f"{cfg.count} CelebA-sized JPEGs -> {cfg.size}x{cfg.size}, {info['cores']} cores "
                        f"({info['cpu']})")
    for col in ("contender", "images", "best seconds", "images/s"):
        table.add_column(col, justify="left" if col == "contender" else "right")
    for r in results:
        table.add_row(r["name"], f"{r['images']:,}", f"{r['seconds']:.2f}", f"{r['images_per_s']:,.0f}")
    console.print(table)
    console.print(f"ratio ours / naive: {report['ratio']:.2f}x")
    text = json.dumps(report)
    print(text)
    if cfg.json:
        atomic_write(cfg.json, (json.dumps(report, indent=1) + "\n").encode())  # makes the folder
    return report


if __name__ == "__main__":
    main()

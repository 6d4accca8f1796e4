"""FID against the number of sampling steps, DDIM beside DPM-Solver++(2M): the table and plot of docs/sampling.md.

    python bench/fid_steps.py --ckpt RUN --ref SHARDS --n 2000 --json bench/results/fid-steps.json \
        --plot docs/fid-steps.png --md docs/fid-steps.md

For each sampler of --samplers, each spacing of --spacings ("auto": the sampler's default, uniform for DDIM and
linspace for DPM-Solver++, diffusion.DEFAULT_SPACING) and each step count of --steps, evaluate.py (printed, so any row
can be rerun by hand) makes --n samples from the same noise (image i from (--seed, i), in every row) and scores them
with the packaged FID Inception against the same reference statistics (--ref's --ref-split, at most --ref-max images;
cached once). The report gives each row's FID, KID and the wall time of its sampling and scoring (the machine is in the
report); the plot puts FID against steps, one line per sampler and spacing (dashed: not the sampler's default). Each
row's result stays in --work: a rerun (more spacings, say, or after an interruption) reuses the rows already scored
with the same checkpoint, reference and settings, and for the others makes only the images that are missing.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import config  # noqa: E402
from atomic import atomic_write  # noqa: E402
from bench import common  # noqa: E402
from diffusion import DEFAULT_CLIP, DEFAULT_SPACING, SAMPLERS, SPACINGS  # noqa: E402


@dataclass
class FidStepsConfig:
    ckpt: str = ""  # run folder or checkpoint (evaluate.py --ckpt)
    ref: str = ""  # shards folder of the reference images (evaluate.py --ref)
    ref_split: str = "train"  # reference split
    ref_max: int = 0  # at most this many reference images (0: the whole split)
    n: int = 2000  # samples per row
    samplers: str = "ddim,dpm++2m"  # samplers to compare (diffusion.SAMPLERS)
    spacings: str = "auto"  # spacings of each sampler: auto (its default) and/or diffusion.SPACINGS
    steps: str = "5,10,20,50"  # step counts
    seed: int = 0  # the same noise in every row
    batch_size: int = 250  # images per sampling batch
    features: str = "inception"  # evaluate.py --features: inception, or standin (a random net: tests of the plumbing)
    device: str = "auto"  # evaluate.py --device
    threads: int = 0  # evaluate.py --threads
    label: str = ""  # the model as the plot's title names it (default: --ckpt)
    work: str = ""  # where the samples and per-row results go (default: RUN/eval/fid-steps)
    json: str = ""  # the report
    plot: str = ""  # PNG: FID against steps
    md: str = ""  # Markdown table

    REQUIRED: ClassVar[tuple] = ("ckpt", "ref")
    CHOICES: ClassVar[dict] = {"features": ("inception", "standin")}
    BOUNDS: ClassVar[dict] = {"ref_max": ">= 0", "n": ">= 2", "seed": ">= 0", "batch_size": ">= 1", "threads": ">= 0"}


def parse_list(text: str, flag: str, cast=str) -> list:
    try:
        values = [cast(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise config.ConfigError(f"{flag} {text!r}: expected a comma-separated list")
    return values


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for sampler, spacing in lines(report):
        rows = [r for r in report["rows"] if (r["sampler"], r["spacing"]) == (sampler, spacing)
                and r.get("fid") is not None]
        ax.plot([r["steps"] for r in rows], [r["fid"] for r in rows], marker="o",
                linestyle="-" if spacing == DEFAULT_SPACING[sampler] else "--", label=f"{sampler} ({spacing})")
    ax.set_xscale("log")
    steps = sorted({r["steps"] for r in report["rows"]})
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.minorticks_off()
    ax.set_xlabel("sampling steps (UNet forwards per image)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(f"FID of {report['n']} samples vs steps\n{report['model']}", fontsize=9)
    if report["config"]["features"] != "inception":
        ax.set_ylabel(f"FID with the {report['config']['features']} features (plumbing only)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def lines(report: dict) -> list[tuple[str, str]]:
    """(sampler, spacing) of each line of the plot and row of the table, in the order measured."""
    return list(dict.fromkeys((r["sampler"], r["spacing"]) for r in report["rows"]))


def table(report: dict) -> str:
    steps = sorted({r["steps"] for r in report["rows"]})
    out = ["| sampler (spacing) | " + " | ".join(f"{s} steps" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for sampler, spacing in lines(report):
        cells = []
        for s in steps:
            row = next((r for r in report["rows"] if (r["sampler"], r["spacing"], r["steps"]) == (sampler, spacing, s)),
                       {})
            cells.append(f"{row['fid']:.1f}" if row.get("fid") is not None else "-")
        out.append(f"| {sampler} ({spacing}) | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def row(result: dict, sampler: str, steps: int, seconds: float | None) -> dict:
    return {"sampler": sampler, "steps": steps, "spacing": result["sampler"]["spacing"], "fid": result.get("fid"),
            "kid": result.get("kid_mean"), "kid_std": result.get("kid_std"), "seconds": seconds,
            "reference": result.get("reference"), "step": result.get("step")}


def finished(out: Path, cfg: FidStepsConfig, sampler: str, spacing: str, steps: int, ckpt: Path) -> dict | None:
    """The result an earlier run left in `out` for this row, if it was made with the same checkpoint, reference,
    features and settings (else None: the row is scored again)."""
    try:
        result = json.loads(out.read_text())
        s, ref = result["sampler"], result["reference"]
        same = ((s["sampler"], s["steps"], s["spacing"], s["seed"], result["n"]) == (sampler, steps, spacing, cfg.seed,
                                                                                      cfg.n)
                and s["clip"] == DEFAULT_CLIP[sampler] and Path(ref["shards"]).resolve() == Path(cfg.ref).resolve()
                and ref["split"] == cfg.ref_split and (cfg.features == "inception") == ("standin" not in
                                                                                       result["feature_network"])
                and Path(result["checkpoint"]).resolve() == ckpt)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return result if same else None


def checkpoint_file(ckpt: str) -> Path:
    """The checkpoint file evaluate.py will load for --ckpt (a run folder: its newest valid checkpoint)."""
    from utills import resolve_checkpoint

    return Path(resolve_checkpoint(ckpt)).resolve()


def main(cfg: FidStepsConfig) -> dict:
    samplers = parse_list(cfg.samplers, "--samplers")
    bad = [s for s in samplers if s not in SAMPLERS]
    if bad:
        raise config.ConfigError(f"--samplers: unknown {', '.join(bad)} (choose from {', '.join(SAMPLERS)})")
    steps = parse_list(cfg.steps, "--steps", int)
    spacings = parse_list(cfg.spacings, "--spacings")
    bad = [s for s in spacings if s not in ("auto",) + SPACINGS]
    if bad:
        raise config.ConfigError(f"--spacings: unknown {', '.join(bad)} (choose from auto, {', '.join(SPACINGS)})")
    ckpt = checkpoint_file(cfg.ckpt)
    work = Path(cfg.work) if cfg.work else Path(cfg.ckpt) / "eval" / "fid-steps"
    work.mkdir(parents=True, exist_ok=True)
    report = {"bench": "fid_steps", "config": vars(cfg).copy(), "machine": common.machine(),
              "commit": common.commit("diffusion.py", "sample.py", "evaluate.py", "bench/fid_steps.py"),
              "n": cfg.n, "samplers": samplers, "model": cfg.label or str(cfg.ckpt), "rows": []}
    todo = [(sampler, DEFAULT_SPACING[sampler] if spacing == "auto" else spacing) for sampler in samplers
            for spacing in spacings]
    for sampler, spacing in dict.fromkeys(todo):
        for n_steps in steps:
            # A sampler's default spacing keeps the plain name (the folders of runs before --spacings).
            name = f"{sampler}-{n_steps}" if spacing == DEFAULT_SPACING[sampler] else f"{sampler}-{spacing}-{n_steps}"
            out = work / f"{name}.json"
            cmd = [sys.executable, str(ROOT / "evaluate.py"), "--ckpt", cfg.ckpt, "--ref", cfg.ref,
                   "--ref-split", cfg.ref_split, "--ref-max", str(cfg.ref_max), "--n", str(cfg.n),
                   "--sampler", sampler, "--steps", str(n_steps), "--spacing", spacing, "--seed", str(cfg.seed),
                   "--batch-size", str(cfg.batch_size), "--device", cfg.device, "--threads", str(cfg.threads),
                   "--metrics", "fid,kid", "--features", cfg.features, "--outdir", str(work / name), "--out", str(out)]
            result = finished(out, cfg, sampler, spacing, n_steps, ckpt)
            if result is not None:
                print(f"{name}: scored before ({out}), FID {result.get('fid')}", flush=True)
                report["rows"].append(row(result, sampler, n_steps, result.get("seconds")))
                continue
            print("$ " + shlex.join(cmd), flush=True)
            t0 = time.perf_counter()
            if subprocess.run(cmd, cwd=ROOT).returncode != 0:
                raise SystemExit(f"error: {name}: evaluate.py failed (its messages are above)")
            result = json.loads(out.read_text())
            seconds = round(time.perf_counter() - t0, 1)
            result["seconds"] = seconds  # kept with the row's result, for a rerun that reuses it
            atomic_write(out, (json.dumps(result, indent=2) + "\n").encode())
            report["rows"].append(row(result, sampler, n_steps, seconds))
            common.write_json(cfg.json, report)
    print(table(report))
    if cfg.md:
        atomic_write(cfg.md, table(report).encode())
    if cfg.plot:
        plot(report, cfg.plot)
    return report


if __name__ == "__main__":
    with config.user_errors():
        main(config.parse(FidStepsConfig, sys.argv[1:], config_file=False)[0])

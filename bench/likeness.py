"""The proof that a reference-face model draws faces like its reference, on fake CelebA, from nothing, on a CPU.

    python bench/likeness.py --json bench/results/likeness-cpu-tiny32.json   # long: docs/likeness.md gives its time
    python bench/likeness.py --out /tmp/like --steps 200 --refs 8 --per-ref 2   # a quick look at the plumbing

Steps, each with the project's own command line (printed, so that any of them can be rerun by hand):
1. fake_celeba.py --count 6000, prepare_shards.py --size 32 (the train split is ~4,800 faces);
2. judge.py: the attribute judge, trained on the train split (SHARDS/judge.pt, its balanced accuracy per attribute
   on the valid split in SHARDS/judge.json);
3. embed.py --encoder judge: every shard face's reference embedding, the judge's penultimate features;
4. train.py --preset tiny --cond-embed --objective v --scale-shift-norm --min-snr-gamma 5: a model conditioned on
   each face's own embedding (dropped to a learned null with --p-uncond, so that it also samples unconditionally);
5. evaluate.py --metrics likeness: --refs references from the valid split, --per-ref samples each at guidance 1 and 3
   and unconditional samples, read by the encoder (cosine similarity to the reference, against random real pairs)
   and by the judge (attribute agreement with the reference, against unconditional samples and chance);
6. sample.py --like-key --sweep guidance=0,1,3: a picture, per reference its row of unconditional samples
   (guidance 0 = the null embedding alone), then guidance 1 and 3, the same starting noise in every column.

No pass/fail target: the report (JSON, and a Markdown table beside it) gives every number with the wall time of each
step and the machine, and says whether the guided agreement is above the unconditional one. A step whose output is
already in --out is skipped and keeps the wall time it took then (OUT/seconds.json), so an interrupted proof can be
started again: a training that did not end (OUT/trained.json missing) starts again from step 0, so that its wall
time is one measurement; --train-minutes stops it (SIGTERM: train.py writes a checkpoint) at a wall-time budget and
the report gives the steps it reached.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import config  # noqa: E402
from bench import common  # noqa: E402


@dataclass
class LikenessConfig:
    out: str = "/tmp/likeness-proof"  # working folder: fake CelebA, shards, judge, embeddings, run, samples
    count: int = 6000  # fake CelebA images (80% train, 10% valid, 10% test, as CelebA's partition)
    size: int = 32  # image size of the shards
    steps: int = 2600  # training steps of the reference-conditioned model
    batch_size: int = 64  # training batch
    lr: float = 1e-3  # peak learning rate (the tiny preset learns fast at 1e-3; 2e-4 is for the big ones)
    warmup: int = 200  # learning-rate warm-up steps
    ema_decay: float = 0.995  # EMA decay (0.9999 averages over far more steps than this run has)
    min_snr_gamma: float = 5.0  # min-SNR-gamma loss weighting (0: off)
    p_uncond: float = 0.1  # training rows with the embedding dropped to the learned null
    scale_shift_norm: bool = True  # AdaGN: the embedding scales and shifts the norms (--no-scale-shift-norm: adds)
    refs: int = 64  # reference faces from the valid split in the likeness report
    per_ref: int = 4  # samples per reference and guidance scale
    guidance: str = "1,3"  # guidance scales of the report
    sample_steps: int = 25  # DDIM steps of every sample
    picture_refs: int = 4  # references (the first of the valid split) in the picture
    picture_n: int = 8  # samples per row of the picture
    train_minutes: float = 60.0  # wall-time budget of training (0: none): train.py then stops at the step it reached
    threads: int = 2  # intra-op threads of every step
    json: str = ""  # also write the JSON report here (and a .md table beside it)

    BOUNDS: ClassVar[dict] = {"count": ">= 100", "size": ">= 16", "steps": ">= 1", "batch_size": ">= 1",
                              "lr": "> 0", "warmup": ">= 0", "ema_decay": "0..1", "min_snr_gamma": ">= 0",
                              "p_uncond": "0..1", "refs": ">= 1", "per_ref": ">= 1", "sample_steps": ">= 1",
                              "picture_refs": ">= 1", "picture_n": ">= 1", "threads": ">= 1",
                              "train_minutes": ">= 0"}


LOADS: dict[str, list[float]] = {}  # step name -> the 1-minute load average sampled each minute while it ran


def valid_keys(shards: Path, n: int) -> list[str]:
    """The sample keys of the first n faces of the valid split (manifest order)."""
    from data import SampleIndex
    from embed import read_manifest

    return list(SampleIndex.of_split(shards, read_manifest(shards), "valid").keys[:n])


def train_record(run_dir: Path) -> dict:
    """The step and image count the run reached and its throughput as logged (metrics.jsonl: one record per 100 steps
    and one at the stop), for the training cost."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    rates = [r["images_per_s"] for r in rows if isinstance(r.get("images_per_s"), (int, float))]
    last = rows[-1] if rows else {}
    return {"steps": last.get("step"), "images": last.get("images_seen"), "final_loss": last.get("loss"),
            "images_per_s_logged": [round(x, 1) for x in rates]}


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def above(rep: dict) -> dict:
    """Per guidance scale: whether the judged agreement with the reference (over the best-read attributes, and over
    all) is above that of the unconditional samples. No target: a plain statement of the numbers."""
    j = rep.get("judge")
    if not j:
        return {}
    return {group: {w: v > j["agreement"][group]["unconditional"]
                    for w, v in j["agreement"][group]["conditioned"].items()} for group in ("best", "all")}


def markdown(rep: dict, report: dict) -> str:
    """The likeness tables from eval.json's "likeness" section (evaluate.py) and the training cost."""
    scales = [f"{w:g}" for w in rep["guidance"]]
    lines = []
    j = rep.get("judge")
    if j:
        head = ["judged attribute agreement with the reference"] + [f"w={w}" for w in scales] + \
            ["unconditional", "chance"]
        lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for group, name in (("best", "attributes the judge reads best"), ("all", "all attributes")):
            g = j["agreement"][group]
            lines.append(f"| {name} ({g['attributes']}) | " + " | ".join(pct(g["conditioned"][w]) for w in scales)
                         + f" | {pct(g['unconditional'])} | {pct(g['chance'])} |")
        lines += ["", f"Best read: {j['best_rule']}.", ""]
        head = ["attribute", "judge bal. acc.", "data rate", "chance"] + [f"w={w}" for w in scales] + \
            ["unconditional"]
        lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for a in j["best_attributes"]:
            r = j["per_attribute"][a]
            lines.append(f"| {a} | {r['balanced_accuracy']:.3f} | {pct(r['data_rate'])} | {pct(r['chance'])} | "
                         + " | ".join(pct(r["conditioned"][w]) for w in scales) + f" | {pct(r['unconditional'])} |")
        lines.append("")
    cos = rep["cosine"]
    head = [f"cosine similarity to the reference ({rep['encoder']['kind']} encoder)", "mean", "std"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for w in scales:
        c = cos["conditioned"][w]
        lines.append(f"| samples like the reference, w={w} | {c['mean']:.4f} | {c['std']:.4f} |")
    c = cos["unconditional"]
    lines.append(f"| unconditional samples (each reference against all) | {c['mean']:.4f} | {c['std']:.4f} |")
    c = cos["real_pairs"]
    lines.append(f"| real faces, {c['pairs']} random pairs of distinct faces | {c['mean']:.4f} | {c['std']:.4f} |")
    for group, by_w in above(rep).items():
        lines += ["", f"Guided agreement above the unconditional samples' ({group} attributes): "
                  + ", ".join(f"w={w}: {'yes' if v else 'no'}" for w, v in by_w.items()) + "."]
    lines += ["", f"{rep['refs']} references (the first of the {rep['split']} split) x {rep['n']} samples per "
              f"setting ({rep['sampler']['sampler']}-{rep['sampler']['steps']}, "
              f"{'EMA' if rep['sampler']['ema'] else 'trained'} weights; unconditional samples from the same noise)."]
    return "\n".join(lines + cost_lines(report)) + "\n"


def cost_lines(report: dict) -> list[str]:
    m, t, s = report["machine"], report["training"], report["seconds"]
    loads = t.get("load_1min_each_minute") or []
    load = f", 1-minute load {min(loads):.1f}-{max(loads):.1f} while training" if loads else ""
    stop = (f" (stopped by the {report['config']['train_minutes']:g}-min wall-time budget; {t['steps_asked']} steps "
            f"asked)" if t.get("stopped_by_budget") else "")
    return ["", f"Training: {t['steps']} steps of batch {t['batch_size']} = {t['images']:,} images{stop} in "
            f"{s['train'] / 60:.1f} min ({t['images'] / s['train']:.1f} images/s) on {m['cpu']} ({m['cores']} "
            f"cores{load}); the judge {s.get('judge', 0) / 60:.1f} min, the embeddings {s.get('embed', 0):.0f} s, "
            f"the likeness report {s.get('evaluate', 0) / 60:.1f} min, the picture {s.get('picture', 0) / 60:.1f} "
            f"min; everything {s['total'] / 60:.1f} min; commit {report['commit']}."]


def main(cfg: LikenessConfig) -> dict:
    config.check(cfg)
    print(f"likeness proof {dataclasses.asdict(cfg)}", flush=True)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    py, th = sys.executable, ["--threads", str(cfg.threads)]
    src, shards, run_dir = out / "fake_celeba", out / f"shards{cfg.size}", out / "run"
    judge = shards / "judge.pt"  # where embed.py --encoder judge looks for it
    times_path = out / "seconds.json"
    seconds: dict[str, float] = json.loads(times_path.read_text()) if times_path.is_file() else {}
    load = common.machine()

    def step(name: str, cmd: list[str], budget_s: float = 0.0) -> bool:
        seconds[name], stopped = common.run_step(cmd, out / f"{name}.log", budget_s, LOADS.setdefault(name, []))
        common.write_json(str(times_path), seconds)
        return stopped

    if not (shards / "manifest.json").is_file():
        step("fake_celeba", [py, "fake_celeba.py", "--out", str(src), "--count", str(cfg.count)])
        step("prepare_shards", [py, "prepare_shards.py", "--src", str(src), "--out", str(shards), "--size",
                                str(cfg.size), "--samples-per-shard", "1000"])
    if not judge.is_file():
        step("judge", [py, "judge.py", "--data", str(shards), "--out", str(judge)] + th)
    if "judge" not in json.loads((shards / "manifest.json").read_text()).get("embeddings", {}):
        step("embed", [py, "embed.py", "--data", str(shards), "--encoder", "judge", "--device", "cpu"] + th)
    trained = out / "trained.json"  # how the training step ended, so that a rerun does not train on
    if not trained.is_file():
        # A fresh run folder each time: an interrupted training is started again from nothing, so that its wall time
        # is one uninterrupted measurement.
        if run_dir.exists():
            shutil.rmtree(run_dir)
        train_machine = common.machine()
        stopped = step("train", [py, "train.py", "--data", str(shards), "--out", str(run_dir), "--preset", "tiny",
                                 "--cond-embed", "--p-uncond", str(cfg.p_uncond), "--objective", "v",
                                 "--steps", str(cfg.steps), "--batch-size", str(cfg.batch_size), "--lr", str(cfg.lr),
                                 "--warmup", str(cfg.warmup), "--ema-decay", str(cfg.ema_decay),
                                 "--min-snr-gamma", str(cfg.min_snr_gamma),
                                 "--scale-shift-norm" if cfg.scale_shift_norm else "--no-scale-shift-norm",
                                 "--device", "cpu", "--ckpt-every", "500", "--sample-every", "500",
                                 "--log-every", "100"] + th, budget_s=60 * cfg.train_minutes)
        common.write_json(str(trained), {"stopped_by_budget": stopped, "wall_s": round(seconds["train"], 1),
                                          "load_1min_each_minute": LOADS.get("train", []),
                                          "machine_at_start": train_machine, **train_record(run_dir)})
    training = json.loads(trained.read_text())
    eval_json = out / "eval.json"
    if "likeness" not in (json.loads(eval_json.read_text()) if eval_json.is_file() else {}):
        step("evaluate", [py, "evaluate.py", "--ckpt", str(run_dir), "--metrics", "likeness", "--judge", str(judge),
                          "--likeness-refs", str(cfg.refs), "--likeness-n", str(cfg.per_ref),
                          "--likeness-guidance", cfg.guidance, "--steps", str(cfg.sample_steps), "--device", "cpu",
                          "--out", str(eval_json)] + th)
    keys = valid_keys(shards, cfg.picture_refs)
    picture = out / "likeness.png"
    if not picture.is_file():
        step("picture", [py, "sample.py", "--ckpt", str(run_dir), "--like-key", ",".join(keys), "--sweep",
                         "guidance=0," + cfg.guidance, "--n", str(cfg.picture_n), "--steps", str(cfg.sample_steps),
                         "--device", "cpu", "--out", str(picture)] + th)

    rep = json.loads(eval_json.read_text())["likeness"]
    judge_report = json.loads(judge.with_suffix(".json").read_text())
    report = {
        "bench": "likeness",
        "config": dataclasses.asdict(cfg),
        "machine": training.get("machine_at_start") or load,
        "commit": common.commit("unet.py", "diffusion.py", "train.py", "sample.py", "evaluate.py", "judge.py",
                                "embed.py"),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "training": {"batch_size": cfg.batch_size, "steps_asked": cfg.steps, **training},
        "judge": {a: judge_report["attributes"][a]["balanced_accuracy"] for a in judge_report["attributes"]},
        "likeness": rep,
        "guided_agreement_above_unconditional": above(rep),
        "picture": {"path": str(picture), "keys": keys,
                    "rows": "per reference: guidance 0 (unconditional), then " + cfg.guidance},
    }
    report["seconds"]["total"] = round(sum(report["seconds"].values()), 1)
    md = markdown(rep, report)
    print(md)
    if cfg.json:
        common.write_json(cfg.json, report)
        Path(cfg.json).with_suffix(".md").write_text(md)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    try:
        main(config.parse(LikenessConfig, sys.argv[1:], config_file=False)[0])
    except config.ConfigError as e:
        raise SystemExit(f"error: {e}") from None

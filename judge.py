"""The attribute judge: a small CNN that reads CelebA's 40 attributes off a face, to measure how well a model obeys.

    python judge.py --data SHARDS                  # -> SHARDS/judge.pt and SHARDS/judge.json
    python judge.py --data SHARDS --out RUN/judge.pt --epochs 20

It trains on the shards' train split (random flips; the attributes do not depend on left and right) with each
attribute's positives weighted by its negatives/positives ratio, so that a rare attribute (a hat on 5% of faces) is
not learnt as "never": the loss aims at balanced accuracy, the mean of the true-positive and true-negative rates,
which is what it reports per attribute on the valid split (the last 10% of train when the shards have no valid
split). Saved with the weights: that table, the data's label rate of every attribute (train split) and the rate the
judge itself reads on the held-out faces, so that evaluate.py can compare a model's samples with both without the
shards at hand. An attribute the judge reads badly says little about a model: evaluate.py shows the accuracy beside
every rate.

The file holds only tensors and plain values (loaded with weights_only=True); judge.json is the same table as text.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn

import config
from atomic import atomic_write
from config import UserError
from manifest import MANIFEST, read_manifest, sha256_file
from utills import atomic_save, os_errors_as_write_error, pick_device, set_threads

console = Console(stderr=True)
JUDGE_FORMAT = "celeba-ddpm-judge-1"


@dataclass
class JudgeConfig:
    data: str = ""  # shards folder with attributes (prepare_shards.py output)
    out: str = ""  # weights file (default SHARDS/judge.pt; judge.json is written beside it)
    width: int = 32  # channels of the first stage (doubled at each of the three downsamplings)
    epochs: int = 12  # passes over the training images
    batch_size: int = 64  # images per step
    lr: float = 2e-3  # AdamW peak learning rate (one-cycle schedule)
    max_images: int = 50000  # train on at most this many images (the first ones; shards are shuffled on disk)
    seed: int = 0  # initial weights, batch order and flips
    device: str = "auto"  # auto | cuda | cuda:N | cpu
    threads: int = 0  # intra-op CPU threads (0 = PyTorch's default, one per core)

    REQUIRED: ClassVar[tuple] = ("data",)
    BOUNDS: ClassVar[dict] = {"width": ">= 4", "epochs": ">= 1", "batch_size": ">= 2", "lr": "> 0",
                              "max_images": ">= 2", "seed": ">= 0", "threads": ">= 0"}


class JudgeError(UserError, ValueError):
    """Unusable shards or judge file: a one-line message naming it."""


class JudgeNet(nn.Module):
    """conv stem, three stride-2 stages (width, 2w, 4w, 8w channels), global average pool, one logit per attribute."""

    def __init__(self, num_attributes: int, width: int = 32):
        super().__init__()
        self.config = dict(num_attributes=int(num_attributes), width=int(width))

        def unit(i: int, o: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.SiLU()]

        w = width
        layers = unit(3, w)
        for i, o in ((w, 2 * w), (2 * w, 4 * w), (4 * w, 8 * w)):
            layers += unit(i, o, 2) + unit(o, o)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(8 * w, num_attributes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, S, S] in [-1, 1] -> [B, A] logits."""
        return self.head(self.features(x).mean(dim=(2, 3)))


@dataclass
class Judge:
    """A trained judge, ready to read attributes off images."""
    net: JudgeNet  # eval() mode, on its device
    attributes: list[str]
    image_size: int  # the size it was trained at; other sizes are resized to it
    balanced_accuracy: dict[str, float]  # on the held-out faces
    data_rate: dict[str, float]  # label rate in the training split
    judged_real_rate: dict[str, float]  # rate the judge reads on the held-out faces
    source: Path

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> [N, A] bool: the attributes the judge sees."""
        device = next(self.net.parameters()).device
        out = []
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size].to(device, torch.float32)
            if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
                x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                                  align_corners=False)
            out.append((self.net(x) > 0).cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.attributes), dtype=torch.bool)


# ------------------------------------------------------------------------------------------------ data

def read_split(data: str, split: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `limit` images of a split -> (uint8 [N, 3, S, S], int8 [N, A]), read with the training reader."""
    import data as data_mod  # the loaders (DALI) only for training the judge, not for loading one

    loader = data_mod.make_loader(data, 256, split=split, backend="torch", device="cpu", shuffle=False, flip=False,
                                  num_threads=0, verify=True)
    images, attrs, n = [], [], 0
    for batch in loader:
        take = min(limit - n, batch["image"].shape[0])
        images.append(((batch["image"][:take].float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        attrs.append(batch["attr"][:take].to(torch.int8))
        n += take
        if n >= limit:
            break
    return torch.cat(images), torch.cat(attrs)


def balanced_accuracy(pred: torch.Tensor, truth: torch.Tensor) -> list[float]:
    """Per column: (true-positive rate + true-negative rate) / 2; a column with one class only: its accuracy."""
    out = []
    for p, t in zip(pred.T.bool(), truth.T.bool()):
        rates = [float((p[t == c] == c).float().mean()) for c in (True, False) if bool((t == c).any())]
        out.append(sum(rates) / len(rates))
    return out


# ------------------------------------------------------------------------------------------------ train

def train(cfg: JudgeConfig) -> Judge:
    """Train a judge on cfg.data, save it (weights + judge.json) and return it."""
    config.check(cfg)
    set_threads(cfg.threads)
    console.print(f"[bold]judge[/] {dataclasses.asdict(cfg)}")
    manifest_path = Path(cfg.data) / MANIFEST
    if not manifest_path.is_file():
        raise JudgeError(f"{manifest_path}: no manifest here (make shards with prepare_shards.py)")
    manifest = read_manifest(cfg.data)
    names = list(manifest.get("attributes") or [])
    if not names:
        raise JudgeError(f"{manifest_path}: the shards have no attributes to judge")
    splits = manifest["splits"]
    if "train" not in splits or not splits["train"]["shards"]:
        raise JudgeError(f"{manifest_path}: no train split")
    out = Path(cfg.out) if cfg.out else Path(cfg.data) / "judge.pt"
    device = pick_device(cfg.device)

    t0 = time.perf_counter()
    has_valid = "valid" in splits and sum(int(s["count"]) for s in splits["valid"]["shards"]) > 0
    x_train, a_train = read_split(cfg.data, "train", cfg.max_images if has_valid else cfg.max_images * 10 // 9 + 1)
    if has_valid:
        x_val, a_val = read_split(cfg.data, "valid", max(2, cfg.max_images // 8))
        held_out = "valid split"
    else:
        cut = max(1, x_train.shape[0] // 10)
        x_train, a_train, x_val, a_val = x_train[:-cut], a_train[:-cut], x_train[-cut:], a_train[-cut:]
        held_out = f"last {cut} training images (the shards have no valid split)"
    if x_train.shape[0] < 2:
        raise JudgeError(f"{cfg.data}: fewer than 2 training images")
    size = int(x_train.shape[-1])
    console.print(f"{x_train.shape[0]} training and {x_val.shape[0]} held-out faces ({held_out}), {size} px, "
                  f"{len(names)} attributes, read in {time.perf_counter() - t0:.1f} s")

    # Positives weighted by negatives/positives (capped): the loss then aims at balanced accuracy.
    pos = a_train.float().mean(0)
    pos_weight = ((1 - pos) / pos.clamp(min=1e-3)).clamp(0.05, 50.0)
    torch.manual_seed(cfg.seed)
    net = JudgeNet(len(names), cfg.width).to(device)
    steps_per_epoch = max(1, x_train.shape[0] // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.15)
    gen = torch.Generator().manual_seed(cfg.seed)
    net.train()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console) as bar:
        task = bar.add_task("judge", total=total, info="")
        for epoch in range(cfg.epochs):
            order = torch.randperm(x_train.shape[0], generator=gen)
            running = 0.0
            for k in range(steps_per_epoch):
                idx = order[k * cfg.batch_size:(k + 1) * cfg.batch_size]
                x = x_train[idx].float() / 127.5 - 1
                flip = torch.rand(x.shape[0], generator=gen) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x).to(device)
                y = a_train[idx].float().to(device)
                loss = F.binary_cross_entropy_with_logits(net(x), y, pos_weight=pos_weight.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                running += float(loss.detach())
                bar.advance(task)
            bar.update(task, info=f"epoch {epoch + 1} loss {running / steps_per_epoch:.3f}")
    net.eval()

    judge = Judge(net, names, size, {}, {n: float(r) for n, r in zip(names, pos)}, {}, out)
    pred = judge.predict(x_val.float() / 127.5 - 1)
    judge.balanced_accuracy = dict(zip(names, balanced_accuracy(pred, a_val)))
    judge.judged_real_rate = {n: float(r) for n, r in zip(names, pred.float().mean(0))}
    valid_rate = {n: float(r) for n, r in zip(names, a_val.float().mean(0))}
    seconds = time.perf_counter() - t0

    report = {
        "format": JUDGE_FORMAT,
        "shards": str(Path(cfg.data).resolve()),
        "manifest_sha256": sha256_file(Path(cfg.data) / "manifest.json"),
        "image_size": size,
        "train_images": int(x_train.shape[0]),
        "held_out": held_out,
        "held_out_images": int(x_val.shape[0]),
        "seconds": round(seconds, 1),
        "config": dataclasses.asdict(cfg),
        "attributes": {n: {"balanced_accuracy": round(judge.balanced_accuracy[n], 4),
                           "data_rate": round(judge.data_rate[n], 4),
                           "held_out_rate": round(valid_rate[n], 4),
                           "judged_held_out_rate": round(judge.judged_real_rate[n], 4)} for n in names},
    }
    ckpt = {"format": JUDGE_FORMAT, "config": net.config, "attributes": names, "image_size": size,
            "state_dict": net.state_dict(), "report": report}
    with os_errors_as_write_error(out):
        atomic_save(out, ckpt)
    with os_errors_as_write_error(out.with_suffix(".json")):
        atomic_write(out.with_suffix(".json"), (json.dumps(report, indent=2) + "\n").encode())
    show(judge, valid_rate)
    console.print(f"[bold green]wrote {out} and {out.with_suffix('.json')}[/] ({seconds:.0f} s; mean balanced "
                  f"accuracy {np.mean(list(judge.balanced_accuracy.values())):.3f})")
    return judge


def show(judge: Judge, held_out_rate: dict[str, float]) -> None:
    table = Table(title="attribute judge: balanced accuracy on the held-out faces")
    for col in ("attribute", "balanced acc.", "data rate", "held-out rate", "judged on held-out"):
        table.add_column(col, justify="left" if col == "attribute" else "right")
    for n in judge.attributes:
        table.add_row(n, f"{judge.balanced_accuracy[n]:.3f}", f"{judge.data_rate[n]:.3f}",
                      f"{held_out_rate[n]:.3f}", f"{judge.judged_real_rate[n]:.3f}")
    console.print(table)


# ------------------------------------------------------------------------------------------------ load

def load_judge(path: str | Path, device: torch.device | str = "cpu") -> Judge:
    """A judge saved by train(); one-line JudgeError when the file is not one."""
    path = Path(path)
    if not path.is_file():
        raise JudgeError(f"{path}: no such judge file (train one with: python judge.py --data SHARDS)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # garbage bytes, a truncated zip, pickled code: whatever torch.load fails on, as utills does
        raise JudgeError(f"{path}: not a judge file ({config.one_line(e)[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != JUDGE_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else None
        raise JudgeError(f"{path}: not a judge file (format {found!r})")
    try:
        net = JudgeNet(**ckpt["config"])
        net.load_state_dict(ckpt["state_dict"])
        rep = ckpt["report"]["attributes"]
        names = list(ckpt["attributes"])
        return Judge(net.to(device).eval(), names, int(ckpt["image_size"]),
                     {n: float(rep[n]["balanced_accuracy"]) for n in names},
                     {n: float(rep[n]["data_rate"]) for n in names},
                     {n: float(rep[n]["judged_held_out_rate"]) for n in names}, path)
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise JudgeError(f"{path}: judge file is damaged ({config.one_line(e)[:200]})") from None


def cli(argv: list[str] | None = None) -> None:
    with config.user_errors():
        train(config.parse(JudgeConfig, argv)[0])


if __name__ == "__main__":
    cli(sys.argv[1:])

"""Exponential moving average of a model's parameters: a thin wrapper over torch-ema.

torch_ema.ExponentialMovingAverage does the averaging; this wrapper adds what training and sampling need around it:
the warm-up decay min(decay, (1 + n) / (10 + n)) switched by one flag, an update count kept even without warm-up,
a `state_dict` of plain values and tensors that round-trips exactly (and loads with `torch.load(weights_only=True)`),
and a context that swaps the averaged weights in and puts the trained ones back bit for bit.

    ema = EMA(model, decay=0.9999)
    ...; optimizer.step(); ema.update()
    with ema.sampling(model):  # the averaged weights, eval mode, the random states untouched afterwards
        images = diffusion.sample(model, ...)

Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2, Appendix
C; the maths follows their training/phema.py): `PowerEMA` tracks power-function EMA profiles of relative length
sigma_rel during training, updated from the images seen; train.py writes their snapshots to RUN/phema/snapshots; and
`reconstruct` (the command line below) combines the snapshots by least squares into the average of any other sigma_rel
at any snapshot's time, so the EMA length is chosen after training, by measuring:

    python ema.py --run RUN --sigma-rel 0.05,0.08,0.12 [--step S] [--export]   # -> RUN/phema/phema-0.0800-step-S.pt
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch_ema import ExponentialMovingAverage

from atomic import atomic_write
from config import UserError


class EMA:
    """EMA of `model.parameters()` (buffers are not averaged; our UNet has none that train).

    Args:
        model: the module whose parameters are tracked (the unwrapped one: DDP and torch.compile share its
            parameter tensors, so updates made through a wrapper are seen here).
        decay: the decay once warm-up is over.
        warmup: use min(decay, (1 + n) / (10 + n)) after n updates, so that early averages are not dominated by the
            random initialisation; False gives the plain `decay` from the first update.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        self.warmup = bool(warmup)
        self._names = [name for name, _ in model.named_parameters()]
        self._ema = ExponentialMovingAverage(model.parameters(), decay=decay, use_num_updates=self.warmup)
        # torch-ema only counts updates when it uses the count; we keep it always (logging, resume checks).
        self._num_updates = 0

    @property
    def decay(self) -> float:
        """The decay after warm-up."""
        return self._ema.decay

    @property
    def num_updates(self) -> int:
        """How many times `update()` has been called (restored by `load_state_dict`)."""
        return self._num_updates

    def update(self) -> None:
        """Fold the model's current parameters into the average; call after every optimizer step."""
        self._ema.update()
        self._num_updates += 1

    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the averaged weights into `model` (default: the tracked model), e.g. a fresh UNet for sampling."""
        if model is None:
            self._ema.copy_to()
            return
        names = [name for name, _ in model.named_parameters()]
        if names != self._names:
            raise ValueError(f"EMA.copy_to: the model's parameters ({len(names)}) do not match the EMA's "
                             f"({len(self._names)})")
        self._ema.copy_to(model.parameters())

    @contextlib.contextmanager
    def average_parameters(self) -> Iterator[None]:
        """Swap the averaged weights into the tracked model for the block; the trained weights come back exactly."""
        try:
            with self._ema.average_parameters():
                yield
        finally:
            # torch-ema keeps the stored copy after restoring; drop it so it is neither held in memory nor saved.
            self._ema.collected_params = None

    @contextlib.contextmanager
    def sampling(self, model: nn.Module) -> Iterator[None]:
        """Sample from the averaged weights in the middle of training without changing what training sees: the EMA
        weights swapped into `model` (the tracked module) in eval mode, and afterwards the trained weights, the mode and
        the global random states (the CPU's and the model's GPU's) put back as they were."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with self.average_parameters(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                yield
        finally:
            model.train(was_training)

    def state_dict(self) -> dict:
        """Plain values and a list of tensors (copies, so later updates do not change a dict being saved)."""
        return {
            "decay": self._ema.decay,
            "warmup": self.warmup,
            "num_updates": self._num_updates,
            "param_names": list(self._names),
            "shadow_params": [p.detach().clone() for p in self._ema.shadow_params],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a `state_dict()`; tensors are moved to the tracked parameters' device and dtype."""
        names = state_dict.get("param_names")
        if names is not None and list(names) != self._names:
            raise ValueError("EMA.load_state_dict: the saved parameter names do not match the model's")
        shadow = list(state_dict["shadow_params"])
        if len(shadow) != len(self._names):
            raise ValueError(f"EMA.load_state_dict: {len(shadow)} saved tensors for {len(self._names)} parameters")
        self.warmup = bool(state_dict.get("warmup", self.warmup))
        num_updates = int(state_dict["num_updates"] or 0)
        self._ema.load_state_dict({
            "decay": float(state_dict["decay"]),
            "num_updates": num_updates if self.warmup else None,
            "shadow_params": shadow,
            "collected_params": None,
        })
        self._num_updates = num_updates


# ------------------------------------------------------------------------------------------ post-hoc EMA (EDM2)
#
# A power-function EMA profile averages the weights theta_tau of the whole run so far with a weight that grows as
# tau^gamma: after t images, p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]. Its relative standard
# deviation (the width of the profile as a fraction of t) is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))
# (eq. 123), the quantity the paper (and --phema) names profiles by. Two tracked profiles, snapshotted every so often,
# span (in the least-squares sense) the profiles of every other sigma_rel at every snapshot's time. Time is counted in
# images seen (EDM2's nimg), so the profiles stay right when the batch size changes between starts.

SIGMA_REL_MAX = math.sqrt(1 / 12)  # sigma_rel of gamma = 0 (a flat average of the whole run): the largest one here
SNAPSHOT_KIND = "phema-snapshot"  # "kind" of a snapshot file written during training
AVERAGE_KIND = "phema"  # "kind" of a reconstructed file
AVERAGE_KINDS = (SNAPSHOT_KIND, AVERAGE_KIND)
PHEMA_FORMAT = 1
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# Above this condition number of the snapshots' Gram matrix A the float64 solve may lose more than 12 of its 16 digits:
# the coefficients' relative error (up to cond * 1.1e-16) reaches 1e-4, no longer small beside an fp16 snapshot's own
# rounding (2^-11 = 4.9e-4 relative). Measured for evenly spaced snapshots (ema.py's tests print the same): two
# profiles 0.05,0.10: cond 81 (3 snapshots), 1.1e3 (10), 5.9e5 (50), 1.0e7 (100), 2.8e9 (400), never near it; three
# profiles 0.05,0.10,0.15: 1.9e10 at 50 snapshots, 1.3e12 at 100, 6e15 at 400 (and coefficients up to 46): too close
# to each other to add information, so the warning names that.
COND_WARN = 1e12
# Above this relative error of the fitted profile the average is a visibly different profile from the one asked for
# (e.g. 0.20 from 3 evenly spaced snapshots of 0.05 and 0.10: 32%; from 16 of them: 2.3%; 0.03 from 16: 3.9%):
# snapshot more often, or track a profile nearer it.
FIT_WARN = 0.10


class PhemaError(UserError, ValueError):
    """A post-hoc EMA request that cannot be met (no snapshots, a sigma_rel out of range, a step without a
    snapshot): one line naming what is wrong."""


def gamma_to_sigma_rel(gamma: float | np.ndarray) -> np.ndarray:
    """sigma_rel of the power-function profile of exponent gamma (eq. 123)."""
    gamma = np.float64(gamma)
    return np.sqrt((gamma + 1) / (gamma + 2) ** 2 / (gamma + 3))


def sigma_rel_to_gamma(sigma_rel: float | np.ndarray) -> np.ndarray:
    """The exponent gamma of relative length sigma_rel (eq. 126, Algorithm 2): the largest real root of
    gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2)."""
    s = np.float64(sigma_rel)
    inv = s.reshape(-1) ** -2
    gamma = [np.roots([1.0, 7.0, 16.0 - v, 12.0 - v]).real.max() for v in inv]
    return np.float64(gamma).reshape(s.shape)


def check_sigma_rel(value: float, what: str = "sigma_rel") -> float:
    """`value` as a float in (0, SIGMA_REL_MAX); PhemaError otherwise."""
    value = float(value)
    if not 0 < value < SIGMA_REL_MAX:
        raise PhemaError(f"{what} {value:g}: out of range; a relative EMA length is in (0, {SIGMA_REL_MAX:.4f}) "
                         f"(0.05 to 0.20 are usual)")
    return value


def parse_sigma_rels(text: str, flag: str) -> list[float]:
    """"0.05,0.10" -> [0.05, 0.1], each checked and distinct as written in file names (4 decimals)."""
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise PhemaError(f"{flag} {text!r}: expected numbers separated by commas, e.g. 0.05,0.10") from None
    if not values:
        raise PhemaError(f"{flag}: give at least one sigma_rel, e.g. 0.05,0.10")
    values = [check_sigma_rel(v, flag) for v in values]
    if len({f"{v:.4f}" for v in values}) != len(values):
        raise PhemaError(f"{flag} {text!r}: repeats a value (to 4 decimals)")
    return values


def power_beta(gamma: float, t: float, delta: float) -> float:
    """The decay of a power-function profile's step from t - delta to t images (eq. 127): the average after t images
    is beta * (the one after t - delta) + (1 - beta) * the weights now. beta = 0 at the first step (t = delta)."""
    return float((1.0 - np.float64(delta) / np.float64(t)) ** (np.float64(gamma) + 1.0))


def profile_inner(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """<p_a, p_b>, the inner product of two power-function profiles (ending at t_a and t_b images) over time, in closed
    form (eq. 151, Algorithm 3); broadcasts."""
    t_ratio = t_a / t_b
    t_exp = np.where(t_a < t_b, gamma_b, -gamma_a)
    t_max = np.maximum(t_a, t_b)
    return (gamma_a + 1) * (gamma_b + 1) * t_ratio ** t_exp / ((gamma_a + gamma_b + 1) * t_max)


def solve_coefficients(t_in: Sequence[float], sigma_in: Sequence[float], t_out: Sequence[float] | float,
                       sigma_out: Sequence[float] | float) -> tuple[np.ndarray, float]:
    """The least-squares combination of the snapshot profiles (t_in, sigma_in) closest to each target profile
    (t_out, sigma_out), in float64 (Algorithm 3): solve A X = B with A_ij = <p_i, p_j> and B_ij = <p_i, q_j>, then
    normalise each column to sum 1 (a weight average stays an average). Returns X [snapshots, targets] and cond(A)."""
    t_in, sigma_in = np.broadcast_arrays(np.float64(t_in), np.float64(sigma_in))
    t_out, sigma_out = np.broadcast_arrays(np.float64(t_out), np.float64(sigma_out))
    g_in, g_out = sigma_rel_to_gamma(sigma_in), sigma_rel_to_gamma(sigma_out)
    col = lambda x: np.float64(x).reshape(-1, 1)  # noqa: E731
    row = lambda x: np.float64(x).reshape(1, -1)  # noqa: E731
    a = profile_inner(col(t_in), col(g_in), row(t_in), row(g_in))
    b = profile_inner(col(t_in), col(g_in), row(t_out), row(g_out))
    x = np.linalg.solve(a, b)
    return x / x.sum(axis=0, keepdims=True), float(np.linalg.cond(a))


def fit_error(t_in: Sequence[float], sigma_in: Sequence[float], t_out: float, sigma_out: float,
              coefficients: np.ndarray) -> float:
    """||sum_i c_i p_i - q|| / ||q||: how far the combination's profile is from the target's (0 = exact), in closed
    form from the same inner products."""
    g_in, g_out = sigma_rel_to_gamma(np.float64(sigma_in)), float(sigma_rel_to_gamma(sigma_out))
    t_in, c = np.float64(t_in), np.float64(coefficients)
    a = profile_inner(t_in[:, None], g_in[:, None], t_in[None, :], g_in[None, :])
    b = profile_inner(t_in, g_in, np.float64(t_out), g_out)
    qq = profile_inner(np.float64(t_out), g_out, np.float64(t_out), g_out)
    return float(np.sqrt(max(c @ a @ c - 2 * c @ b + qq, 0.0) / qq))


class PowerEMA:
    """Power-function EMA profiles of `model.parameters()`, one per sigma_rel (EDM2's PowerFunctionEMA, with time in
    images seen), kept beside the classic EMA.

        phema = PowerEMA(model, [0.05, 0.10])
        ...; optimizer.step(); images_seen += batch_size; phema.update(images_seen, batch_size)
        phema.write_snapshots(folder, model, step, ...)   # every N steps: one file per profile

    Before the first update the averages are the initial weights; the first update (beta = 0) makes them the weights
    after step 1, exactly as the closed form sum over tau of ((tau/k)^(gamma+1) - ((tau-1)/k)^(gamma+1)) theta_tau.
    """

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float]):
        self.sigma_rels = [check_sigma_rel(s, "--phema") for s in sigma_rels]
        if not self.sigma_rels:
            raise PhemaError("--phema: give at least one sigma_rel")
        self.gammas = [float(sigma_rel_to_gamma(s)) for s in self.sigma_rels]
        named = list(model.named_parameters())
        self._names = [name for name, _ in named]
        self._params = [p for _, p in named]
        self.averages = [[p.detach().clone() for p in self._params] for _ in self.sigma_rels]
        self.images_seen = 0  # at the last update
        self.num_updates = 0

    @torch.no_grad()
    def update(self, images_seen: int, batch_size: int) -> None:
        """Fold in the weights after a step that brought the run to `images_seen` images with `batch_size` of them."""
        if not 0 < batch_size <= images_seen:
            raise ValueError(f"PowerEMA.update: batch_size {batch_size} and images_seen {images_seen} (0 < b <= t)")
        params = [p.detach() for p in self._params]
        for gamma, average in zip(self.gammas, self.averages):
            torch._foreach_lerp_(average, params, 1.0 - power_beta(gamma, images_seen, batch_size))
        self.images_seen, self.num_updates = int(images_seen), self.num_updates + 1

    def averaged_state_dict(self, i: int, model: nn.Module, dtype: torch.dtype = torch.float32) -> dict:
        """Profile i as `model.state_dict()` (parameters averaged, buffers as the model's), on the CPU in `dtype`."""
        index = {name: k for k, name in enumerate(self._names)}
        out = {}
        for name, value in model.state_dict().items():
            value = self.averages[i][index[name]] if name in index else value
            value = value.detach().to("cpu", copy=True)
            out[name] = value.to(dtype) if value.is_floating_point() else value
        return out

    def write_snapshots(self, folder: str | os.PathLike, model: nn.Module, *, step: int, batch_size: int,
                        dtype: str = "fp16", meta: dict | None = None) -> list[Path]:
        """One file per profile, `folder/snapshot-{step:08d}-{sigma_rel:.4f}.pt`, each written atomically: the averaged
        weights ("model", a state dict) and the time they end at (step, images_seen), with `meta` (the configs that
        rebuild the model, so a snapshot also loads like a checkpoint)."""
        folder = Path(folder)
        paths = []
        for i, (sigma_rel, gamma) in enumerate(zip(self.sigma_rels, self.gammas)):
            snapshot = {"kind": SNAPSHOT_KIND, "phema_format": PHEMA_FORMAT, "step": int(step),
                        "images_seen": int(self.images_seen), "batch_size": int(batch_size),
                        "sigma_rel": sigma_rel, "gamma": gamma, "dtype": dtype, "averaged": list(self._names),
                        "model": self.averaged_state_dict(i, model, DTYPES[dtype]), **(meta or {})}
            path = folder / snapshot_name(step, sigma_rel)
            paths.append(atomic_write(path, lambda f, obj=snapshot: torch.save(obj, f)))
        from utills import remove_stale_temporaries  # noqa: PLC0415 (utills imports this module)

        remove_stale_temporaries(folder, ".snapshot-*.pt.tmp-*")  # left by a start killed mid-write
        return paths

    def state_dict(self) -> dict:
        """Plain values and lists of tensors (copies), for the checkpoint."""
        return {"sigma_rels": list(self.sigma_rels), "gammas": list(self.gammas), "param_names": list(self._names),
                "images_seen": self.images_seen, "num_updates": self.num_updates,
                "averages": [[t.detach().clone() for t in average] for average in self.averages]}

    def load_state_dict(self, state: dict) -> None:
        """Continue the profiles of a `state_dict()` exactly; they must be the same profiles of the same model."""
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels:
            raise PhemaError(f"--phema {','.join(f'{s:g}' for s in self.sigma_rels)}: the checkpoint tracks "
                             f"{','.join(f'{float(s):g}' for s in state['sigma_rels'])}; profiles cannot change "
                             f"during a run (drop --phema to keep the run's)")
        if list(state["param_names"]) != self._names:
            raise ValueError("PowerEMA.load_state_dict: the saved parameter names do not match the model's")
        for average, saved in zip(self.averages, state["averages"]):
            for t, s in zip(average, saved, strict=True):
                t.copy_(s)
        self.images_seen, self.num_updates = int(state["images_seen"]), int(state["num_updates"])


def snapshot_name(step: int, sigma_rel: float) -> str:
    return f"snapshot-{step:08d}-{sigma_rel:.4f}.pt"


def average_name(sigma_rel: float, step: int) -> str:
    return f"phema-{sigma_rel:.4f}-step-{step:08d}.pt"


def snapshot_bytes(model: nn.Module, dtype: str) -> int:
    """The size of one profile's snapshot file, near enough (the weights; the metadata is a few kB)."""
    itemsize = torch.finfo(DTYPES[dtype]).bits // 8
    return sum(v.numel() * (itemsize if v.is_floating_point() else v.element_size())
               for v in model.state_dict().values())


# ------------------------------------------------------------------------------------------ reconstruction


@dataclass
class Snapshot:
    """What a snapshot file says of itself (read without loading its weights)."""
    path: Path
    step: int
    images_seen: int
    sigma_rel: float
    batch_size: int


def read_snapshots(folder: str | os.PathLike) -> list[Snapshot]:
    """The snapshot files in `folder`, by time then sigma_rel; a file that does not load is one line naming it."""
    folder = Path(folder)
    found = []
    for path in sorted(folder.glob("snapshot-*.pt")) if folder.is_dir() else []:
        try:  # mmap: the metadata without reading the weights
            d = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise PhemaError(f"{path}: cannot be loaded ({str(e).splitlines()[0][:160] if str(e) else e!r})") from None
        if not isinstance(d, dict) or d.get("kind") != SNAPSHOT_KIND or "model" not in d:
            raise PhemaError(f"{path}: not a post-hoc EMA snapshot of train.py --phema")
        found.append(Snapshot(path, int(d["step"]), int(d["images_seen"]), float(d["sigma_rel"]),
                              int(d.get("batch_size", 0))))
    return sorted(found, key=lambda s: (s.images_seen, s.sigma_rel))


@dataclass
class Plan:
    """A reconstruction: the snapshots used, the target time and the coefficients [snapshots, targets]."""
    snapshots: list[Snapshot]
    step: int
    images_seen: int
    sigma_rels: list[float]
    coefficients: np.ndarray
    condition_number: float


def plan(snapshots: list[Snapshot], sigma_rels: Sequence[float], step: int | None = None,
         where: str = "the run") -> Plan:
    """The coefficients of the averages `sigma_rels` at snapshot step `step` (default: the last) from the snapshots up
    to that step."""
    if not snapshots:
        raise PhemaError(f"{where}: no post-hoc EMA snapshots (train with --phema 0.05,0.10 to write them)")
    steps = sorted({s.step for s in snapshots})
    step = steps[-1] if step is None or step < 0 else int(step)
    if step < steps[0]:
        raise PhemaError(f"--step {step}: before the first snapshot (step {steps[0]})")
    if step not in steps:
        shown = ", ".join(map(str, steps if len(steps) <= 8 else steps[:3] + ["..."] + steps[-3:]))
        raise PhemaError(f"--step {step}: no snapshot at that step (snapshots at steps {shown})")
    used = [s for s in snapshots if s.step <= step]
    t_out = max(s.images_seen for s in used if s.step == step)
    sigma_rels = [check_sigma_rel(s, "--sigma-rel") for s in sigma_rels]
    x, cond = solve_coefficients([s.images_seen for s in used], [s.sigma_rel for s in used], t_out, sigma_rels)
    return Plan(used, step, t_out, sigma_rels, x, cond)


@torch.no_grad()
def combine(p: Plan, progress=None) -> list[dict]:
    """The averaged state dicts of the plan's targets: sum_i X_ij * snapshot_i, accumulated in float64, stored as
    float32 (values that are not averaged, e.g. integer buffers, as in the last snapshot). `progress(i)` after each
    snapshot read."""
    sums: list[dict] = [{} for _ in p.sigma_rels]
    rest: dict = {}
    for i, snap in enumerate(p.snapshots):
        d = torch.load(snap.path, map_location="cpu", weights_only=True)
        averaged = set(d.get("averaged", []))
        for name, value in d["model"].items():
            if name not in averaged or not value.is_floating_point():
                rest[name] = value.clone()
                continue
            value = value.double()
            for j, out in enumerate(sums):
                term = value * float(p.coefficients[i, j])
                out[name] = term if name not in out else out[name].add_(term)
        if progress is not None:
            progress(i)
    return [{**{k: v.float() for k, v in out.items()}, **rest} for out in sums]


@dataclass
class PhemaConfig:
    run: str = ""  # the run folder (RUN/phema/snapshots, written by train.py --phema)
    sigma_rel: str = ""  # relative EMA lengths to reconstruct, comma-separated, each in (0, 0.2887): 0.05,0.08,0.12
    step: int = -1  # the snapshot step to reconstruct at (-1: the last snapshot); uses the snapshots up to it
    out: str = ""  # output folder (default RUN/phema)
    export: bool = False  # also write each as .safetensors (weights and configs only)

    REQUIRED: ClassVar[tuple] = ("run", "sigma_rel")


def reconstruct(run: str | os.PathLike, sigma_rels: Sequence[float], step: int | None = None,
                out: str | os.PathLike | None = None, export: bool = False, log=print,
                reuse: bool = False) -> list[Path]:
    """Reconstruct the averages `sigma_rels` of run `run` at snapshot step `step` into files that load like a
    checkpoint (`out`/phema-SIGMA-step-STEP.pt); prints the coefficients and the system's condition number.
    reuse: keep an existing output file made from the same snapshots (evaluate.py --phema-sweep's reruns)."""
    from rich.table import Table  # noqa: PLC0415 (the command line's needs)

    from utills import load_model, run_paths  # noqa: PLC0415 (utills imports this module)

    paths = run_paths(run)
    if not paths.root.is_dir():
        raise PhemaError(f"--run {run}: no such run folder")
    p = plan(read_snapshots(paths.phema_snapshots), sigma_rels, step, where=str(paths.phema_snapshots))
    table = Table(title=f"post-hoc EMA at step {p.step} ({p.images_seen} images) from {len(p.snapshots)} snapshots",
                  show_edge=False)
    for name in ("snapshot step", "images", "sigma_rel", *[f"-> {s:.4f}" for s in p.sigma_rels]):
        table.add_column(name, justify="right")
    for i, s in enumerate(p.snapshots):
        table.add_row(str(s.step), str(s.images_seen), f"{s.sigma_rel:.4f}",
                      *[f"{p.coefficients[i, j]:+.6f}" for j in range(len(p.sigma_rels))])
    log(table)
    t_in, s_in = [s.images_seen for s in p.snapshots], [s.sigma_rel for s in p.snapshots]
    fits = [fit_error(t_in, s_in, p.images_seen, s, p.coefficients[:, j]) for j, s in enumerate(p.sigma_rels)]
    for j, sigma_rel in enumerate(p.sigma_rels):
        c = p.coefficients[:, j]
        log(f"-> {sigma_rel:.4f}: largest |coefficient| {np.abs(c).max():.3f}, sum |coefficient| {np.abs(c).sum():.3f} "
            f"(how much the snapshots' own rounding is amplified), profile fit error {fits[j]:.2%}")
        if fits[j] > FIT_WARN:
            log(f"warning: sigma_rel {sigma_rel:.4f} is poorly represented by these snapshots (profile fit error "
                f"{fits[j]:.0%} > {FIT_WARN:.0%}): snapshot more often, or track a profile nearer it")
    log(f"condition number of the snapshots' Gram matrix: {p.condition_number:.3g}")
    if p.condition_number > COND_WARN:
        log(f"warning: condition number {p.condition_number:.3g} > {COND_WARN:.0e}: the coefficients may have lost "
            f"precision in the float64 solve (snapshots too close in time and sigma_rel?)")
    first = torch.load(p.snapshots[-1].path, map_location="cpu", weights_only=True, mmap=True)
    meta = {k: first[k] for k in ("model_config", "diffusion_config", "image_size", "attributes", "embedding", "config",
                                  "versions") if k in first}
    folder = Path(out) if out else paths.phema
    sources = [{"file": s.path.name, "step": s.step, "images_seen": s.images_seen, "sigma_rel": s.sigma_rel}
               for s in p.snapshots]
    kept = {j for j, s in enumerate(p.sigma_rels) if reuse and made_from(folder / average_name(s, p.step), sources)}
    todo = Plan(p.snapshots, p.step, p.images_seen, [s for j, s in enumerate(p.sigma_rels) if j not in kept],
                p.coefficients[:, [j for j in range(len(p.sigma_rels)) if j not in kept]], p.condition_number)
    written = [folder / average_name(s, p.step) for j, s in enumerate(p.sigma_rels) if j in kept]
    for path in written:
        log(f"reused: {path}")
    for sigma_rel, state, coefficients in zip(todo.sigma_rels, combine(todo) if todo.sigma_rels else [],
                                              todo.coefficients.T):
        average = {"kind": AVERAGE_KIND, "phema_format": PHEMA_FORMAT, "step": p.step, "images_seen": p.images_seen,
                   "sigma_rel": sigma_rel, "gamma": float(sigma_rel_to_gamma(sigma_rel)), "model": state,
                   "coefficients": [float(c) for c in coefficients],
                   "snapshots": sources,
                   "condition_number": p.condition_number, "max_abs_coefficient": float(np.abs(coefficients).max()),
                   "fit_error": fits[p.sigma_rels.index(sigma_rel)],
                   **meta}
        path = atomic_write(folder / average_name(sigma_rel, p.step), lambda f, obj=average: torch.save(obj, f))
        written.append(path)
        log(f"sigma_rel {sigma_rel:.4f}: {path}")
        if export:
            from utills import export_safetensors  # noqa: PLC0415

            exported = export_safetensors(load_model(path), path.with_suffix(".safetensors"))
            log(f"  exported: {exported}")
    return written


def made_from(path: Path, sources: list[dict]) -> bool:
    """Whether `path` is a reconstruction that loads and was made from exactly these snapshots."""
    try:
        d = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return isinstance(d, dict) and d.get("kind") == AVERAGE_KIND and d.get("snapshots") == sources


def main(cfg: PhemaConfig) -> list[Path]:
    from rich.console import Console  # noqa: PLC0415

    console = Console(highlight=False)
    sigma_rels = parse_sigma_rels(cfg.sigma_rel, "--sigma-rel")
    return reconstruct(cfg.run, sigma_rels, cfg.step, cfg.out or None, cfg.export, log=console.print)


if __name__ == "__main__":
    import config

    with config.user_errors():
        main(config.parse(PhemaConfig, description="Reconstruct post-hoc EMA averages of a run "
                                                   "(train.py --phema) for any sigma_rel")[0])

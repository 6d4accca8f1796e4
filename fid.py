"""FID and KID: the distances between feature sets, their running statistics, and the reference statistics of a
shards folder, shared by evaluate.py and train.py (the feature networks are in inception.py).

Why our own code rather than torch-fidelity or clean-fid: both import torchvision, and the torchvision wheel that
matches our torch 2.13 (PyPI's torchvision 0.28.0) is built against CUDA torch: its `_C.so` links libtorch_cuda.so,
so `import torchvision` fails under the CPU torch that these machines and CI run. The maths follows them exactly:

- FID (Heusel et al. 2017), as pytorch-fid / clean-fid / torch-fidelity compute it: ||mu1 - mu2||^2
  + Tr(S1 + S2 - 2 sqrtm(S1 S2)) on float64 mean and covariance (ddof 1), retrying with eps*I added to both
  covariances when sqrtm is not finite, and keeping the real part of sqrtm.
- KID (Binkowski et al. 2018), as torch-fidelity computes it: the unbiased MMD^2 estimate with the polynomial kernel
  k(x, y) = (x.y / d + 1)^3, over `subsets` random subsets of `subset_size` features from each set (clamped to the
  smaller set, as clean-fid does), drawn by np.random.RandomState(seed); reported as mean and std over subsets.

The reference images are read through data.make_loader with every shard's sha256 checked (a damaged shard is an
error, never a short set); their statistics are cached under ~/.cache/celeba-ddpm/ref-stats keyed by the shards'
checksums, the split, the count, kid_max and the feature network's identity (file name and sha256), so evaluate.py
and the training-time evaluation share one cache entry. TrainingFID is the training-time evaluation: FID and KID of a
fixed set of EMA samples (DDIM, fixed noise) at a few steps, cheap enough to follow a run's progress.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

import inception
from atomic import atomic_write
from config import UserError
from data import DataError, ShardReadError, make_loader
from grids import to_uint8
from inception import FeatureNet
from manifest import MANIFEST, read_manifest
from utills import os_errors_as_write_error

REF_KID_MAX = 10000  # reference features kept for KID (evaluate.py's default, so both share the cached statistics)


class EvalError(UserError, ValueError):
    """Bad evaluation input (unknown metric, missing manifest, size mismatch): a one-line message."""


class MetricsError(UserError, ValueError):
    """Features that cannot give a metric (too few, mismatched sizes, non-finite): a one-line message."""


# ------------------------------------------------------------------------------------------------ the distances

def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """FID between N(mu1, sigma1) and N(mu2, sigma2); mu [D], sigma [D, D] (float64)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MetricsError(f"fid: statistics of different sizes ({mu1.shape[0]} vs {mu2.shape[0]} features)")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product (fewer images than features) warns; handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            # As the reference implementations: retry with eps * I added to both covariances.
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise MetricsError(f"fid: sqrtm has a large imaginary part ({np.max(np.abs(covmean.imag)):.3g})")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def polynomial_mmd2(f1: np.ndarray, f2: np.ndarray, degree: int = 3, coef0: float = 1.0) -> float:
    """Unbiased MMD^2 between two equally sized feature sets [m, D] with k(x, y) = (x.y / D + coef0)^degree."""
    m = f1.shape[0]
    gamma = 1.0 / f1.shape[1]
    k_xx = (f1 @ f1.T * gamma + coef0) ** degree
    k_yy = (f2 @ f2.T * gamma + coef0) ** degree
    k_xy = (f1 @ f2.T * gamma + coef0) ** degree
    sum_xx = k_xx.sum() - np.diagonal(k_xx).sum()
    sum_yy = k_yy.sum() - np.diagonal(k_yy).sum()
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID (mean, std) over `subsets` random subsets; f1 [N1, D], f2 [N2, D]."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if f1.shape[1] != f2.shape[1]:
        raise MetricsError(f"kid: features of different sizes ({f1.shape[1]} vs {f2.shape[1]})")
    m = min(f1.shape[0], f2.shape[0], subset_size)
    if m < 2:
        raise MetricsError(f"kid: needs at least 2 features per set, got {f1.shape[0]} and {f2.shape[0]}")
    rng = np.random.RandomState(seed)
    mmds = np.array([polynomial_mmd2(f1[rng.choice(len(f1), m, replace=False)],
                                     f2[rng.choice(len(f2), m, replace=False)]) for _ in range(subsets)])
    return float(mmds.mean()), float(mmds.std())


@dataclass
class FeatureStats:
    """Running float64 mean and covariance of a feature stream, keeping the first `keep` rows for KID."""
    keep: int = 10000
    count: int = 0
    total: np.ndarray | None = None  # [D] sum of features
    outer: np.ndarray | None = None  # [D, D] sum of outer products
    kept: list[np.ndarray] | None = None

    def add(self, feats: np.ndarray) -> None:
        """feats [B, D]."""
        feats = np.asarray(feats, np.float64)
        if not np.isfinite(feats).all():
            raise MetricsError("features: non-finite values from the feature network")
        if self.total is None:
            self.total, self.outer, self.kept = np.zeros(feats.shape[1]), np.zeros((feats.shape[1],) * 2), []
        self.count += len(feats)
        self.total += feats.sum(0)
        self.outer += feats.T @ feats
        room = self.keep - sum(len(k) for k in self.kept)
        if room > 0:
            self.kept.append(feats[:room].astype(np.float32))

    @property
    def mu(self) -> np.ndarray:
        return self.total / self.count

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance (as np.cov(features, rowvar=False))."""
        if self.count < 2:
            raise MetricsError(f"features: a covariance needs at least 2 images, got {self.count}")
        mu = self.mu
        return (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)

    @property
    def features(self) -> np.ndarray:
        return np.concatenate(self.kept) if self.kept else np.zeros((0, 0), np.float32)

    def to_bytes(self) -> bytes:
        """The raw sums (so statistics read back are bit-identical) and the kept features, as .npz bytes."""
        buf = io.BytesIO()
        np.savez(buf, count=self.count, total=self.total, outer=self.outer, features=self.features, keep=self.keep)
        return buf.getvalue()

    @classmethod
    def from_npz(cls, path: Path) -> FeatureStats:
        """Stats saved by to_bytes."""
        with np.load(path) as z:
            return cls(keep=int(z["keep"]), count=int(z["count"]), total=z["total"], outer=z["outer"],
                       kept=[z["features"]])


# ------------------------------------------------------------------------------------------------ reference statistics


def reference_loaders(shards: Path, split: str, batch_size: int) -> list:
    """Loaders over the split(s) in manifest order, through the same indexed reader as training; every shard's
    sha256 is checked against the manifest first, so a damaged or rewritten shard is an error, never a short or
    silently different reference set."""
    names = ["train", "valid", "test"] if split == "all" else [split]
    manifest = read_manifest(shards)
    return [make_loader(shards, batch_size, split=name, backend="torch", device="cpu", shuffle=False, flip=False,
                        num_threads=0, verify=True) for name in names if name in manifest["splits"] or split != "all"]


def reference_images(loaders: list, limit: int) -> Iterator[np.ndarray]:
    """uint8 [H, W, 3] pictures of the loaders' samples, in order, at most `limit` (0: all)."""
    given = 0
    for loader in loaders:
        for batch in loader:
            # The loader gives x / 127.5 - 1 of the decoded uint8 pixels; this inverts it exactly.
            pictures = ((batch["image"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            for picture in pictures.numpy():
                yield picture
                given += 1
                if limit and given >= limit:
                    return


def batched(pictures: Iterator[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Stack a stream of [H, W, 3] pictures into [B, H, W, 3] batches."""
    batch: list[np.ndarray] = []
    for p in pictures:
        batch.append(p)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def feature_stats(pictures: Iterator[np.ndarray], net: FeatureNet, batch_size: int, keep: int,
                  advance: Callable[[int], None] = lambda n: None) -> FeatureStats:
    """Features of a picture stream -> running mean/covariance (+ the first `keep` features); `advance(n)` reports
    progress."""
    stats = FeatureStats(keep=keep)
    for batch in batched(pictures, batch_size):
        stats.add(net(batch))
        advance(len(batch))
    return stats


def reference_stats(shards: str | Path, split: str, net: FeatureNet, image_size: int, *, batch_size: int = 64,
                    ref_max: int = 0, kid_max: int = REF_KID_MAX, cache_dir: str | Path = "",
                    log: Callable[[str], None] = print,
                    compute: Callable[[Iterator[np.ndarray], int], FeatureStats] | None = None
                    ) -> tuple[FeatureStats, dict]:
    """Statistics of the reference split, from the cache when these shards (by their verified checksums), this split
    and this feature network were done before. `compute(pictures, count)` replaces the plain feature_stats (evaluate.py
    passes one with a progress bar)."""
    shards = Path(shards)
    try:
        loaders = reference_loaders(shards, split, batch_size)
    except FileNotFoundError as e:
        if not (shards / MANIFEST).is_file():
            raise EvalError(f"{shards}: no manifest.json (not a prepare_shards output folder)") from None
        raise EvalError(str(e)) from None
    except DataError as e:
        raise EvalError(str(e)) from None
    if loaders[0].image_size != image_size:
        raise EvalError(f"{shards}: reference images are {loaders[0].image_size} px but the model makes "
                        f"{image_size} px; shard the data at --size {image_size}")
    count = sum(loader.num_samples for loader in loaders)
    count = min(count, ref_max) if ref_max else count
    checksums = [s["sha256"] for loader in loaders for s in loader.shards]
    info = {"shards": str(shards), "split": split, "count": count, "feature_network": net.name,
            "kid_max": kid_max, "shards_sha256": hashlib.sha256("".join(checksums).encode()).hexdigest()}
    key = hashlib.sha256(json.dumps({k: v for k, v in info.items() if k != "shards"}, sort_keys=True).encode())
    cache = Path(cache_dir) if cache_dir else inception.cache_root() / "ref-stats"
    path = cache / f"ref-{key.hexdigest()[:24]}.npz"
    if path.is_file():
        try:
            stats = FeatureStats.from_npz(path)
            log(f"reference statistics from cache {path}")
            return stats, {**info, "cache": str(path)}
        except (OSError, ValueError, KeyError) as e:
            log(f"warning: {path}: unreadable cache ({e}); computing again")
    pictures = reference_images(loaders, count)
    try:
        stats = compute(pictures, count) if compute else feature_stats(pictures, net, batch_size, kid_max)
    except ShardReadError as e:
        raise EvalError(str(e)) from None
    if stats.count != count:  # never a silently short reference set
        raise EvalError(f"{shards}: read {stats.count} reference images of split {split!r}, the manifest lists "
                        f"{count}")
    with os_errors_as_write_error(path):
        atomic_write(path, stats.to_bytes())
    return stats, {**info, "cache": str(path)}


def scores(gen: FeatureStats, ref: FeatureStats, wanted: tuple[str, ...] | list[str] = ("fid", "kid"),
           kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0) -> dict:
    """{"fid", "kid_mean", "kid_std", "kid_subsets", "kid_subset_size"} (those asked for) of generated vs reference."""
    result: dict = {}
    if "fid" in wanted:
        result["fid"] = frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma)
    if "kid" in wanted:
        mean, std = kernel_inception_distance(gen.features, ref.features, kid_subsets, kid_subset_size, seed)
        result.update(kid_mean=mean, kid_std=std, kid_subsets=kid_subsets,
                      kid_subset_size=min(kid_subset_size, len(gen.features), len(ref.features)))
    return result


class TrainingFID:
    """FID and KID of `n` EMA samples (`sampler`, DDIM by default, with `steps` steps and its default spacing, the same
    noise every time) against the training shards' cached statistics; keeps the best FID so far. Rank 0 only; the
    global random states are left untouched."""

    def __init__(self, shards: str | Path, image_size: int, channels: int, n: int, steps: int, seed: int,
                 device: torch.device, batch_size: int = 64, ref_max: int = 0, log: Callable[[str], None] = print,
                 sampler: str = "ddim"):
        # The feature network first: without it, stop before the first training step rather than at the first eval.
        self.net = inception.load_feature_net("inception", device=device)
        self.ref, self.ref_info = reference_stats(shards, "train", self.net, image_size, batch_size=batch_size,
                                                  ref_max=ref_max, log=log)
        self.n, self.steps, self.batch_size, self.seed, self.sampler = n, steps, batch_size, seed, sampler
        self.noise = torch.randn((n, channels, image_size, image_size), generator=torch.Generator().manual_seed(seed))

    @torch.inference_mode()
    def __call__(self, model: torch.nn.Module, ema, diffusion, amp) -> dict:
        """{"fid", "kid", "kid_std", "eval_n", "eval_s"} of the EMA weights; the model keeps its mode."""
        t0 = time.perf_counter()
        device = next(model.parameters()).device
        gen = FeatureStats(keep=self.n)
        with ema.sampling(model), amp:
            for i in range(0, self.n, self.batch_size):
                noise = self.noise[i:i + self.batch_size].to(device)
                x = diffusion.sample(model, tuple(noise.shape), sampler=self.sampler, steps=min(self.steps,
                                     diffusion.num_timesteps), noise=noise)
                gen.add(self.net(to_uint8(x)))
        out = scores(gen, self.ref, seed=self.seed, kid_subsets=100, kid_subset_size=1000)
        fid = out["fid"] if math.isfinite(out["fid"]) else None
        return {"fid": fid, "kid": out["kid_mean"], "kid_std": out["kid_std"], "eval_n": self.n,
                "eval_s": time.perf_counter() - t0}

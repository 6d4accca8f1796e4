"""The Gaussian diffusion: noise schedule, training loss and the DDPM, DDIM and DPM-Solver++(2M) samplers.

Notation follows DDPM (Ho et al. 2020) and improved-diffusion: beta_t the per-step noise variance, alpha_t = 1 - beta_t,
alpha_bar_t = prod_{s<=t} alpha_s, and
    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),
with t an index in 0..T-1 (index 0 is the first noising step). The schedule lives in float64 buffers; all maths runs
in float32 or float64 outside autocast, and only the model call runs in the caller's precision.

The model is any callable `model(x_t, t, cond=...)` returning a tensor shaped like x_t: the predicted noise eps, the
velocity v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0, or x_0 itself, depending on `objective`. The timestep
passed to it is always the original index in 0..T-1, also when a sampler uses fewer steps.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import track
from torch import nn

from config import ConfigError

Model = Callable[..., torch.Tensor]

SCHEDULES = ("linear", "cosine")
OBJECTIVES = ("eps", "v", "x0")
SAMPLERS = ("ddim", "ddpm", "dpm++2m")
# Which timesteps a sampler with fewer steps than T visits (make_timesteps); the last three are diffusers' names.
SPACINGS = ("uniform", "quadratic", "linspace", "leading", "trailing")
# Each sampler's spacing when none is given: DDPM's and DDIM's as before; for DPM-Solver++ diffusers' default, which
# starts at T - 1 and spaces the steps evenly to the end (uniform's last step, from t = T/steps to t = 0, is a long step
# in lambda that the second-order extrapolation handles badly: measured in tests/test_dpm_solver.py).
DEFAULT_SPACING = {"ddpm": "uniform", "ddim": "uniform", "dpm++2m": "linspace"}
# Whether each sampler clamps its x0 predictions to [-1, 1] when not told (GaussianDiffusion.sample says why).
DEFAULT_CLIP = {"ddpm": True, "ddim": True, "dpm++2m": False}


def linear_betas(timesteps: int) -> np.ndarray:
    """DDPM's linear schedule, 1e-4 to 0.02 over 1000 steps, scaled by 1000/T so other T keep the same endpoints."""
    scale = 1000.0 / timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)


def cosine_alpha_bar(u: np.ndarray | float, s: float = 0.008) -> np.ndarray:
    """Nichol and Dhariwal's cosine alpha_bar at time u in [0, 1]: f(u) / f(0), f(u) = cos^2(pi/2 (u + s) / (1 + s))."""
    f = lambda v: np.cos((np.asarray(v, dtype=np.float64) + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(u) / f(0.0)


def cosine_betas(timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """beta_t = 1 - alpha_bar((t+1)/T) / alpha_bar(t/T), clipped at max_beta to avoid a singularity at the end."""
    u = np.arange(timesteps + 1, dtype=np.float64) / timesteps
    abar = cosine_alpha_bar(u)
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


def make_timesteps(timesteps: int, steps: int, spacing: str = "uniform") -> np.ndarray:
    """The original timesteps a `steps`-step sampler visits, ascending, int64 (it then goes on to alpha_bar = 1).

    "uniform": round(i * T / steps), i = 0..steps-1 (DDIM's range(0, T, T // steps) when steps divides T);
    "quadratic": int(linspace(0, sqrt(0.8 T), steps)^2) as in the DDIM code, where the first few would repeat (near
    0) each is bumped to one past its predecessor, so there are exactly `steps` distinct timesteps (fewer only when
    steps is so large that they would pass T - 1).
    "linspace", "leading", "trailing": exactly the timesteps of diffusers' DPMSolverMultistepScheduler.set_timesteps
    with its class defaults (steps_offset 0, lambda_min_clipped -inf; Lin et al. 2023, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", table 2). For T = 1000 and 10 steps, visited from noise to data:
        uniform    900 800 700 600 500 400 300 200 100   0
        quadratic  800 632 483 355 246 158  88  39   9   0
        linspace   999 899 799 699 599 500 400 300 200 100
        leading    900 810 720 630 540 450 360 270 180  90
        trailing   999 899 799 699 599 499 399 299 199  99
    Only "linspace" and "trailing" start at T - 1 (the noisiest step, where x_T ~ N(0, I) is nearly exact); only
    "uniform" and "quadratic" end at t = 0. "trailing": numpy's float arange gives one extra step for some counts
    (e.g. 61 of 1000: ..., 15, -1), which diffusers would pass to the model as timestep -1; it is dropped here.
    "linspace" and "leading" would repeat timesteps at steps = T, so they take at most T - 1 steps.
    """
    if spacing not in SPACINGS:
        raise ConfigError(f"diffusion: unknown spacing {spacing!r} (choose from {', '.join(SPACINGS)})")
    if not 1 <= steps <= timesteps:
        raise ConfigError(f"diffusion: steps must be in 1..{timesteps}, got {steps}")
    if spacing == "uniform":
        ts = np.round(np.arange(steps) * (timesteps / steps))
    elif spacing == "quadratic":
        ts = (np.linspace(0, math.sqrt(timesteps * 0.8), steps) ** 2).astype(np.int64)
        for i in range(1, len(ts)):
            ts[i] = max(ts[i], ts[i - 1] + 1)
    else:
        # diffusers' expressions, verbatim in numpy (with T = num_train_timesteps = last_timestep).
        if spacing == "linspace":
            ts = np.linspace(0, timesteps - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        elif spacing == "leading":
            ts = (np.arange(0, steps + 1) * (timesteps // (steps + 1))).round()[::-1][:-1].astype(np.int64)
        else:
            ts = np.arange(timesteps, 0, -(timesteps / steps)).round().astype(np.int64) - 1
            ts = ts[ts >= 0]
        if len(np.unique(ts)) != steps:
            raise ConfigError(f"diffusion: spacing {spacing!r} repeats timesteps at {steps} steps of {timesteps}; "
                              f"choose at most {timesteps - 1} steps")
        return np.sort(ts)
    return np.unique(np.minimum(ts.astype(np.int64), timesteps - 1))


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard normal float32 noise on `device` from `generator` (drawn on the generator's device if it differs)."""
    if generator is None or generator.device == device:
        return torch.randn(shape, generator=generator, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) float32 draws on `device` from `generator`, as _randn."""
    if generator is None or generator.device == device:
        return torch.rand(shape, generator=generator, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Switch autocast off for the maths that follows (it is a no-op where autocast is not running)."""
    if device.type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _sample_device(model: Model, *tensors: torch.Tensor | None) -> torch.device | None:
    """Where to sample: the model's (first parameter's) device, else that of the first given tensor, else None."""
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    for x in tensors:
        if x is not None:
            return x.device
    return None


@dataclass
class Draws:
    """A training batch's random inputs (GaussianDiffusion.draws): timesteps t [B], noise [B, C, H, W], the rows
    trained unconditionally [B] and the free attributes [B, D] (None where not drawn)."""
    t: torch.Tensor
    noise: torch.Tensor
    drop: torch.Tensor | None = None
    free: torch.Tensor | None = None

    def rows(self, rows: slice) -> "Draws":
        return Draws(*(None if v is None else v[rows] for v in (self.t, self.noise, self.drop, self.free)))


class GaussianDiffusion(nn.Module):
    """Forward process, loss and samplers for one noise schedule; `GaussianDiffusion(**d.config)` rebuilds it.

    timesteps: T, the number of noising steps; schedule: "linear" or "cosine"; objective: what the model predicts,
    "eps", "v" or "x0"; min_snr_gamma: if set, weight the loss by Hang et al.'s min-SNR-gamma (e.g. 5.0).
    """

    def __init__(self, timesteps: int = 1000, schedule: str = "linear", objective: str = "eps",
                 min_snr_gamma: float | None = None):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ConfigError(f"diffusion: unknown schedule {schedule!r} (choose from {', '.join(SCHEDULES)})")
        if objective not in OBJECTIVES:
            raise ConfigError(f"diffusion: unknown objective {objective!r} (choose from {', '.join(OBJECTIVES)})")
        if timesteps < 2:
            raise ConfigError(f"diffusion: timesteps must be >= 2, got {timesteps}")
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ConfigError(f"diffusion: min_snr_gamma must be > 0, got {min_snr_gamma}")
        self.config: dict[str, Any] = dict(timesteps=int(timesteps), schedule=schedule, objective=objective,
                                           min_snr_gamma=None if min_snr_gamma is None else float(min_snr_gamma))
        self.num_timesteps = int(timesteps)
        self.objective = objective
        self.min_snr_gamma = min_snr_gamma

        betas = linear_betas(timesteps) if schedule == "linear" else cosine_betas(timesteps)
        if betas.max() >= 1.0:  # the scaled linear schedule ends at 20 / T
            raise ConfigError(f"diffusion: the {schedule} schedule needs timesteps > 20, got {timesteps}")
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance) (DDPM eq. 6-7).
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        buffers = dict(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
            posterior_variance=posterior_variance,
            # The variance is 0 at t=0; its log is clipped to the t=1 value (improved-diffusion).
            posterior_log_variance_clipped=np.log(np.append(posterior_variance[1:2], posterior_variance[1:])),
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
            snr=alphas_cumprod / (1.0 - alphas_cumprod),
        )
        # Derived from the config, so not saved in state dicts; float64 so the products above stay exact.
        for name, value in buffers.items():
            self.register_buffer(name, torch.from_numpy(value), persistent=False)

    # ------------------------------------------------------------------------------------------------ helpers

    @staticmethod
    def _timesteps(t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
        """t as a long [B] tensor on x's device (an int or a 0-d tensor is broadcast over the batch of x)."""
        t = torch.as_tensor(t, device=x.device).long()
        return t.expand(x.shape[0]) if t.ndim == 0 else t.to(x.device)

    @classmethod
    def _extract(cls, values: torch.Tensor, t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
        """values[t] as [B, 1, ..., 1] to broadcast against x, float32 (float64 when x is float64).

        values: [T] float64 buffer, t: [B] long (or a scalar), x: [B, ...].
        """
        t = cls._timesteps(t, x)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        out = values.to(x.device)[t].to(dtype)
        return out.reshape(t.shape[0], *([1] * (x.ndim - 1)))

    def _alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar at indices t [B] (float64), with alpha_bar = 1 at index -1 (the clean data)."""
        ab = self.alphas_cumprod.to(t.device)
        return torch.where(t >= 0, ab[t.clamp(min=0)], torch.ones_like(ab[:1]))

    # --------------------------------------------------------------------------------------- forward process

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0): sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise. x0, noise: [B, ...], t: [B]."""
        if noise is None:
            noise = torch.randn_like(x0, dtype=torch.float32)
        with _no_autocast(x0.device):
            x0 = x0.float() if x0.dtype != torch.float64 else x0
            return (self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
                    + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise.to(x0.dtype))

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean [B, ...], variance and log variance [B, 1, ...] of q(x_{t_prev} | x_t, x_0).

        t_prev defaults to t - 1 (the trained chain, from the precomputed buffers). A respaced sampler passes its
        previous visited step instead (-1 for the clean data); the formula is then DDPM's posterior for the two-step
        chain with alpha = alpha_bar_t / alpha_bar_prev, which is what recomputing the betas of the respaced schedule
        gives (improved-diffusion's SpacedDiffusion).
        """
        x0 = x0.float() if x0.dtype != torch.float64 else x0
        xt = xt.to(x0.dtype)
        if t_prev is None:
            mean = (self._extract(self.posterior_mean_coef1, t, xt) * x0
                    + self._extract(self.posterior_mean_coef2, t, xt) * xt)
            return (mean, self._extract(self.posterior_variance, t, xt),
                    self._extract(self.posterior_log_variance_clipped, t, xt))
        t, t_prev = self._timesteps(t, xt), self._timesteps(t_prev, xt)
        ab, ab_prev = self._alpha_bar(t), self._alpha_bar(t_prev)
        alpha = ab / ab_prev
        coef1 = ab_prev.sqrt() * (1.0 - alpha) / (1.0 - ab)
        coef2 = alpha.sqrt() * (1.0 - ab_prev) / (1.0 - ab)
        var = (1.0 - alpha) * (1.0 - ab_prev) / (1.0 - ab)
        shape = (t.shape[0],) + (1,) * (xt.ndim - 1)
        as_x = lambda v: v.to(xt.dtype).reshape(shape)  # noqa: E731
        log_var = torch.log(var.clamp(min=1e-20))
        return as_x(coef1) * x0 + as_x(coef2) * xt, as_x(var), as_x(log_var)

    # ----------------------------------------------------------------------- conversions between predictions

    def predict_x0_from_eps(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)."""
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, xt) * xt
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps)

    def predict_eps_from_x0(self, xt: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(alpha_bar) x0) / sqrt(1 - alpha_bar)."""
        return ((self._extract(self.sqrt_recip_alphas_cumprod, t, xt) * xt - x0)
                / self._extract(self.sqrt_recipm1_alphas_cumprod, t, xt))

    def predict_v(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The velocity target v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans and Ho 2022)."""
        return (self._extract(self.sqrt_alphas_cumprod, t, x0) * eps
                - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0)

    def predict_x0_from_v(self, xt: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v."""
        return (self._extract(self.sqrt_alphas_cumprod, t, xt) * xt
                - self._extract(self.sqrt_one_minus_alphas_cumprod, t, xt) * v)

    def predict_x0(self, output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 from the model's output under this diffusion's objective."""
        if self.objective == "eps":
            return self.predict_x0_from_eps(xt, t, output)
        if self.objective == "v":
            return self.predict_x0_from_v(xt, t, output)
        return output

    def training_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the model should output for x_t = q_sample(x0, t, noise) under this objective."""
        if self.objective == "eps":
            return noise
        if self.objective == "v":
            return self.predict_v(x0, t, noise)
        return x0

    # --------------------------------------------------------------------------------------- the model's side

    def model_output(self, model: Model, xt: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                     guidance: float = 1.0) -> torch.Tensor:
        """The model's float32 output for x_t [B, ...] at original timesteps t [B].

        With `cond` and guidance != 1, classifier-free guidance: one batched forward of the conditional rows and the
        null rows (cond = -1), combined as null + guidance * (cond - null).
        """
        if cond is not None and guidance != 1.0:
            both = model(torch.cat([xt, xt]), torch.cat([t, t]), cond=torch.cat([cond, torch.full_like(cond, -1)]))
            out_c, out_u = both.float().chunk(2)
            return out_u + guidance * (out_c - out_u)
        return model(xt, t, cond=cond).float()

    def p_mean_variance(
        self,
        model: Model,
        xt: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None = None,
        clip_denoised: bool = True,
        guidance: float = 1.0,
        t_prev: torch.Tensor | None = None,
        variance: str = "fixed_small",
    ) -> dict[str, torch.Tensor]:
        """The reverse step p(x_{t_prev} | x_t) = q(x_{t_prev} | x_t, x0_hat), x0_hat predicted by the model.

        xt: [B, ...], t: [B] original timesteps, t_prev: previous visited timesteps (default t - 1).
        variance: "fixed_small" (the posterior variance, the lower bound) or "fixed_large" (beta, the upper bound).
        Returns "mean", "variance", "log_variance", "pred_x0" and "pred_eps" (the eps consistent with the possibly
        clipped x0), all float32.
        """
        if variance not in ("fixed_small", "fixed_large"):
            raise ConfigError(f"diffusion: unknown variance {variance!r} (choose fixed_small or fixed_large)")
        t = self._timesteps(t, xt)
        t_prev = t - 1 if t_prev is None else self._timesteps(t_prev, xt)
        output = self.model_output(model, xt, t, cond, guidance)
        with _no_autocast(xt.device):
            xt = xt.float()
            pred_x0 = self.predict_x0(output, xt, t)
            if clip_denoised:
                pred_x0 = pred_x0.clamp(-1.0, 1.0)
            pred_eps = self.predict_eps_from_x0(xt, t, pred_x0)
            mean, var, log_var = self.q_posterior_mean_variance(pred_x0, xt, t, t_prev)
            if variance == "fixed_large":
                # beta of the (possibly respaced) step; at the last step no noise is added, so its value is moot.
                beta = 1.0 - self._alpha_bar(t) / self._alpha_bar(t_prev)
                var = beta.float().reshape(var.shape)
                log_var = torch.log(var.clamp(min=1e-20))
        return dict(mean=mean, variance=var, log_variance=log_var, pred_x0=pred_x0, pred_eps=pred_eps)

    # ------------------------------------------------------------------------------------------------- loss

    def draws(self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
              cond_dim: int = 0, p_uncond: float = 0.0, p_free: float = 0.0, free_dim: int | None = None) -> Draws:
        """The random inputs of a training batch of `shape` [B, C, H, W], in one fixed order from `generator`: t,
        the noise, then (with cond_dim) the unconditional rows (p_uncond) and the free attributes (p_free).
        free_dim: how many of the cond_dim columns are attributes that can be left free (default all); the others (a
        reference embedding and its flag, unet.py) are only dropped with their row.

        train.py draws them for the whole global batch from a generator seeded by (seed, step) and each rank keeps its
        rows, so a step's randomness is the same on any number of ranks (and micro-batches)."""
        b = shape[0]
        t = torch.randint(0, self.num_timesteps, (b,), generator=generator,
                          device=generator.device if generator is not None else device).to(device)
        noise = _randn(tuple(shape), generator, device)
        drop = free = None
        if cond_dim and p_uncond > 0:
            drop = _rand((b,), generator, device) < p_uncond
        if cond_dim and p_free > 0:  # drawn only when asked, so that two-state runs keep their noise stream
            some = _rand((b, 1), generator, device) < p_free
            rate = _rand((b, 1), generator, device)
            free = some & (_rand((b, cond_dim if free_dim is None else free_dim), generator, device) < rate)
        return Draws(t, noise, drop, free)

    def loss(self, model: Model, x0: torch.Tensor, cond: torch.Tensor | None = None, p_uncond: float = 0.0,
             generator: torch.Generator | None = None, p_free: float = 0.0, draws: Draws | None = None,
             free_dim: int | None = None) -> torch.Tensor:
        """Mean over the batch of the (min-SNR weighted) MSE between model output and target at uniform t.

        x0: [B, C, H, W] data in [-1, 1]; cond: optional [B, D] 0/1 attributes, each row replaced by -1 (null, all
        unknown) with probability p_uncond for classifier-free guidance; generator: for t, noise and the dropout draws.
        p_free (three-state models): the probability that a row leaves some of its attributes free (-1): the row draws
        a rate r ~ U(0, 1) and each attribute is then unknown with probability r, independently, so every number of
        known attributes (0..D) is equally likely and "Eyeglasses=1, the rest free" is a case the model has seen.
        draws: the batch's random inputs drawn beforehand (self.draws(...), sliced); then generator, p_uncond and
        p_free are not used. free_dim: the attributes among cond's columns (see draws). The model call runs under the
        caller's autocast; the target and the squared error in float32.
        """
        device = x0.device
        if draws is None:
            draws = self.draws(tuple(x0.shape), generator, device, cond.shape[1] if cond is not None else 0,
                               p_uncond, p_free, free_dim)
        t, noise = draws.t, draws.noise
        if cond is not None and draws.drop is not None:
            cond = torch.where(draws.drop[:, None], torch.full_like(cond, -1), cond)
        if cond is not None and draws.free is not None:
            free = draws.free
            if free.shape[1] < cond.shape[1]:  # the reference embedding after the attributes is never left free
                free = F.pad(free, (0, cond.shape[1] - free.shape[1]), value=False)
            cond = torch.where(free, torch.full_like(cond, -1), cond)
        xt = self.q_sample(x0, t, noise)
        output = model(xt, t, cond=cond)
        with _no_autocast(device):
            target = self.training_target(x0.float(), t, noise)
            mse = F.mse_loss(output.float(), target, reduction="none").flatten(1).mean(1)
            if self.min_snr_gamma is not None:
                mse = mse * self._min_snr_weight(t)
            return mse.mean()

    def _min_snr_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weights [B] (Hang et al. 2023), per objective so each equals min(SNR, gamma) on x0's error."""
        snr = self.snr.to(t.device)[t]
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.objective == "eps":
            w = clipped / snr
        elif self.objective == "v":
            w = clipped / (snr + 1.0)
        else:
            w = clipped
        return w.float()

    # ---------------------------------------------------------------------------------------------- samplers

    @torch.no_grad()
    def sample(
        self,
        model: Model,
        shape: tuple[int, ...],
        sampler: str = "ddim",
        steps: int | None = 50,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        cond: torch.Tensor | None = None,
        guidance: float = 1.0,
        clip_denoised: bool | None = None,
        progress: bool = False,
        return_trajectory: bool = False,
        noise: torch.Tensor | None = None,
        spacing: str | None = None,
        variance: str = "fixed_small",
        callback: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Generate samples [B, C, H, W] from x_T ~ N(0, I) (or `noise`), float32.

        sampler "ddpm": ancestral sampling, over all T steps when steps == T (or None), else over `steps` respaced
        timesteps with the betas recomputed for them; `variance` "fixed_small" or "fixed_large".
        sampler "ddim": `steps` timesteps, eta = 0 deterministic to 1 (DDPM-like).
        sampler "dpm++2m": DPM-Solver++(2M) (Lu et al. 2022), the deterministic multistep second-order solver of the
        probability-flow ODE in data prediction, as diffusers' DPMSolverMultistepScheduler with its defaults.
        spacing: which timesteps the respaced samplers visit (SPACINGS, make_timesteps; None: DEFAULT_SPACING, "uniform"
        for ddpm/ddim and "linspace" for dpm++2m); every chain then ends at the clean data (alpha_bar = 1). The model
        is called once per visited timestep (twice the rows with guidance).
        clip_denoised: clamp each predicted x0 to [-1, 1]; None means on for ddpm/ddim (as their papers' code) and off
        for dpm++2m: the solver extrapolates from the last two x0 predictions, and a clamp makes x0 a non-smooth
        function of t that breaks the second-order step (and with it the match with diffusers, whose thresholding is
        off by default); a well-trained model's x0 stays in range where it matters, near the end of the chain.
        cond [B, D] with guidance != 1: classifier-free guidance. All noise comes from `generator`, so a generator in a
        given state gives the same samples. Put the model in eval() first. With return_trajectory, also returns
        the x0 predictions [B, C, H, W] at about 8 evenly spaced steps (the last is the final sample's).
        callback(i, t, x, pred_x0): called after step i (from timestep t) with the new x and that step's x0 prediction.
        """
        if sampler not in SAMPLERS:
            raise ConfigError(f"diffusion: unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
        if not 0.0 <= eta <= 1.0:
            raise ConfigError(f"diffusion: eta must be in [0, 1], got {eta}")
        if noise is not None and tuple(noise.shape) != tuple(shape):
            raise ValueError(f"diffusion: noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
        if cond is not None and cond.shape[0] != shape[0]:
            raise ValueError(f"diffusion: cond has {cond.shape[0]} rows for a batch of {shape[0]}")
        if clip_denoised is None:
            clip_denoised = DEFAULT_CLIP[sampler]
        spacing = DEFAULT_SPACING[sampler] if spacing is None else spacing
        device = _sample_device(model, noise, cond) or self.betas.device
        steps = self.num_timesteps if steps is None else steps
        timesteps = make_timesteps(self.num_timesteps, steps, spacing)[::-1].copy()
        prev_timesteps = np.append(timesteps[1:], -1)

        x = noise.to(device=device, dtype=torch.float32) if noise is not None else _randn(tuple(shape), generator,
                                                                                           device)
        if cond is not None:
            cond = cond.to(device)
        n = len(timesteps)
        keep = set(np.round(np.linspace(0, n - 1, min(8, n))).astype(int).tolist())
        trajectory: list[torch.Tensor] = []
        solver = DPMSolverPP2M(self.alphas_cumprod, timesteps) if sampler == "dpm++2m" else None
        steps_iter = track(range(n), description=f"{sampler} {n} steps", disable=not progress, transient=True)
        for i in steps_iter:
            t = torch.full((shape[0],), int(timesteps[i]), device=device, dtype=torch.long)
            t_prev = torch.full_like(t, int(prev_timesteps[i]))
            out = self.p_mean_variance(model, x, t, cond, clip_denoised, guidance, t_prev, variance)
            pred_x0 = out["pred_x0"]
            with _no_autocast(device):
                last = i == n - 1
                if solver is not None:
                    x = solver.step(i, x, pred_x0)
                elif sampler == "ddpm":
                    x = out["mean"]
                    if not last:
                        x = x + out["variance"].sqrt() * _randn(tuple(shape), generator, device)
                else:
                    x = self._ddim_step(x, t, t_prev, out, eta, generator, last)
            if callback is not None:
                callback(i, int(timesteps[i]), x, pred_x0)
            if return_trajectory and i in keep:
                trajectory.append(pred_x0.clone())
        return (x, trajectory) if return_trajectory else x

    def _ddim_step(self, x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, out: dict[str, torch.Tensor],
                   eta: float, generator: torch.Generator | None, last: bool) -> torch.Tensor:
        """One DDIM update x_t -> x_{t_prev} (Song et al. 2021, eq. 12), sigma = eta * the DDPM posterior std."""
        ab, ab_prev = self._alpha_bar(t), self._alpha_bar(t_prev)
        sigma = eta * torch.sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev))
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        ab_prev, sigma = ab_prev.float().reshape(shape), sigma.float().reshape(shape)
        x_next = ab_prev.sqrt() * out["pred_x0"] + (1.0 - ab_prev - sigma**2).clamp(min=0).sqrt() * out["pred_eps"]
        if eta > 0 and not last:
            x_next = x_next + sigma * _randn(tuple(x.shape), generator, x.device)
        return x_next


class DPMSolverPP2M:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", algorithm 2, the midpoint form), stepping through the visited
    timesteps of one chain: x_{s0} -> x_t with the data predictions m0 = x0(x_{s0}) and m1 = x0(x_{s1}) of this step
    and the one before,
        h = lambda_t - lambda_s0,  h_0 = lambda_s0 - lambda_s1,  r0 = h_0 / h,  lambda = log(alpha / sigma),
        x_t = (sigma_t / sigma_s0) x_s0 - alpha_t (e^-h - 1) (m0 + (m0 - m1) / (2 r0)),
    with alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar). The first step (no m1 yet) and the last (to
    alpha_bar = 1, sigma = 0: lambda is infinite there) are first order, x_t = (sigma_t / sigma_s0) x_s0 - alpha_t
    (e^-h - 1) m0, which is DDIM with eta = 0; this is diffusers' DPMSolverMultistepScheduler with solver_order 2,
    lower_order_final and final_sigmas_type "zero". The coefficients are computed in float64 from the model's own
    alpha_bar and applied to the float32 sample; -alpha_t (e^-h - 1) is written alpha_t - alpha_s0 sigma_t / sigma_s0,
    which stays finite at sigma_t = 0.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, timesteps: np.ndarray):
        ab = alphas_cumprod.detach().double().cpu().numpy()
        # alpha_bar at the visited timesteps (descending) and at the end of the chain, the clean data.
        abar = np.append(ab[np.asarray(timesteps, dtype=np.int64)], 1.0)
        self.alpha, self.sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
        with np.errstate(divide="ignore"):
            self.lam = np.log(self.alpha) - np.log(self.sigma)  # +inf at the end
        self.n = len(timesteps)
        self.prev_x0: torch.Tensor | None = None

    def coefficients(self, i: int) -> tuple[float, float, float]:
        """(a, b0, b1) of step i: x_next = a x + b0 m0 + b1 m1 (b1 = 0 for a first-order step)."""
        a = self.sigma[i + 1] / self.sigma[i]
        c = self.alpha[i + 1] - self.alpha[i] * a  # = -alpha_t (e^-h - 1)
        if i == 0 or i == self.n - 1:
            return float(a), float(c), 0.0
        h, h_0 = self.lam[i + 1] - self.lam[i], self.lam[i] - self.lam[i - 1]
        half_over_r0 = 0.5 * h / h_0
        return float(a), float(c * (1.0 + half_over_r0)), float(-c * half_over_r0)

    def step(self, i: int, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """x at the next visited timestep (or the clean data after the last), float32."""
        a, b0, b1 = self.coefficients(i)
        x_next = a * x.float() + b0 * x0
        if b1 != 0.0:
            x_next = x_next + b1 * self.prev_x0
        self.prev_x0 = x0
        return x_next

"""DPM-Solver++(2M) and the timestep spacings: against diffusers' DPMSolverMultistepScheduler step by step, against
the exact probability-flow ODE solution on Gaussian data, and against the project's own DDIM."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import diffusion as D
from config import ConfigError
from diffusion import GaussianDiffusion, make_timesteps

torch.set_num_threads(1)
diffusers = pytest.importorskip("diffusers")

DIFFUSERS_SPACINGS = ("linspace", "leading", "trailing")
PREDICTION_TYPE = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def scheduler(d: GaussianDiffusion, spacing: str, steps: int):
    """diffusers' scheduler with its class defaults, on this diffusion's own betas and objective."""
    s = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=d.num_timesteps, trained_betas=d.betas.numpy(),
                                              prediction_type=PREDICTION_TYPE[d.objective], timestep_spacing=spacing)
    s.set_timesteps(steps)
    return s


def gaussian_model(d: GaussianDiffusion, mu: float, s: float, bend: float = 0.0):
    """The optimal denoiser of data N(mu, s^2 I) under d's objective (exact in float64; output float32).

    E[x0 | x_t] = mu + a s^2 / (a^2 s^2 + sigma^2) (x_t - a mu), a = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t).
    bend > 0 adds a smooth nonlinearity (no longer optimal: a generic model for the step-by-step comparisons).
    With cond (rows of 0/1), the conditional rows' mean moves by 0.3 * cond, so guidance changes the result.
    """
    ab = d.alphas_cumprod

    def model(x, t, cond=None):
        a = ab[t].sqrt().view(-1, 1, 1, 1)
        sig = (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
        m = torch.full_like(a, mu)
        if cond is not None:
            m = m + 0.3 * torch.where(cond[:, :1] < 0, 0.0, cond[:, :1].double()).view(-1, 1, 1, 1)
        xd = x.double()
        x0 = m + a * s**2 / (a**2 * s**2 + sig**2) * (xd - a * m)
        x0 = x0 + bend * torch.tanh(xd) * sig
        if d.objective == "eps":
            out = (xd - a * x0) / sig
        elif d.objective == "v":
            out = a * (xd - a * x0) / sig - sig * x0
        else:
            out = x0
        return out.float()

    return model


def exact_solution(d: GaussianDiffusion, mu: float, s: float, x_start: torch.Tensor, t_start: int) -> torch.Tensor:
    """The probability-flow ODE's solution at alpha_bar = 1 from x at timestep t_start, for data N(mu, s^2 I).

    The marginals are N(a mu, (a^2 s^2 + sigma^2) I) and the flow is an increasing map in each coordinate, so it is the
    affine map between them: x_0 = mu + s (x_t - a mu) / sqrt(a^2 s^2 + sigma^2)."""
    ab = d.alphas_cumprod[t_start]
    a, sig2 = ab.sqrt(), 1 - ab
    return mu + s * (x_start.double() - a * mu) / (a**2 * s**2 + sig2).sqrt()


# ----------------------------------------------------------------------------------------------------- timesteps

@pytest.mark.parametrize("spacing", DIFFUSERS_SPACINGS)
def test_spacings_visit_diffusers_timesteps(spacing: str):
    for T in (1000, 500, 100, 37):
        d = GaussianDiffusion(T, "linear")
        for steps in sorted({1, 2, 3, 5, 7, 10, 15, 20, 25, 50, 61, 100, T - 1} & set(range(1, T))):
            theirs = scheduler(d, spacing, steps).timesteps.numpy()
            ours = make_timesteps(T, steps, spacing)[::-1]
            # numpy's float arange gives "trailing" an extra timestep -1 for some counts (1000: 61): dropped here.
            assert list(ours) == [t for t in theirs if t >= 0], (T, steps)
            assert len(ours) == steps


def test_spacings_for_ten_steps_as_documented():
    table = {"uniform": [900, 800, 700, 600, 500, 400, 300, 200, 100, 0],
             "quadratic": [800, 632, 483, 355, 246, 158, 88, 39, 9, 0],
             "linspace": [999, 899, 799, 699, 599, 500, 400, 300, 200, 100],
             "leading": [900, 810, 720, 630, 540, 450, 360, 270, 180, 90],
             "trailing": [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]}
    assert set(table) == set(D.SPACINGS)
    for spacing, visited in table.items():
        assert list(make_timesteps(1000, 10, spacing)[::-1]) == visited
        assert " ".join(f"{t:3d}" for t in visited) in D.make_timesteps.__doc__


def test_spacing_errors_are_one_line():
    with pytest.raises(ConfigError, match="repeats timesteps at 1000 steps of 1000; choose at most 999 steps"):
        make_timesteps(1000, 1000, "linspace")
    with pytest.raises(ConfigError, match="repeats timesteps"):
        make_timesteps(50, 50, "leading")
    assert len(make_timesteps(50, 50, "trailing")) == 50  # trailing reaches t = 0 at steps = T
    with pytest.raises(ConfigError, match="unknown spacing 'karras'"):
        make_timesteps(1000, 10, "karras")


# ----------------------------------------------------------------------------------- step by step vs diffusers

def compare_with_diffusers(schedule: str, objective: str, spacing: str, steps: int, T: int = 1000,
                           guidance: float = 1.0, batch: int = 3) -> float:
    """The largest difference over all steps between our chain and diffusers', relative to the values' scale and to
    the conditioning of the eps objective's x0 = (x - sigma eps) / alpha at the first step (1 / alpha: 157 at t = 999
    of the linear schedule, ~1e4 for the cosine one, where float32 loses that many digits in both codes); also checks
    that the model is called once per step, at the same timesteps."""
    torch.manual_seed(steps)
    d = GaussianDiffusion(T, schedule, objective)
    model = gaussian_model(d, 0.2, 0.6, bend=0.3)
    noise = torch.randn(batch, 3, 4, 4)
    cond = torch.tensor([[float(i % 2)] for i in range(batch)]) if guidance != 1 else None
    calls, ours = [], []

    def recording(x, t, cond=None):
        calls.append((int(t[0]), x[:batch].clone()))
        return model(x, t, cond)

    d.sample(recording, noise.shape, sampler="dpm++2m", steps=steps, spacing=spacing, noise=noise, cond=cond,
             guidance=guidance, callback=lambda i, t, x, x0: ours.append(x.clone()))
    sch = scheduler(d, spacing, steps)
    x, theirs, their_t = noise.clone(), [], []
    for t in sch.timesteps:
        if int(t) < 0:
            break  # diffusers' extra "trailing" timestep (see make_timesteps); compared only where both step
        out = d.model_output(model, x, torch.full((batch,), int(t)), cond, guidance)
        x = sch.step(out, t, x).prev_sample
        theirs.append(x.clone())
        their_t.append(int(t))
    assert [t for t, _ in calls] == their_t and len(ours) == len(theirs) == steps
    if len(sch.timesteps) > steps:  # diffusers' step from our last timestep goes on to its extra one, ours to the data
        ours, theirs = ours[:-1], theirs[:-1]
    scale = max(1.0, max(float(v.abs().max()) for v in theirs))
    if objective == "eps":
        scale /= float(d.alphas_cumprod[their_t[0]].sqrt())
    return max(float((a - b).abs().max()) for a, b in zip(ours, theirs)) / scale


@pytest.mark.parametrize("objective", D.OBJECTIVES)
@pytest.mark.parametrize("schedule", D.SCHEDULES)
def test_trajectory_matches_diffusers_step_by_step(schedule: str, objective: str):
    for spacing in DIFFUSERS_SPACINGS:
        for steps in (1, 2, 3, 10, 15, 20):
            err = compare_with_diffusers(schedule, objective, spacing, steps)
            # diffusers works in float32 throughout (its alpha_bar too); ours takes float64 coefficients. Measured:
            # < 7e-7 in every case here.
            assert err < 5e-6, (spacing, steps, err)


@pytest.mark.parametrize("T, steps, spacing, guidance, batch", [
    (1000, 7, "linspace", 3.0, 3),     # guidance, odd steps
    (1000, 25, "trailing", 1.0, 1),    # a batch of one; more than 15 steps (diffusers' lower_order_final limit)
    (400, 13, "leading", 2.0, 2),      # another T
    (1000, 61, "trailing", 1.0, 2),    # the count where diffusers' trailing has an extra -1 at the end
    (50, 49, "linspace", 1.0, 2),      # steps = T - 1: every timestep but 0
])
def test_trajectory_matches_diffusers_other_settings(T, steps, spacing, guidance, batch):
    assert compare_with_diffusers("linear", "eps", spacing, steps, T=T, guidance=guidance, batch=batch) < 5e-6


# -------------------------------------------------------------------------------- convergence on Gaussian data

def errors_against_exact(schedule: str, objective: str, sampler: str, spacing: str, steps_list) -> list[float]:
    torch.manual_seed(0)
    d = GaussianDiffusion(1000, schedule, objective)
    mu, s = 0.3, 0.5
    model = gaussian_model(d, mu, s)
    noise = torch.randn(64, 3, 4, 4)
    out = []
    for steps in steps_list:
        t_start = int(make_timesteps(1000, steps, spacing)[-1])
        x = d.sample(model, noise.shape, sampler=sampler, steps=steps, spacing=spacing, noise=noise,
                     clip_denoised=False)
        out.append(float((x.double() - exact_solution(d, mu, s, noise, t_start)).pow(2).mean().sqrt()))
    return out


@pytest.mark.parametrize("schedule", D.SCHEDULES)
def test_second_order_convergence_to_the_exact_ode_solution(schedule: str):
    """From 10 to 20 to 40 steps (diffusers' default linspace spacing) DPM-Solver++(2M)'s error against the exact
    solution falls by >= 3x per doubling and DDIM's by ~2x (first order). Measured (eps objective; v and x0 agree to
    2 digits): linear  DPM++ 9.7e-2 -> 2.3e-2 -> 1.8e-3 (4.2x, 12.9x), DDIM 1.3e-1 -> 6.9e-2 -> 3.6e-2 (1.9x, 1.9x);
    cosine DPM++ 2.5e-2 -> 1.9e-3 -> 5.8e-4 (13.0x, 3.3x), DDIM (1.9x, 2.0x). Beyond 40 steps the last, first-order
    jump to alpha_bar = 1 and the integer timesteps limit the order (80 steps: 2.4x, 2.2x), so nothing is asserted
    there; with "uniform" spacing the long step in lambda from t = T/steps to t = 0 makes the second-order step a poor
    extrapolation at 10 steps (linear: DPM++ 1.9e-1, DDIM 1.3e-1), which is why dpm++2m defaults to linspace."""
    for objective in D.OBJECTIVES:
        solver = errors_against_exact(schedule, objective, "dpm++2m", "linspace", (10, 20, 40))
        ddim = errors_against_exact(schedule, objective, "ddim", "linspace", (10, 20, 40))
        for i in range(2):
            assert solver[i] / solver[i + 1] >= 3.0, (objective, solver)
            assert 1.7 <= ddim[i] / ddim[i + 1] <= 2.3, (objective, ddim)
        assert all(a < b for a, b in zip(solver, ddim)), (solver, ddim)


def test_convergence_to_the_exact_solution_with_many_steps():
    # The exact solution is right: both samplers close in on it (DPM++ at 999 linspace steps within 2e-4).
    solver = errors_against_exact("linear", "eps", "dpm++2m", "linspace", (999,))
    ddim = errors_against_exact("linear", "eps", "ddim", "uniform", (1000,))
    assert solver[0] < 3e-4 and ddim[0] < 2e-3


# ------------------------------------------------------------------------------------ first order = DDIM, eta 0

@pytest.mark.parametrize("spacing", D.SPACINGS)
@pytest.mark.parametrize("objective", D.OBJECTIVES)
def test_first_order_steps_are_ddim_with_eta_zero(spacing: str, objective: str):
    """Steps 1 and 2 are first order only (the first step, and the last to alpha_bar = 1): the whole chain is the
    project's DDIM (eta 0, no clipping) on the same timesteps; so is the first step of every longer chain."""
    torch.manual_seed(1)
    d = GaussianDiffusion(1000, "linear", objective)
    model = gaussian_model(d, 0.1, 0.7, bend=0.5)
    noise = torch.randn(2, 3, 4, 4)
    for steps in (1, 2):
        a = d.sample(model, noise.shape, sampler="dpm++2m", steps=steps, spacing=spacing, noise=noise)
        b = d.sample(model, noise.shape, sampler="ddim", steps=steps, spacing=spacing, noise=noise,
                     clip_denoised=False)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    first: dict[str, torch.Tensor] = {}
    for sampler in ("dpm++2m", "ddim"):
        d.sample(model, noise.shape, sampler=sampler, steps=10, spacing=spacing, noise=noise, clip_denoised=False,
                 callback=lambda i, t, x, x0, sampler=sampler: first.setdefault(sampler, x.clone()))
    torch.testing.assert_close(first["dpm++2m"], first["ddim"], rtol=1e-5, atol=1e-5)


def test_solver_coefficients():
    """The update's coefficients against the DPM-Solver++ paper's expressions in lambda, in float64."""
    d = GaussianDiffusion(1000, "cosine")
    ts = make_timesteps(1000, 10, "linspace")[::-1].copy()
    solver = D.DPMSolverPP2M(d.alphas_cumprod, ts)
    ab = np.append(d.alphas_cumprod.numpy()[ts], 1.0)
    alpha, sigma = np.sqrt(ab), np.sqrt(1 - ab)
    lam = np.log(alpha[:-1] / sigma[:-1])
    for i in range(len(ts)):
        a, b0, b1 = solver.coefficients(i)
        if i == len(ts) - 1:  # to sigma = 0: x_0 is the data prediction itself
            assert (a, b0, b1) == (0.0, 1.0, 0.0)
            continue
        h = lam[i + 1] - lam[i]
        assert math.isclose(a, sigma[i + 1] / sigma[i], rel_tol=1e-12)
        c = -alpha[i + 1] * np.expm1(-h)
        if i == 0:
            assert math.isclose(b0, c, rel_tol=1e-9) and b1 == 0.0
        else:
            r0 = (lam[i] - lam[i - 1]) / h
            assert math.isclose(b0, c * (1 + 0.5 / r0), rel_tol=1e-9)
            assert math.isclose(b1, -c * 0.5 / r0, rel_tol=1e-9)


# ----------------------------------------------------------------------------------------------- the edges

def test_guidance_calls_the_model_once_per_step_with_both_halves():
    d = GaussianDiffusion(1000, "linear", "v")
    model = gaussian_model(d, 0.0, 0.5)
    seen = []

    def recording(x, t, cond=None):
        seen.append((x.shape[0], None if cond is None else cond.tolist()))
        return model(x, t, cond)

    cond = torch.tensor([[1.0]])
    x = d.sample(recording, (1, 3, 4, 4), sampler="dpm++2m", steps=5, cond=cond, guidance=2.0,
                 generator=torch.Generator().manual_seed(0))
    assert seen == [(2, [[1.0], [-1.0]])] * 5 and torch.isfinite(x).all()
    # Guidance moves the result along the conditional direction (cond shifts the data mean by 0.3).
    plain = d.sample(model, (1, 3, 4, 4), sampler="dpm++2m", steps=5, cond=cond, generator=torch.Generator()
                     .manual_seed(0))
    uncond = d.sample(model, (1, 3, 4, 4), sampler="dpm++2m", steps=5, cond=torch.full_like(cond, -1),
                      generator=torch.Generator().manual_seed(0))
    assert float((x - uncond).mean()) > float((plain - uncond).mean()) > 0


def test_clipping_is_off_by_default_and_available():
    d = GaussianDiffusion(1000, "linear", "x0")
    far = lambda x, t, cond=None: torch.full_like(x, 3.0)  # noqa: E731  predicts x0 = 3, out of range
    noise = torch.zeros(1, 1, 2, 2)
    assert torch.allclose(d.sample(far, noise.shape, sampler="dpm++2m", steps=4, noise=noise), torch.tensor(3.0))
    assert torch.allclose(d.sample(far, noise.shape, sampler="dpm++2m", steps=4, noise=noise, clip_denoised=True),
                          torch.tensor(1.0))
    assert torch.allclose(d.sample(far, noise.shape, sampler="ddim", steps=4, noise=noise), torch.tensor(1.0))


def test_trajectory_and_progress_work_with_the_solver():
    d = GaussianDiffusion(100, "linear", "eps")
    model = gaussian_model(d, 0.0, 0.5)
    x, traj = d.sample(model, (2, 3, 4, 4), sampler="dpm++2m", steps=12, return_trajectory=True, progress=True,
                       generator=torch.Generator().manual_seed(0))
    assert len(traj) == 8 and torch.equal(traj[-1], x)  # the last step's x0 prediction is the sample

"""diffusion.py against closed forms: schedules, forward process, posterior, conversions, and the samplers driven by
exact denoisers of data whose distribution is known (no training), plus a short CPU learning test with the tiny UNet."""

import math

import numpy as np
import pytest
import torch

from diffusion import GaussianDiffusion, cosine_alpha_bar, make_timesteps

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

# DDIM over 50 uniformly spaced steps (0, 20, ..., 980) is a first-order solver: on Gaussian data N(MU, S^2) with
# S = 0.25 its samples come out 9.5% narrow (measured std / S: 0.9049, 0.9042, 0.8992 for seeds 0, 1, 2; the figure
# depends on S: 0.885 at S = 0.2, 0.949 at S = 0.5). DDIM-250 gives 0.98, DDPM-1000 0.99.
DDIM50_STD_RATIO = 0.905
MU, S = 0.3, 0.25
SHAPE = (4096, 1, 2, 2)


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(timesteps=1000, schedule="linear", objective="eps")


def gaussian_denoiser(d: GaussianDiffusion, mu: float, s: float, objective: str = "eps"):
    """The exact model for x0 ~ N(mu, s^2): E[eps | x_t] = sqrt(1-a)(x_t - sqrt(a) mu) / (a s^2 + 1 - a), a = alpha_bar.

    Given as eps, x0 or v according to `objective`."""
    def model(x, t, cond=None):
        a = d.alphas_cumprod[t].reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        eps = (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s * s + 1 - a)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[objective]
    return model


def two_point_denoiser(d: GaussianDiffusion, c: float = 0.5):
    """The exact model for x0 uniform on {-c, +c}: E[x0 | x_t] = c tanh(c sqrt(a) x_t / (1 - a))."""
    def model(x, t, cond=None):
        a = d.alphas_cumprod[t].reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        x0 = c * torch.tanh(c * a.sqrt() * x / (1 - a))
        return (x - a.sqrt() * x0) / (1 - a).sqrt()
    return model


# ------------------------------------------------------------------------------------------------------ schedules

def test_linear_schedule(diffusion):
    ab = diffusion.alphas_cumprod
    assert ab.dtype == torch.float64 and ab.shape == (1000,)
    assert diffusion.betas[0].item() == pytest.approx(1e-4) and diffusion.betas[-1].item() == pytest.approx(0.02)
    assert ab[999].item() == pytest.approx(4.0358e-5, rel=1e-4)
    assert ab[499].item() == pytest.approx(0.078587, rel=1e-4)
    # The closed form: alpha_bar_t = prod_{s<=t} (1 - beta_s), beta linear from 1e-4 to 0.02.
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    assert ab[-1].item() == pytest.approx(math.prod(1 - b for b in betas), rel=1e-10)


def test_cosine_schedule_matches_its_formula():
    d = GaussianDiffusion(schedule="cosine")
    T, s = 1000, 0.008
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = np.array([f((t + 1) / T) / f(0) for t in range(T)])
    assert d.betas.dtype == torch.float64
    assert d.betas.max().item() == pytest.approx(0.999)  # clipped at the very end
    unclipped = d.betas.numpy() < 0.999
    assert unclipped[:-1].all()  # only the last step hits the clip at T=1000
    np.testing.assert_allclose(d.alphas_cumprod.numpy()[unclipped], expected[unclipped], rtol=1e-12)
    np.testing.assert_allclose(cosine_alpha_bar(np.array([0.0, 0.5])), [1.0, f(0.5) / f(0)], rtol=1e-12)
    assert (np.diff(d.alphas_cumprod.numpy()) < 0).all()


def test_other_timesteps_keep_linear_endpoints():
    d = GaussianDiffusion(timesteps=100)
    assert d.betas[0].item() == pytest.approx(1e-3) and d.betas[-1].item() == pytest.approx(0.2)


def test_config_rebuilds_and_state_dict_is_empty(diffusion):
    d = GaussianDiffusion(timesteps=500, schedule="cosine", objective="v", min_snr_gamma=5.0)
    clone = GaussianDiffusion(**d.config)
    assert clone.config == d.config == {"timesteps": 500, "schedule": "cosine", "objective": "v", "min_snr_gamma": 5.0}
    assert torch.equal(clone.alphas_cumprod, d.alphas_cumprod)
    assert diffusion.state_dict() == {}  # buffers are derived from the config, not saved
    for bad in (dict(schedule="sigmoid"), dict(objective="score"), dict(timesteps=1), dict(timesteps=20),
                dict(min_snr_gamma=0.0)):
        with pytest.raises(ValueError):
            GaussianDiffusion(**bad)


def test_make_timesteps():
    np.testing.assert_array_equal(make_timesteps(1000, 50), np.arange(0, 1000, 20))
    np.testing.assert_array_equal(make_timesteps(1000, 1000), np.arange(1000))
    assert len(make_timesteps(1000, 300)) == 300
    quad = make_timesteps(1000, 50, "quadratic")
    assert quad[0] == 0 and quad[-1] == 800 and (np.diff(quad) > 0).all() and len(quad) == 50
    assert (np.diff(np.diff(quad.astype(float))) >= -1).all()  # gaps grow: dense near the data
    with pytest.raises(ValueError):
        make_timesteps(1000, 1001)
    with pytest.raises(ValueError):
        make_timesteps(1000, 10, "log")


# -------------------------------------------------------------------------------------------- forward process

def test_q_sample_closed_form(diffusion):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 10, 499, 998, 999])
    xt = diffusion.q_sample(x0, t, noise)
    assert xt.dtype == torch.float32
    for i, ti in enumerate(t.tolist()):
        a = diffusion.alphas_cumprod[ti].item()
        torch.testing.assert_close(xt[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i])
    # Drawing its own noise, it has q(x_t | x_0)'s mean sqrt(alpha_bar) x0 and variance 1 - alpha_bar (to 5 sigma).
    n = 20_000
    x0, t = torch.tensor([[-0.8], [0.3], [1.0]]).repeat(n, 1), torch.tensor([10, 300, 900]).repeat(n)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        xt = diffusion.q_sample(x0, t).reshape(n, 3)
    a = diffusion.alphas_cumprod[[10, 300, 900]].float()
    assert ((xt.mean(0) - a.sqrt() * x0[:3, 0]).abs() <= 5 * ((1 - a) / n).sqrt()).all()
    assert ((xt.var(0) / (1 - a) - 1).abs() <= 5 * math.sqrt(2 / n)).all()


def test_scalar_timesteps_broadcast(diffusion):
    x0, noise = torch.rand(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    expected = diffusion.q_sample(x0, torch.full((3,), 123), noise)
    torch.testing.assert_close(diffusion.q_sample(x0, 123, noise), expected)
    torch.testing.assert_close(diffusion.q_sample(x0, torch.tensor(123), noise), expected)
    out = diffusion.p_mean_variance(lambda x, t, cond=None: torch.zeros_like(x), x0, 5)
    assert out["mean"].shape == x0.shape and out["variance"].shape == (3, 1, 1, 1)


def test_q_sample_half_input_runs_in_float32(diffusion):
    x0 = torch.rand(2, 3, 4, 4).half()
    xt = diffusion.q_sample(x0, torch.tensor([3, 900]), torch.randn(2, 3, 4, 4))
    assert xt.dtype == torch.float32


def gaussian_posterior(x0, xt, ab_t, ab_prev):
    """q(x_prev | x_t, x_0) from Bayes' rule on scalars: prior N(sqrt(ab_prev) x0, 1 - ab_prev) times the likelihood
    N(x_t; sqrt(alpha) x_prev, 1 - alpha), alpha = ab_t / ab_prev, written as a product of Gaussians."""
    alpha = ab_t / ab_prev
    prec = 1 / (1 - ab_prev) + alpha / (1 - alpha)
    var = 1 / prec
    mean = var * (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(alpha) * xt / (1 - alpha))
    return mean, var


def test_posterior_against_gaussian_formulas(diffusion):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 1, 1, 1, generator=g, dtype=torch.float64)
    xt = torch.randn(5, 1, 1, 1, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, 100, 500, 999])
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, xt, t)
    ab = diffusion.alphas_cumprod
    for i, ti in enumerate(t.tolist()):
        m, v = gaussian_posterior(x0[i].item(), xt[i].item(), ab[ti].item(), ab[ti - 1].item())
        assert mean[i].item() == pytest.approx(m, rel=1e-9, abs=1e-12)
        assert var[i].item() == pytest.approx(v, rel=1e-9)
        assert log_var[i].item() == pytest.approx(math.log(v), rel=1e-9)
    # At t = 0 the previous state is the data itself: mean x0, variance 0.
    mean0, var0, _ = diffusion.q_posterior_mean_variance(x0, xt, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(mean0, x0)
    assert not var0.any()

    # The respaced posterior (jumping from t to an earlier t_prev) against the same formula.
    t_prev = torch.tensor([0, -1, 40, 480, 979])
    mean, var, _ = diffusion.q_posterior_mean_variance(x0, xt, t, t_prev)
    for i, (ti, si) in enumerate(zip(t.tolist(), t_prev.tolist())):
        if si < 0:
            torch.testing.assert_close(mean[i], x0[i])
            continue
        m, v = gaussian_posterior(x0[i].item(), xt[i].item(), ab[ti].item(), ab[si].item())
        assert mean[i].item() == pytest.approx(m, rel=1e-9, abs=1e-12)
        assert var[i].item() == pytest.approx(v, rel=1e-9)
    # With t_prev = t - 1 the general formula gives the precomputed buffers.
    for a, b in zip(diffusion.q_posterior_mean_variance(x0, xt, t, t - 1)[:2],
                    diffusion.q_posterior_mean_variance(x0, xt, t)[:2]):
        torch.testing.assert_close(a, b)


def test_conversions_round_trip(diffusion):
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(7, 3, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(7, 3, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 50, 250, 500, 900, 999])
    xt = diffusion.q_sample(x0, t, eps)
    assert xt.dtype == torch.float64
    d = diffusion
    torch.testing.assert_close(d.predict_x0_from_eps(xt, t, eps), x0)
    torch.testing.assert_close(d.predict_eps_from_x0(xt, t, x0), eps)
    v = d.predict_v(x0, t, eps)
    a = d.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0)
    torch.testing.assert_close(d.predict_x0_from_v(xt, t, v), x0)
    for objective, output in (("eps", eps), ("v", v), ("x0", x0)):
        od = GaussianDiffusion(objective=objective)
        torch.testing.assert_close(od.predict_x0(output, xt, t), x0)
        torch.testing.assert_close(od.training_target(x0, t, eps), output)


# --------------------------------------------------------------------------------------------------------- loss

class Recorder:
    """A callable model that remembers its inputs and returns a fixed function of x (so the loss is predictable)."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond=None):
        self.calls.append((x.clone(), t.clone(), None if cond is None else cond.clone()))
        return 0.5 * x


def test_loss_matches_manual_computation():
    d = GaussianDiffusion()
    x0 = torch.rand(8, 3, 4, 4) * 2 - 1
    model = Recorder()
    loss = d.loss(model, x0, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (8,), generator=g)
    noise = torch.randn(8, 3, 4, 4, generator=g)
    xt = d.q_sample(x0, t, noise)
    assert torch.equal(model.calls[0][1], t)
    torch.testing.assert_close(model.calls[0][0], xt)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    torch.testing.assert_close(loss, ((0.5 * xt - noise) ** 2).mean())


@pytest.mark.parametrize("objective", ["eps", "v", "x0"])
def test_min_snr_weighting(objective):
    """Weights per objective (Hang et al.): every one equals min(SNR, gamma) times the error on x0."""
    gamma = 5.0
    plain = GaussianDiffusion(objective=objective)
    d = GaussianDiffusion(objective=objective, min_snr_gamma=gamma)
    t = torch.arange(0, 1000, 37)
    snr = d.alphas_cumprod[t] / (1 - d.alphas_cumprod[t])
    # The squared error on x0 is err_eps^2 / SNR (eps), err_v^2 / (SNR + 1) (v), err_x0^2 (x0).
    to_x0 = {"eps": 1 / snr, "v": 1 / (snr + 1), "x0": torch.ones_like(snr)}[objective]
    torch.testing.assert_close(d._min_snr_weight(t).double(), snr.clamp(max=gamma) * to_x0, rtol=1e-6, atol=0)
    x0 = torch.rand(64, 3, 4, 4) * 2 - 1  # enough rows that some have SNR > gamma
    weighted = d.loss(Recorder(), x0, generator=torch.Generator().manual_seed(4))
    unweighted = plain.loss(Recorder(), x0, generator=torch.Generator().manual_seed(4))
    assert torch.isfinite(weighted) and weighted != unweighted
    huge = GaussianDiffusion(objective=objective, min_snr_gamma=1e12)
    if objective == "eps":  # with gamma above every SNR the eps weights are all 1
        torch.testing.assert_close(huge.loss(Recorder(), x0, generator=torch.Generator().manual_seed(4)), unweighted)


def test_loss_cond_dropout():
    d = GaussianDiffusion()
    x0 = torch.zeros(64, 3, 2, 2)
    cond = torch.randint(0, 2, (64, 40))
    for p, expect in ((0.0, 0), (1.0, 64)):
        model = Recorder()
        d.loss(model, x0, cond, p_uncond=p, generator=torch.Generator().manual_seed(0))
        passed = model.calls[0][2]
        nulls = (passed == -1).all(dim=1)
        assert int(nulls.sum()) == expect
        assert torch.equal(passed[~nulls], cond[~nulls])
    model = Recorder()
    d.loss(model, x0, cond, p_uncond=0.5, generator=torch.Generator().manual_seed(0))
    passed = model.calls[0][2]
    nulls = (passed == -1).all(dim=1)
    assert 16 < int(nulls.sum()) < 48 and torch.equal(passed[~nulls], cond[~nulls])
    # cond=None passes None through.
    model = Recorder()
    d.loss(model, x0, None, p_uncond=0.5)
    assert model.calls[0][2] is None


def test_loss_under_autocast_is_float32():
    from unet import build_unet

    torch.manual_seed(0)
    model = build_unet("tiny", image_size=16, cond_dim=40)
    d = GaussianDiffusion(objective="v", min_snr_gamma=5.0)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = d.loss(model, x0, torch.randint(0, 2, (4, 40)), p_uncond=0.5, generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


# ------------------------------------------------------------------------------------- samplers, exact denoisers

def stats(x):
    return x.mean().item(), x.std().item()


@pytest.mark.parametrize("sampler,steps", [("ddpm", 1000), ("ddim", 250)])
def test_exact_gaussian_samplers_match_data(diffusion, sampler, steps):
    model = gaussian_denoiser(diffusion, MU, S)
    x = diffusion.sample(model, SHAPE, sampler=sampler, steps=steps, eta=0.0,
                         generator=torch.Generator().manual_seed(0))
    assert x.shape == SHAPE and x.dtype == torch.float32
    mean, std = stats(x)
    assert mean == pytest.approx(MU, abs=0.01)
    assert std / S == pytest.approx(1.0, abs=0.03)


def test_exact_gaussian_ddim50_is_narrow_by_the_pinned_figure(diffusion):
    model = gaussian_denoiser(diffusion, MU, S)
    x = diffusion.sample(model, SHAPE, sampler="ddim", steps=50, eta=0.0, generator=torch.Generator().manual_seed(0))
    mean, std = stats(x)
    assert mean == pytest.approx(MU, abs=0.01)
    assert std / S == pytest.approx(DDIM50_STD_RATIO, abs=0.02)


def test_exact_gaussian_wide_data_without_clipping(diffusion):
    """N(0, 1) data spills outside [-1, 1], so clipping is switched off; DDPM with both variances, DDIM-250."""
    model = gaussian_denoiser(diffusion, 0.0, 1.0)
    for kwargs, tol in ((dict(sampler="ddpm", steps=1000), 0.02),
                        (dict(sampler="ddpm", steps=1000, variance="fixed_large"), 0.02),
                        (dict(sampler="ddim", steps=250), 0.02),
                        (dict(sampler="ddim", steps=50, spacing="quadratic"), 0.04)):
        x = diffusion.sample(model, SHAPE, clip_denoised=False, generator=torch.Generator().manual_seed(1), **kwargs)
        mean, std = stats(x)
        assert abs(mean) < 0.03 and std == pytest.approx(1.0, abs=tol), kwargs


@pytest.mark.parametrize("objective", ["v", "x0"])
def test_objectives_sample_identically(objective):
    """The same exact denoiser expressed as v or x0 gives the same samples as its eps form."""
    d_eps, d_obj = GaussianDiffusion(), GaussianDiffusion(objective=objective)
    for sampler, steps in (("ddim", 50), ("ddpm", 100)):
        a = d_eps.sample(gaussian_denoiser(d_eps, MU, S), (512, 1, 2, 2), sampler=sampler, steps=steps,
                         generator=torch.Generator().manual_seed(5))
        b = d_obj.sample(gaussian_denoiser(d_obj, MU, S, objective), (512, 1, 2, 2), sampler=sampler, steps=steps,
                         generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 1000), ("ddim", 250), ("ddim", 50)])
def test_exact_two_point_mixture_splits_half_and_half(diffusion, sampler, steps):
    x = diffusion.sample(two_point_denoiser(diffusion), SHAPE, sampler=sampler, steps=steps,
                         generator=torch.Generator().manual_seed(2))
    positive = (x > 0).float().mean().item()
    assert positive == pytest.approx(0.5, abs=0.02)
    # The last step lands on E[x0 | x_t] at t = 0, which is +-0.5 up to float rounding for this data.
    assert (x.abs() - 0.5).abs().max() < 0.01


def test_ddim_eta1_is_respaced_ddpm(diffusion):
    """DDIM with eta = 1 is ancestral sampling on the respaced chain, draw for draw."""
    model = gaussian_denoiser(diffusion, MU, S)
    a = diffusion.sample(model, (256, 1, 2, 2), sampler="ddim", steps=50, eta=1.0,
                         generator=torch.Generator().manual_seed(7))
    b = diffusion.sample(model, (256, 1, 2, 2), sampler="ddpm", steps=50, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_model_sees_original_timesteps(diffusion):
    for sampler, steps, expected in (("ddim", 50, list(range(980, -1, -20))),
                                     ("ddpm", 1000, list(range(999, -1, -1))),
                                     ("ddpm", 10, list(range(900, -1, -100)))):
        model = Recorder()
        diffusion.sample(model, (2, 1, 2, 2), sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))
        seen = [c[1] for c in model.calls]
        assert all(s.dtype == torch.long and s.shape == (2,) and s[0] == s[1] for s in seen)
        assert [int(s[0]) for s in seen] == expected


def test_sampling_is_deterministic_for_a_generator(diffusion):
    model = gaussian_denoiser(diffusion, MU, S)
    for kwargs in (dict(sampler="ddim", steps=20, eta=0.5), dict(sampler="ddpm", steps=20)):
        a = diffusion.sample(model, (64, 1, 2, 2), generator=torch.Generator().manual_seed(3), **kwargs)
        b = diffusion.sample(model, (64, 1, 2, 2), generator=torch.Generator().manual_seed(3), **kwargs)
        c = diffusion.sample(model, (64, 1, 2, 2), generator=torch.Generator().manual_seed(4), **kwargs)
        assert torch.equal(a, b) and not torch.equal(a, c)
    # `noise` is x_T: deterministic DDIM from the same noise gives the same samples.
    noise = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    a = diffusion.sample(model, (64, 1, 2, 2), steps=20, noise=noise)
    b = diffusion.sample(model, (64, 1, 2, 2), steps=20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="noise has shape"):
        diffusion.sample(model, (64, 1, 2, 2), noise=noise[:3])


def test_classifier_free_guidance_is_one_batched_forward(diffusion):
    """guidance != 1 with cond: one forward of [cond rows; null rows], combined as null + w (cond - null)."""
    shift = 0.1

    class Shifted(Recorder):
        def __call__(self, x, t, cond=None):
            super().__call__(x, t, cond)
            # The "conditional" prediction is the unconditional one plus a constant; null rows are -1 rows.
            is_cond = (cond >= 0).all(dim=1).reshape(-1, 1, 1, 1).float() if cond is not None else 0.0
            return 0.5 * x + shift * is_cond

    cond = torch.ones(3, 40)
    model = Shifted()
    x, traj = diffusion.sample(model, (3, 1, 2, 2), steps=5, cond=cond, guidance=3.0, return_trajectory=True,
                               clip_denoised=False, generator=torch.Generator().manual_seed(0))
    assert len(model.calls) == 5
    for xin, tin, cin in model.calls:
        assert xin.shape[0] == 6 and torch.equal(xin[:3], xin[3:]) and torch.equal(tin[:3], tin[3:])
        assert torch.equal(cin[:3], cond) and (cin[3:] == -1).all()
    # Same result as a model whose output is null + 3 * shift, sampled without guidance.
    reference = lambda x, t, cond=None: 0.5 * x + 3.0 * shift  # noqa: E731
    y = diffusion.sample(reference, (3, 1, 2, 2), steps=5, clip_denoised=False,
                         generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, y)
    # guidance == 1 is a plain conditional forward.
    model = Shifted()
    diffusion.sample(model, (3, 1, 2, 2), steps=5, cond=cond, guidance=1.0)
    assert all(c[0].shape[0] == 3 and torch.equal(c[2], cond) for c in model.calls)


def test_trajectory_and_clipping(diffusion):
    model = gaussian_denoiser(diffusion, 0.0, 1.0)
    x, traj = diffusion.sample(model, (16, 1, 2, 2), steps=50, return_trajectory=True, progress=True,
                               generator=torch.Generator().manual_seed(0))
    assert len(traj) == 8 and all(p.shape == x.shape for p in traj)
    torch.testing.assert_close(traj[-1], x)
    assert x.abs().max() <= 1.0  # clip_denoised keeps samples in the image range
    short = diffusion.sample(model, (16, 1, 2, 2), steps=3, return_trajectory=True)[1]
    assert len(short) == 3


def test_sampling_maths_stays_float32_under_autocast(diffusion):
    """The model may answer in bf16 under autocast; the sampler still does its maths in float32."""
    exact = gaussian_denoiser(diffusion, MU, S)
    low = lambda x, t, cond=None: exact(x, t).to(torch.bfloat16)  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = diffusion.sample(low, SHAPE, steps=250, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32
    mean, std = stats(x)
    assert mean == pytest.approx(MU, abs=0.01) and std / S == pytest.approx(1.0, abs=0.03)


def test_bad_sampler_arguments(diffusion):
    model = Recorder()
    for kwargs in (dict(sampler="euler"), dict(eta=1.5), dict(steps=0), dict(steps=2000), dict(variance="learned"),
                   dict(spacing="log")):
        with pytest.raises(ValueError):
            diffusion.sample(model, (2, 1, 2, 2), **kwargs)
    with pytest.raises(ValueError, match="cond has"):
        diffusion.sample(model, (2, 1, 2, 2), cond=torch.ones(3, 40))


# ---------------------------------------------------------------------------------------------- learning on CPU

def templates() -> torch.Tensor:
    """Four 16x16 RGB patterns (halves, a ring) at +-0.8: [4, 3, 16, 16]."""
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    left, top = (xx < 8).float(), (yy < 8).float()
    ring = ((xx - 7.5) ** 2 + (yy - 7.5) ** 2 < 25).float()
    zero, one = torch.zeros(16, 16), torch.ones(16, 16)
    t = torch.stack([torch.stack([left, zero, 1 - left]), torch.stack([one, top, zero]),
                     torch.stack([zero, ring, 1 - ring]), torch.stack([1 - top, 1 - top, one / 2])])
    return t * 1.6 - 0.8


def test_tiny_unet_learns_templates_on_cpu():
    """200 Adam steps of the tiny UNet on four templates: the loss falls well below its start and DDIM samples from
    the weight average land near the templates (the RMS gap between two templates is at least 1.0).

    The x0 objective because it learns a handful of images in a few hundred steps, where eps, whose x0 error is
    amplified by sqrt(1/alpha_bar - 1) (157 at t = 999), still gives blurred samples; the eps path is covered exactly
    by the denoiser tests above.
    """
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from unet import build_unet

    torch.manual_seed(0)
    data = templates()
    gaps = torch.cdist(data.flatten(1), data.flatten(1)) / math.sqrt(data[0].numel())
    assert gaps[~torch.eye(4, dtype=torch.bool)].min() > 1.0
    model = build_unet("tiny", image_size=16)
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    d = GaussianDiffusion(objective="x0")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(200):
        batch = data[torch.randint(0, 4, (16,), generator=g)]
        loss = d.loss(model, batch, generator=g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        average.update_parameters(model)
        losses.append(loss.item())
    # The zero-initialised output makes the first loss the batch's mean x0^2 (about 0.55 for these templates).
    assert losses[0] > 0.4
    assert np.mean(losses[-30:]) < 0.5 * losses[0], losses[-30:]

    average.eval()
    samples = d.sample(average.module, (16, 3, 16, 16), steps=20, generator=torch.Generator().manual_seed(1))
    rms = torch.cdist(samples.flatten(1), data.flatten(1)) / math.sqrt(data[0].numel())
    nearest, which = rms.min(dim=1)
    assert nearest.median() < 0.3, nearest
    assert (nearest < 0.35).sum() >= 12, nearest
    assert len(which.unique()) >= 2  # not all collapsed onto one template

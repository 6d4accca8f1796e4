"""Post-hoc EMA (EDM2): PowerEMA against the closed form of a power-function average, the profile maths against
numerical integration, a direct least-squares fit and EDM2's own code, reconstructions from a real run's snapshots
(they load and sample like checkpoints), the one-line errors of ema.py and train.py, an exact resume after kill -9
with --phema on, and --patience. CPU, the 16-channel `tiny` UNet at 32 px of tests/test_train.py."""
from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import integrate
from torch import nn

import config
import ema
import sample
import train
import utills
from config import ConfigError, UserError
from ema import EMA, PhemaConfig, PhemaError, PowerEMA, plan, read_snapshots, reconstruct, sigma_rel_to_gamma
from test_train import ENV, ROOT, TIMEOUT, assert_same_weights, check_ok, run, train_cmd, train_here, wait_for
from train import STATUS_ENV, TrainConfig, out_of_patience
from utills import PAUSE_ENV, TrainState, load_checkpoint, load_model, make_checkpoint, restore_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

EMA_PY = [sys.executable, str(ROOT / "ema.py")]
# Two profiles, a snapshot every 2 steps in fp32 (so that a snapshot holds the tracked average exactly).
PHEMA = ["--phema", "0.05,0.1", "--phema-every", "2", "--phema-dtype", "fp32"]
STEPS = 8  # with checkpoints every 4 steps: snapshots at 2, 4, 6, 8; checkpoints at 4, 8
BATCH = 16  # FAST's --batch-size


def phema_cmd(shards: Path, out: Path, steps: int = STEPS, *extra: str, phema: list[str] = PHEMA) -> list[str]:
    return train_cmd(shards, out, "dali", steps, 4, *phema, *extra)


@pytest.fixture(scope="module")
def phema_run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 8-step run with --phema 0.05,0.1. Tests add reconstructions to RUN/phema at most; those that
    change its history (training, roll-back) work on a copy."""
    out = tmp_path_factory.mktemp("phema") / "run"
    train_here(phema_cmd(shards, out))
    return out


def quiet(*_args) -> None:
    """A `log` for ema.reconstruct that prints nothing."""


def snapshot_files(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "phema" / "snapshots").iterdir())


# ---------------------------------------------------------- EDM2's reference code, copied as the independent check
# From NVlabs/edm2, training/phema.py (Copyright (c) 2024, NVIDIA CORPORATION & AFFILIATES, CC BY-NC-SA 4.0; Karras
# et al., "Analyzing and Improving the Training Dynamics of Diffusion Models"): std_to_exp,
# power_function_correlation and solve_posthoc_coefficients as published, names and all.

def edm2_std_to_exp(std):
    std = np.float64(std)
    tmp = std.flatten() ** -2
    exp = [np.roots([1, 7, 16 - t, 12 - t]).real.max() for t in tmp]
    exp = np.float64(exp).reshape(std.shape)
    return exp


def edm2_power_function_correlation(a_ofs, a_std, b_ofs, b_std):
    a_exp = edm2_std_to_exp(a_std)
    b_exp = edm2_std_to_exp(b_std)
    t_ratio = a_ofs / b_ofs
    t_exp = np.where(a_ofs < b_ofs, b_exp, -a_exp)
    t_max = np.maximum(a_ofs, b_ofs)
    num = (a_exp + 1) * (b_exp + 1) * t_ratio ** t_exp
    den = (a_exp + b_exp + 1) * t_max
    return num / den


def edm2_solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std):  # => [in, out]
    in_ofs, in_std = np.broadcast_arrays(in_ofs, in_std)
    out_ofs, out_std = np.broadcast_arrays(out_ofs, out_std)
    rv = lambda x: np.float64(x).reshape(-1, 1)  # noqa: E731
    cv = lambda x: np.float64(x).reshape(1, -1)  # noqa: E731
    A = edm2_power_function_correlation(rv(in_ofs), rv(in_std), cv(in_ofs), cv(in_std))
    B = edm2_power_function_correlation(rv(in_ofs), rv(in_std), cv(out_ofs), cv(out_std))
    X = np.linalg.solve(A, B)
    X = X / np.sum(X, axis=0)
    return X


# --------------------------------------------------------------------------------- PowerEMA and the closed form

def _toy(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _set_weights(model: nn.Module, gen: torch.Generator) -> list[torch.Tensor]:
    """Give every parameter new random values; returns them (copies)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("batches", [[8] * 12, [16, 16, 4, 4, 4, 32, 8, 1, 64, 16]], ids=["constant", "changing"])
def test_power_ema_is_the_closed_form_power_average_at_every_step(batches: list[int]):
    """After the updates that brought the run to t_1 < ... < t_k images, the profile of exponent gamma is
    sum_tau ((t_tau/t_k)^(gamma+1) - (t_{tau-1}/t_k)^(gamma+1)) theta_tau (t_0 = 0): with a constant batch,
    ((tau/k)^(gamma+1) - ((tau-1)/k)^(gamma+1)); time counts images, so a changing batch keeps it right."""
    model = _toy()
    sigma_rels = [0.05, 0.1, 0.2, 0.28]
    initial = [p.detach().clone() for p in model.parameters()]
    phema = PowerEMA(model, sigma_rels)
    for average in phema.averages:  # before any update: the initial weights
        assert all(torch.equal(a, p) for a, p in zip(average, initial, strict=True))
    gen = torch.Generator().manual_seed(1)
    thetas, times = [], [0]
    for k, b in enumerate(batches, 1):
        thetas.append(_set_weights(model, gen))
        times.append(times[-1] + b)
        phema.update(times[-1], b)
        assert (phema.images_seen, phema.num_updates) == (times[-1], k)
        if k == 1:  # the first update (beta = 0) takes the weights after step 1 whole
            for average in phema.averages:
                assert all(torch.equal(a, p) for a, p in zip(average, thetas[0], strict=True))
        t = np.float64(times)
        for gamma, average in zip(phema.gammas, phema.averages):
            w = (t[1:] / t[-1]) ** (gamma + 1) - (t[:-1] / t[-1]) ** (gamma + 1)
            assert w.sum() == pytest.approx(1.0, abs=1e-14)
            for i, a in enumerate(average):
                expected = sum(float(w[tau]) * thetas[tau][i] for tau in range(k))
                torch.testing.assert_close(a, expected, rtol=0, atol=1e-12)
    if len(set(batches)) == 1:  # the same weights as the step-count form of the closed form
        k, gamma = len(batches), phema.gammas[0]
        w = np.array([(tau / k) ** (gamma + 1) - ((tau - 1) / k) ** (gamma + 1) for tau in range(1, k + 1)])
        expected = sum(float(w[tau]) * thetas[tau][0] for tau in range(k))
        torch.testing.assert_close(phema.averages[0][0], expected, rtol=0, atol=1e-12)
    # The longest profiles weight the early steps more: the averages differ from each other.
    assert not torch.allclose(phema.averages[0][0], phema.averages[-1][0])
    with pytest.raises(ValueError, match="batch_size 5 and images_seen 4"):
        phema.update(4, 5)


def test_power_ema_state_dict_continues_exactly_and_snapshots_hold_the_averages(tmp_path: Path):
    model = _toy()
    gen = torch.Generator().manual_seed(2)
    a = PowerEMA(model, [0.05, 0.1])
    for k in range(1, 4):
        _set_weights(model, gen)
        a.update(10 * k, 10)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = PowerEMA(model, [0.05, 0.1])
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    for k in range(4, 7):
        _set_weights(model, gen)
        a.update(10 * k, 10)
        b.update(10 * k, 10)
    for x, y in zip(a.averages, b.averages, strict=True):
        assert all(torch.equal(s, t) for s, t in zip(x, y, strict=True))
    assert (b.images_seen, b.num_updates) == (60, 6)
    with pytest.raises(PhemaError, match=r"--phema 0.05,0.2: the checkpoint tracks 0.05,0.1; profiles cannot change"):
        PowerEMA(model, [0.05, 0.2]).load_state_dict(a.state_dict())

    # Snapshot files: one per profile, the averages in the dtype asked for, found by read_snapshots.
    paths = a.write_snapshots(tmp_path, model, step=6, batch_size=10, dtype="fp16", meta={"extra": 1})
    assert [p.name for p in paths] == ["snapshot-00000006-0.0500.pt", "snapshot-00000006-0.1000.pt"]
    found = read_snapshots(tmp_path)
    assert [(s.step, s.images_seen, s.sigma_rel, s.batch_size) for s in found] == [(6, 60, 0.05, 10), (6, 60, 0.1, 10)]
    names = [n for n, _ in model.named_parameters()]
    for path, average in zip(paths, a.averages):
        d = torch.load(path, weights_only=True)
        assert d["kind"] == "phema-snapshot" and d["dtype"] == "fp16" and d["averaged"] == names and d["extra"] == 1
        for name, value in zip(names, average):
            assert d["model"][name].dtype == torch.float16 and torch.equal(d["model"][name], value.half())


# ------------------------------------------------------------------------------------------------ profile maths

def test_sigma_rel_and_gamma_round_trip_and_known_values():
    s = np.linspace(0.01, 0.28, 28)
    np.testing.assert_allclose(ema.gamma_to_sigma_rel(sigma_rel_to_gamma(s)), s, rtol=0, atol=1e-12)
    for v in (0.01, 0.05, 0.1, 0.28):  # scalars too
        assert float(ema.gamma_to_sigma_rel(sigma_rel_to_gamma(v))) == pytest.approx(v, abs=1e-12)
    # EDM2's table (section 3.1, Appendix C): sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
    assert float(sigma_rel_to_gamma(0.05)) == pytest.approx(16.97, abs=0.005)
    assert float(sigma_rel_to_gamma(0.10)) == pytest.approx(6.94, abs=0.005)
    np.testing.assert_allclose(sigma_rel_to_gamma(s), edm2_std_to_exp(s), rtol=1e-14)
    assert float(ema.gamma_to_sigma_rel(0.0)) == pytest.approx(ema.SIGMA_REL_MAX, abs=1e-15)  # a flat average
    assert np.all(np.diff(sigma_rel_to_gamma(s)) < 0)  # longer profiles, smaller exponents

    assert ema.parse_sigma_rels("0.05, 0.10,", "--phema") == [0.05, 0.1]
    for text, message in (("0.05,0.050", "repeats a value"), ("0.05,x", "expected numbers"), (",", "at least one"),
                          ("0.2887", "out of range"), ("0", "out of range")):
        with pytest.raises(PhemaError, match=message):
            ema.parse_sigma_rels(text, "--phema")


@pytest.mark.parametrize("t_a,g_a,t_b,g_b", [(100.0, 16.97, 250.0, 6.94), (250.0, 16.97, 100.0, 6.94),
                                             (300.0, 2.5, 300.0, 0.0), (7.0, 0.3, 11.0, 40.0)])
def test_profile_inner_is_the_integral_of_the_profiles(t_a: float, g_a: float, t_b: float, g_b: float):
    """<p_a, p_b> = integral over [0, min(t_a, t_b)] of p_a(tau) p_b(tau), p_t(tau) = (g+1) tau^g / t^(g+1)."""
    def p(tau, t, g):
        return (g + 1) * tau ** g / t ** (g + 1)

    numeric, _ = integrate.quad(lambda tau: p(tau, t_a, g_a) * p(tau, t_b, g_b), 0, min(t_a, t_b), epsabs=0,
                                epsrel=1e-12, limit=200)
    assert ema.profile_inner(np.float64(t_a), np.float64(g_a), np.float64(t_b), np.float64(g_b)) == \
        pytest.approx(numeric, rel=1e-6)
    # Each profile integrates to 1, and <p, p> is symmetric.
    assert integrate.quad(lambda tau: p(tau, t_a, g_a), 0, t_a)[0] == pytest.approx(1.0, rel=1e-9)
    assert ema.profile_inner(t_a, g_a, t_b, g_b) == pytest.approx(ema.profile_inner(t_b, g_b, t_a, g_a), rel=1e-12)


# Two tracked profiles snapshotted at 6 times; targets of other sigma_rels at the last and at an earlier snapshot.
T_IN = np.repeat(np.arange(1, 7) * 100.0, 2)
S_IN = np.tile([0.05, 0.1], 6)
T_OUT = np.array([600.0, 600.0, 400.0])
S_OUT = np.array([0.08, 0.2, 0.15])


def test_solve_coefficients_is_the_least_squares_fit_of_the_sampled_profiles():
    """Sample every profile on a fine grid of time (the midpoints of cells of width d that end exactly at the
    snapshot times), normalise each column to sum 1 (EDM2's power_function_response) and fit the target by
    np.linalg.lstsq: the same coefficients as the closed-form Gram solve. The midpoint rule on cells aligned with
    the profiles' ends (where they drop to 0) errs by O(d^2): 5e-7 measured at d = 0.1 (1/6000 of the span), times
    cond(A) = 251 at most in the solve; 1e-5 leaves a margin of 20."""
    x, cond = ema.solve_coefficients(T_IN, S_IN, T_OUT, S_OUT)
    assert x.shape == (12, 3) and cond == pytest.approx(251.2, rel=1e-3)
    np.testing.assert_allclose(x.sum(axis=0), 1.0, rtol=0, atol=1e-12)
    d = 0.1
    tau = (np.arange(round(600 / d)) + 0.5) * d

    def sampled(t, s):
        g = sigma_rel_to_gamma(s)
        r = np.where(tau[:, None] <= t, (g + 1) * tau[:, None] ** g / t ** (g + 1), 0.0)
        return r / r.sum(axis=0, keepdims=True)

    fit = np.linalg.lstsq(sampled(T_IN[None], S_IN[None]), sampled(T_OUT[None], S_OUT[None]), rcond=None)[0]
    fit = fit / fit.sum(axis=0, keepdims=True)
    np.testing.assert_allclose(x, fit, rtol=0, atol=1e-5)
    assert np.abs(x).max() > 0.5  # not a fit of nothing


def test_solve_coefficients_is_edm2s_solve():
    x, cond = ema.solve_coefficients(T_IN, S_IN, T_OUT, S_OUT)
    reference = edm2_solve_posthoc_coefficients(T_IN, S_IN, T_OUT, S_OUT)
    np.testing.assert_allclose(x, reference, rtol=0, atol=1e-10)
    a = edm2_power_function_correlation(T_IN[:, None], S_IN[:, None], T_IN[None], S_IN[None])
    assert cond == pytest.approx(np.linalg.cond(a), rel=1e-9)
    # Scalar targets broadcast; a tracked profile at its own time is that snapshot alone.
    one, _ = ema.solve_coefficients(T_IN, S_IN, 600.0, 0.1)
    np.testing.assert_allclose(one[:, 0], np.eye(12)[11], rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------- a real run's reconstruction

def test_the_run_writes_snapshots_that_end_at_the_checkpointed_averages(phema_run: Path):
    assert snapshot_files(phema_run) == [f"snapshot-{s:08d}-{r}.pt" for s in (2, 4, 6, 8) for r in ("0.0500", "0.1000")]
    found = read_snapshots(phema_run / "phema" / "snapshots")
    assert [(s.step, s.images_seen, s.sigma_rel) for s in found] == \
        [(s, s * BATCH, r) for s in (2, 4, 6, 8) for r in (0.05, 0.1)]
    ckpt = load_checkpoint(phema_run / "checkpoints" / "step-00000008.pt")
    state = ckpt["phema"]
    assert (state["sigma_rels"], state["images_seen"], state["num_updates"]) == ([0.05, 0.1], STEPS * BATCH, STEPS)
    assert ckpt["config"]["phema"] == "0.05,0.1" and ckpt["config"]["phema_every"] == 2
    # An fp32 snapshot holds the tracked average exactly; the raw weights and the classic EMA are other weights.
    for sigma_rel, average in zip(("0.0500", "0.1000"), state["averages"]):
        snap = torch.load(phema_run / "phema" / "snapshots" / f"snapshot-00000008-{sigma_rel}.pt", weights_only=True)
        assert snap["dtype"] == "fp32" and snap["step"] == 8 and snap["model_config"] == ckpt["model_config"]
        assert set(snap["model"]) == set(ckpt["model"])
        for name, value in zip(snap["averaged"], average, strict=True):
            assert snap["model"][name].dtype == torch.float32 and torch.equal(snap["model"][name], value), name
    assert not torch.equal(state["averages"][0][0], state["averages"][1][0])
    assert not torch.equal(state["averages"][0][0], ckpt["model"][snap["averaged"][0]])


def test_a_tracked_sigma_rel_at_a_snapshot_reconstructs_that_snapshot(phema_run: Path, tmp_path: Path):
    snaps = read_snapshots(phema_run / "phema" / "snapshots")
    for step, last in ((None, 8), (4, 4)):  # the last snapshot, and an earlier one from the snapshots up to it
        p = plan(snaps, [0.05, 0.1], step)
        assert p.step == last and p.images_seen == last * BATCH and len(p.snapshots) == last  # 2 files per 2 steps
        np.testing.assert_allclose(p.coefficients, np.eye(len(p.snapshots))[:, -2:], rtol=0, atol=1e-9)
    (path,) = reconstruct(phema_run, [0.1], out=tmp_path, log=quiet)
    assert path == tmp_path / "phema-0.1000-step-00000008.pt"
    snap = torch.load(phema_run / "phema" / "snapshots" / "snapshot-00000008-0.1000.pt", weights_only=True)
    state = load_checkpoint(path)["model"]
    assert set(state) == set(snap["model"])
    for name, value in snap["model"].items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=1e-6)


def test_reconstructed_files_are_the_least_squares_combination_and_load_and_sample(phema_run: Path, tmp_path: Path):
    """The coefficients recomputed here from what the snapshot files record (images_seen, sigma_rel) with EDM2's solve,
    and the weights as their combination, independently of ema.combine; the file loads and samples like a
    checkpoint."""
    written = reconstruct(phema_run, [0.05, 0.08], log=quiet)  # default --out: RUN/phema
    assert written == [phema_run / "phema" / f"phema-{s}-step-00000008.pt" for s in ("0.0500", "0.0800")]
    snaps = [torch.load(p, weights_only=True) for p in sorted((phema_run / "phema" / "snapshots").glob("*.pt"))]
    snaps.sort(key=lambda d: (d["images_seen"], d["sigma_rel"]))
    coefficients = edm2_solve_posthoc_coefficients([d["images_seen"] for d in snaps], [d["sigma_rel"] for d in snaps],
                                                   STEPS * BATCH, 0.08)[:, 0]
    assert np.abs(coefficients).max() < 10 and np.count_nonzero(np.abs(coefficients) > 1e-3) > 2  # a real mixture
    average = load_checkpoint(written[1])
    assert (average["kind"], average["step"], average["images_seen"], average["sigma_rel"]) == \
        ("phema", 8, STEPS * BATCH, 0.08)
    np.testing.assert_allclose(average["coefficients"], coefficients, rtol=0, atol=1e-10)
    assert [s["file"] for s in average["snapshots"]] == [f"snapshot-{d['step']:08d}-{d['sigma_rel']:.4f}.pt"
                                                         for d in snaps]
    averaged = set(snaps[-1]["averaged"])
    for name, value in average["model"].items():
        if name in averaged:
            expected = sum(float(c) * d["model"][name].double() for c, d in zip(coefficients, snaps))
            assert value.dtype == torch.float32
            torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7)
        else:  # not averaged (buffers): the last snapshot's
            assert torch.equal(value, snaps[-1]["model"][name]), name

    loaded = load_model(written[1])
    assert (loaded.weights, loaded.step, loaded.image_size) == ("phema0.0800", 8, 32)
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, average["model"][name]), name
    assert load_model(phema_run / "phema" / "snapshots" / "snapshot-00000004-0.0500.pt").weights == "phema0.0500"
    with pytest.raises(UserError, match="holds post-hoc EMA weights only"):
        load_model(written[1], use_ema=False)

    grid = tmp_path / "x.png"
    sample.cli(["--ckpt", str(written[1]), "--n", "4", "--steps", "2", "--out", str(grid), "--device", "cpu"])
    assert Image.open(grid).size == (2 * 34 + 2, 2 * 34 + 2)  # 2x2 images of 32 px, 2 px apart


def test_ema_cli_writes_and_exports(phema_run: Path, tmp_path: Path):
    """The command line, as a user runs it: a reconstruction to --out and its .safetensors, which load_model loads to
    the same weights; the same file as ema.reconstruct writes."""
    out = tmp_path / "out"
    proc = check_ok(run([*EMA_PY, "--run", str(phema_run), "--sigma-rel", "0.08", "--out", str(out), "--export"]))
    assert "condition number" in proc and "sigma_rel 0.0800:" in proc
    pt, st = out / "phema-0.0800-step-00000008.pt", out / "phema-0.0800-step-00000008.safetensors"
    assert sorted(p.name for p in out.iterdir()) == [pt.name, st.name]
    (here,) = reconstruct(phema_run, [0.08], out=tmp_path / "here", log=quiet)
    a, b = load_checkpoint(pt), load_checkpoint(here)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and a["coefficients"] == b["coefficients"]
    exported = load_model(st)
    assert (exported.weights, exported.step) == ("phema0.0800", 8)
    for name, value in exported.model.state_dict().items():
        assert torch.equal(value, a["model"][name]), name


# ------------------------------------------------------------------------------------------------------- errors

def ema_cli_error(*argv: str) -> str:
    """ema.py's command line in this process (parse, main, the user_errors guard): the message it exits with."""
    with pytest.raises(SystemExit) as e, config.user_errors():
        ema.main(config.parse(PhemaConfig, list(argv))[0])
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_ema_cli_errors_are_one_line(phema_run: Path, tmp_path: Path):
    out = tmp_path / "out"
    run_flags = ["--run", str(phema_run), "--out", str(out)]
    empty = tmp_path / "empty-run"
    (empty / "checkpoints").mkdir(parents=True)
    assert "no post-hoc EMA snapshots (train with --phema" in ema_cli_error("--run", str(empty), "--sigma-rel", "0.08")
    for value in ("0", "0.3", "-0.1", "0.05,0.2887"):
        assert f"--sigma-rel {float(value.split(',')[-1]):g}: out of range; a relative EMA length is in " \
               f"(0, 0.2887)" in ema_cli_error(*run_flags, f"--sigma-rel={value}")
    assert ema_cli_error(*run_flags, "--sigma-rel", "0.08", "--step", "1") == \
        "error: --step 1: before the first snapshot (step 2)"
    for step in ("3", "9"):
        assert ema_cli_error(*run_flags, "--sigma-rel", "0.08", "--step", step) == \
            f"error: --step {step}: no snapshot at that step (snapshots at steps 2, 4, 6, 8)"
    assert not out.exists() and not empty.joinpath("phema").exists()  # nothing written
    # The real command line: exit status 1 and that one line on stderr, nothing else.
    proc = run([*EMA_PY, "--run", str(tmp_path / "missing"), "--sigma-rel", "0.08"])
    assert (proc.returncode, proc.stdout, proc.stderr) == \
        (1, "", f"error: --run {tmp_path / 'missing'}: no such run folder\n")


def test_train_refuses_what_post_hoc_ema_cannot_do(phema_run: Path, shards: Path, tmp_path: Path):
    new = tmp_path / "new"
    out_of_range = r"--phema 0.4: out of range; a relative EMA length is in \(0, 0.2887\)"
    for flags, message in ((["--phema", "0.4"], out_of_range),
                           (["--phema", "0.05,0.050"], "--phema '0.05,0.050': repeats a value"),
                           (["--patience", "2"], "--patience 2 counts training-time evaluations: give --eval-every N")):
        with pytest.raises(UserError, match=message) as e:
            train_here(train_cmd(shards, new, "dali", 2, 0, *flags))
        assert "\n" not in str(e.value)
    assert not new.exists()

    # A run started without --phema cannot take it up later (the profiles average every step from the first).
    plain = tmp_path / "plain"
    train_here(train_cmd(shards, plain, "dali", 1, 0))
    saved = (plain / "config.json").read_bytes()
    with pytest.raises(ConfigError, match=r"--phema '0.05,0.1' cannot change during a run .* the checkpoint has "
                                          r"phema=''"):
        train_here(train_cmd(shards, plain, "dali", 2, 0, "--phema", "0.05,0.1"))
    # Nor one whose checkpoint's config predates --phema (tests/fixtures/v0-run); its config.json is left as it was.
    v0 = tmp_path / "v0"
    shutil.copytree(ROOT / "tests" / "fixtures" / "v0-run", v0)
    saved_v0 = (v0 / "config.json").read_bytes()
    cfg, given = config.parse(TrainConfig, ["--config", str(v0 / "config.json"), "--data", str(shards), "--out",
                                            str(v0), "--steps", "4", "--phema", "0.05,0.1"])
    with pytest.raises(ConfigError, match=r"--phema 0.05,0.1: the run in .* was started without it") as e:
        train.main(cfg, given)
    assert "\n" not in str(e.value)
    assert (v0 / "config.json").read_bytes() == saved_v0 and (plain / "config.json").read_bytes() == saved
    assert [p.name for p in (v0 / "checkpoints").iterdir()] == ["step-00000002.pt"]

    # A --phema run: other profiles are refused; the same ones written otherwise are the same run.
    copy = tmp_path / "copy"
    shutil.copytree(phema_run, copy)
    with pytest.raises(ConfigError, match=r"--phema '0.05,0.2' cannot change during a run .* the checkpoint has "
                                          r"phema='0.05,0.1'"):
        train_here(phema_cmd(shards, copy, 10, phema=["--phema", "0.05,0.2"]))
    train_here(phema_cmd(shards, copy, STEPS, phema=["--phema", "0.050,0.10", "--phema-every", "2"]))
    assert snapshot_files(copy) == snapshot_files(phema_run)

    # --resume at a post-hoc EMA file (a reconstruction or a snapshot): averaged weights only, nothing to resume.
    # The second start into `new` checks that a refused one leaves it usable (it holds the lock file alone).
    (average,) = reconstruct(phema_run, [0.08], out=tmp_path / "averages", log=quiet)
    for path in (average, phema_run / "phema" / "snapshots" / "snapshot-00000004-0.0500.pt"):
        with pytest.raises(ConfigError, match="a post-hoc EMA file \\(averaged weights only\\), not a training "
                                              "checkpoint") as e:
            train_here(phema_cmd(shards, new, 10, "--resume", str(path)))
        assert "\n" not in str(e.value)
    assert [p.name for p in new.iterdir()] == [".lock"]


# ------------------------------------------------------------------------------------------------------- resume

def test_kill9_with_phema_then_resume_without_the_flag_is_bit_identical(phema_run: Path, shards: Path,
                                                                         tmp_path: Path, capsys):
    """Killed between the checkpoints of steps 4 and 8, after the snapshots of step 6: the resume (which leaves
    --phema out: the run's profiles come from its checkpoint) replaces those snapshots and ends with the same averages
    and snapshot files, bit for bit, as the uninterrupted run."""
    out = tmp_path / "run"
    snapshots = out / "phema" / "snapshots"
    ckpts = out / "checkpoints"
    # Each checkpoint pauses 1 s before its rename: step-00000008.pt cannot appear before the kill below lands.
    proc = subprocess.Popen(phema_cmd(shards, out), cwd=ROOT, env={**ENV, PAUSE_ENV: "1.0"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    later = [snapshots / f"snapshot-00000006-{r}.pt" for r in ("0.0500", "0.1000")]
    wait_for(lambda: all(p.exists() for p in later), proc, "the snapshots of step 6", TIMEOUT)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert [p.name for p in ckpts.glob("step-*.pt")] == ["step-00000004.pt"]
    # Whatever the killed start left after its checkpoint must not survive the resume, even at a step that the
    # resumed start does not write again (7).
    for p in [*later, snapshots / "snapshot-00000007-0.0500.pt"]:
        p.write_bytes(b"stale")

    resumed = [a for a in phema_cmd(shards, out) if a != "--phema" and a != "0.05,0.1"]
    assert "--phema" not in resumed and "--phema-every" in resumed
    train_here(resumed)
    log = capsys.readouterr().out
    assert f"resuming from {ckpts / 'step-00000004.pt'}" in log
    assert "removed 3 post-hoc EMA snapshot file(s) after step 4" in log
    assert "post-hoc EMA: sigma_rel 0.05 (gamma 16.97), 0.1 (gamma 6.94)" in log
    assert json.loads((out / "config.json").read_text())["phema"] == "0.05,0.1"

    assert_same_weights(ckpts / "step-00000008.pt", phema_run / "checkpoints" / "step-00000008.pt")
    mine = load_checkpoint(ckpts / "step-00000008.pt")["phema"]
    theirs = load_checkpoint(phema_run / "checkpoints" / "step-00000008.pt")["phema"]
    assert {k: v for k, v in mine.items() if k != "averages"} == {k: v for k, v in theirs.items() if k != "averages"}
    for a, b in zip(mine["averages"], theirs["averages"], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert snapshot_files(out) == snapshot_files(phema_run)
    for name in snapshot_files(out):
        a = torch.load(snapshots / name, weights_only=True)
        b = torch.load(phema_run / "phema" / "snapshots" / name, weights_only=True)
        assert (a["step"], a["images_seen"], a["sigma_rel"]) == (b["step"], b["images_seen"], b["sigma_rel"])
        assert a["model"].keys() == b["model"].keys()
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name


def test_roll_back_moves_the_later_snapshots_aside(phema_run: Path, tmp_path: Path):
    copy = tmp_path / "run"
    shutil.copytree(phema_run, copy)
    aside = utills.roll_back(utills.run_paths(copy), 4)
    assert sorted(p.name for p in aside.rglob("snapshot-*.pt")) == \
        [f"snapshot-{s:08d}-{r}.pt" for s in (6, 8) for r in ("0.0500", "0.1000")]
    assert snapshot_files(copy) == [f"snapshot-{s:08d}-{r}.pt" for s in (2, 4) for r in ("0.0500", "0.1000")]
    (path,) = reconstruct(copy, [0.08], out=tmp_path / "out", log=quiet)  # now ends at step 4
    assert path.name == "phema-0.0800-step-00000004.pt"


# ----------------------------------------------------------------------------------------------------- patience

def test_out_of_patience_and_its_counter_in_the_checkpoint():
    """The counter itself: out_of_patience's rule, and evals_since_best (with the best FID and the post-hoc EMA
    profiles) through make_checkpoint, a weights_only save and restore_checkpoint."""
    model = _toy()
    model.config = {}  # make_checkpoint records the model's config
    state = TrainState(model, EMA(model), phema=PowerEMA(model, [0.05, 0.1]))
    cfg = TrainConfig(data="d", eval_every=2, patience=2)
    assert out_of_patience(cfg, state) == ""
    state.evals_since_best = 1
    assert out_of_patience(cfg, state) == ""
    state.evals_since_best = 2
    assert out_of_patience(cfg, state) == "no better FID in 2 evaluations; the best is none yet"
    state.best_fid, state.best_fid_step, state.evals_since_best = 41.234, 6, 3
    assert out_of_patience(cfg, state) == "no better FID in 3 evaluations; the best is 41.23 (step 6)"
    assert out_of_patience(TrainConfig(data="d", eval_every=2, patience=0), state) == ""  # 0: never
    assert out_of_patience(TrainConfig(data="d", eval_every=2, patience=4), state) == ""

    gen = torch.Generator().manual_seed(3)
    _set_weights(model, gen)
    state.phema.update(16, 16)
    state.step, state.images_seen = 1, 16
    buf = io.BytesIO()
    torch.save(make_checkpoint(state, config={}, diffusion_config={}, image_size=32, attributes=[]), buf)
    ckpt = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    fresh_model = _toy(seed=5)
    fresh = TrainState(fresh_model, EMA(fresh_model), phema=PowerEMA(fresh_model, [0.05, 0.1]))
    restore_checkpoint(ckpt, fresh)
    assert (fresh.evals_since_best, fresh.best_fid, fresh.best_fid_step, fresh.step) == (3, 41.234, 6, 1)
    assert out_of_patience(cfg, fresh) == out_of_patience(cfg, state)
    for a, b in zip(fresh.phema.averages, state.phema.averages, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # A checkpoint from before --patience: no evaluations counted yet.
    restore_checkpoint({k: v for k, v in ckpt.items() if k != "evals_since_best"}, fresh)
    assert fresh.evals_since_best == 0


def test_a_run_out_of_patience_does_not_train_on(phema_run: Path, shards: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, capsys):
    """A run whose checkpoint is out of patience (2 evaluations without a better FID) starts, says so and stops without
    a step, a checkpoint or a snapshot (the evaluations themselves take ~20 s each here: not run)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(STATUS_ENV, str(tmp_path / "status.json"))
    out = tmp_path / "run"
    shutil.copytree(phema_run, out)
    last = out / "checkpoints" / "step-00000008.pt"
    ckpt = torch.load(last, weights_only=True)
    ckpt.update(best_fid=50.0, best_fid_step=4, evals_since_best=2)
    torch.save(ckpt, last)
    before = sorted(p.name for p in out.rglob("*.pt"))
    result = train_here(phema_cmd(shards, out, 12, "--eval-every", "2", "--patience", "2", "--eval-n", "2",
                                  "--eval-steps", "1", "--eval-ref-max", "2"))
    log = capsys.readouterr().out
    assert result is None
    assert "this run stopped early at step 8: no better FID in 2 evaluations; the best is 50.00 (step 4)" in log
    assert sorted(p.name for p in out.rglob("*.pt")) == before
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "done" and status["step"] == 8 and "no better FID in 2" in status["early_stop"]


# ------------------------------------------------------------------------------------------------------- bench

def test_bench_phema_dtype_reports_fp16_against_fp32(phema_run: Path, tmp_path: Path):
    """bench/phema_dtype.py on the fp32 run: one row per length, fp16's weight difference of the order of fp16's
    rounding (its relative RMS, times at most the summed |coefficient|), and a JSON report."""
    from bench import phema_dtype as bench
    report = bench.main(bench.DtypeConfig(run=str(phema_run), sigma_rel="0.05,0.08", n=4, steps=2,
                                          json=str(tmp_path / "r.json")))
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == report["rows"]
    rounding = report["snapshot_fp16_rounding"]["relative_rms"]
    assert 0 < rounding < 1e-3
    for row in report["rows"]:
        assert 0 < row["weights_relative_rms_diff"] <= 2 * rounding * row["sum_abs_coefficient"]
        assert 0 <= row["pixels_mean_abs_diff_fp16_vs_fp32"] < 255

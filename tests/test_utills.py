"""utills.py: atomic checkpoints, pruning, verification and fallback, RNG capture/restore."""
import argparse
import random

import numpy as np
import pytest
import torch

from atomic import atomic_write
from utills import (
    CheckpointError,
    CheckpointWarning,
    atomic_save,
    capture_rng,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    read_metrics,
    resolve_checkpoint,
    restore_rng,
    save_checkpoint,
)


def _ckpt(step: int, value: float = 1.0) -> dict:
    return {
        "model": {"w": torch.full((3, 3), value), "steps": torch.tensor(step)},
        "ema": {"decay": 0.9, "num_updates": step, "shadow_params": [torch.full((3, 3), value)]},
        "step": step, "config": {"lr": 1e-3}, "model_config": {"base_channels": 8},
        "diffusion_config": {"timesteps": 10}, "rng": capture_rng(),
    }


def test_save_load_round_trip_and_pruning(tmp_path):
    for step in (10, 20, 30, 40):
        path = save_checkpoint(tmp_path, _ckpt(step, float(step)), step, keep=2)
        assert path == tmp_path / "checkpoints" / f"step-{step:08d}.pt"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000030.pt", "step-00000040.pt"]
    ck = load_checkpoint(tmp_path / "checkpoints" / "step-00000040.pt")
    assert ck["step"] == 40 and torch.equal(ck["model"]["w"], torch.full((3, 3), 40.0))
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))
    assert resolve_checkpoint(tmp_path).name == "step-00000040.pt"
    assert resolve_checkpoint(tmp_path / "checkpoints" / "step-00000030.pt").name == "step-00000030.pt"


def test_keep_zero_keeps_all_and_list_sorts_numerically(tmp_path):
    for step in (9, 100, 10):
        save_checkpoint(tmp_path, _ckpt(step), step, keep=0)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000009.pt", "step-00000010.pt",
                                                               "step-00000100.pt"]
    assert list_checkpoints(tmp_path / "nowhere") == []


def test_truncated_newest_falls_back_with_warning(tmp_path):
    save_checkpoint(tmp_path, _ckpt(1), 1, keep=3)
    newest = save_checkpoint(tmp_path, _ckpt(2), 2, keep=3)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="step-00000002.pt"):
        load_checkpoint(newest)
    with pytest.warns(CheckpointWarning, match="step-00000002.pt"):
        path, ck = find_latest(tmp_path)
    assert path.name == "step-00000001.pt" and ck["step"] == 1


def test_verification_rejects_garbage_missing_keys_and_nan(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(bad)
    incomplete = _ckpt(1)
    del incomplete["ema"]
    atomic_save(tmp_path / "incomplete.pt", incomplete)
    with pytest.raises(CheckpointError, match="missing keys ema"):
        load_checkpoint(tmp_path / "incomplete.pt")
    nan = _ckpt(1)
    nan["ema"]["shadow_params"][0][1, 1] = float("nan")
    atomic_save(tmp_path / "nan.pt", nan)
    with pytest.raises(CheckpointError, match="non-finite values in ema.shadow_params.0"):
        load_checkpoint(tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(tmp_path / "absent")
    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        resolve_checkpoint(tmp_path / "run")


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    atomic_save(tmp_path / "obj.pt", {**_ckpt(1), "config": argparse.Namespace(lr=1.0)})
    with pytest.raises(CheckpointError, match=r"refused and not loaded: the file holds Python objects that would run "
                                              r"code when unpickled, .* \(it names argparse.Namespace\)$"):
        load_checkpoint(tmp_path / "obj.pt")


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "x.pt"
    atomic_save(path, {"a": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")
    with pytest.raises(RuntimeError):
        atomic_save(path, {"a": Unpicklable()})
    assert torch.load(path, weights_only=True) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_stale_temp_files_are_cleaned(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / ".step-00000005.pt.tmp-999999").write_bytes(b"half")
    save_checkpoint(tmp_path, _ckpt(6), 6, keep=3)
    assert [p.name for p in folder.iterdir()] == ["step-00000006.pt"]


def test_rng_capture_restore_through_weights_only(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random()
    np.random.rand()
    torch.rand(1)
    atomic_save(tmp_path / "rng.pt", {"rng": capture_rng()})
    expected = (random.random(), np.random.rand(3), torch.rand(3), torch.randn(2))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    got = (random.random(), np.random.rand(3), torch.rand(3), torch.randn(2))
    assert got[0] == expected[0]
    assert np.array_equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2]) and torch.equal(got[3], expected[3])



def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "config.json"
    atomic_write(path, b'{"a": 1}')
    atomic_write(path, b'{"a": 2}')
    assert path.read_bytes() == b'{"a": 2}'
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]


def test_read_metrics_keeps_last_record_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 2.0), (2, 0.5)]
    assert read_metrics(tmp_path / "missing.jsonl") == []


# ------------------------------------------------------------------------------------------- the checkpoint contract

from pathlib import Path  # noqa: E402

from diffusion import GaussianDiffusion  # noqa: E402
from ema import EMA  # noqa: E402
from unet import build_unet  # noqa: E402
from utills import (  # noqa: E402
    FORMAT_VERSION,
    TrainState,
    load_model,
    make_checkpoint,
    pack_ranks,
    restore_checkpoint,
    this_rank,
    upgrade,
)

V0_RUN = Path(__file__).resolve().parent / "fixtures" / "v0-run"


def _train_state(seed: int) -> TrainState:
    torch.manual_seed(seed)
    model = build_unet("tiny", image_size=16, base_channels=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    ema = EMA(model, decay=0.9)
    model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2])).square().mean().backward()
    optimizer.step()
    scheduler.step()
    ema.update()
    return TrainState(model, ema, optimizer, torch.amp.GradScaler("cpu", enabled=False), scheduler, step=7, epoch=1,
                      images_seen=56)


def test_make_and_restore_checkpoint_round_trip(tmp_path):
    state = _train_state(0)
    ckpt = make_checkpoint(state, config={"lr": 1e-3}, diffusion_config=GaussianDiffusion(timesteps=100).config,
                           image_size=16, attributes=[], data_state={"order": "global", "epoch": 1},
                           rngs=[capture_rng(), capture_rng()])
    assert ckpt["format_version"] == FORMAT_VERSION
    path = save_checkpoint(tmp_path, ckpt, 7, keep=1)
    loaded = load_checkpoint(path)
    fresh = _train_state(1)
    resumed = restore_checkpoint(loaded, fresh, rank=1, world_size=2)
    assert (fresh.step, fresh.epoch, fresh.images_seen) == (7, 1, 56)
    assert resumed.data_state == {"order": "global", "epoch": 1} and set(resumed.rng) >= {"python", "numpy", "torch"}
    for a, b in zip(state.model.state_dict().values(), fresh.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert fresh.optimizer.state_dict()["state"][0]["step"] == 1
    # Another number of ranks: the one position still, but no random states for this rank (dropout masks).
    resumed = restore_checkpoint(loaded, _train_state(2), rank=0, world_size=1)
    assert resumed.data_state == {"order": "global", "epoch": 1} and resumed.rng is None


def test_pack_ranks_and_this_rank():
    packed = pack_ranks(["a", "b"])
    assert packed == {"world_size": 2, "ranks": ["a", "b"]}
    assert [this_rank(packed, r, 2) for r in (0, 1)] == ["a", "b"]
    assert this_rank(packed, 0, 4) is None and this_rank(None, 0, 1) is None


def test_version_0_layouts_are_upgraded():
    single = {"step": 1, "rng": {"python": 1}, "data_state": {"epoch": 0}}
    up = upgrade(single)
    assert up["format_version"] == FORMAT_VERSION and up["upgraded_from"] == 0
    assert up["rng"] == {"world_size": 1, "ranks": [{"python": 1}]}
    assert this_rank(up["data_state"], 0, 1) == {"epoch": 0}
    multi = {"step": 1, "rng": {"python": 0, "ranks": [{"python": 0}, {"python": 1}]},
             "data_state": {"world_size": 2, "ranks": [{"rank": 0}, {"rank": 1}]}}
    up = upgrade(multi)
    assert this_rank(up["rng"], 1, 2) == {"python": 1} and this_rank(up["data_state"], 1, 2) == {"rank": 1}
    # Version 1 keeps its per-rank data positions (train.py goes on in that order on the same number of ranks).
    v1 = {"format_version": 1, "data_state": {"world_size": 2, "ranks": [{"rank": 0}, {"rank": 1}]}}
    assert upgrade(v1)["data_state"] == v1["data_state"] and upgrade(v1)["upgraded_from"] == 1
    with pytest.raises(CheckpointError, match="format version 99 is newer"):
        upgrade({"format_version": 99})


def test_the_version_0_fixture_loads_and_samples():
    ckpt = load_checkpoint(V0_RUN / "checkpoints" / "step-00000002.pt")
    assert ckpt["format_version"] == FORMAT_VERSION and ckpt["rng"]["world_size"] == 1
    loaded = load_model(V0_RUN)
    assert (loaded.step, loaded.weights, loaded.image_size, loaded.conditional) == (2, "ema", 32, False)
    x = loaded.diffusion.sample(loaded.model, (2, 3, 32, 32), steps=2,
                                noise=torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()


def test_checkpoint_keys_come_from_make_checkpoint(tmp_path):
    """Every key a training checkpoint holds is one make_checkpoint writes (tiny_run's hand-made one included)."""
    keys = set(make_checkpoint(_train_state(0), config={}, diffusion_config={}, image_size=16, attributes=[]))
    assert keys >= {"format_version", "model", "ema", "optimizer", "scaler", "lr_scheduler", "step", "epoch",
                    "images_seen", "data_state", "rng", "config", "model_config", "diffusion_config", "image_size",
                    "attributes", "versions"}
    import tiny_run
    run = tiny_run.conditional_run(type("F", (), {"getbasetemp": staticmethod(lambda: tmp_path)})())
    assert set(load_checkpoint(list_checkpoints(run)[-1])) == keys

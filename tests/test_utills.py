"""utills.py: atomic checkpoints, pruning, verification and fallback, RNG capture/restore."""
import argparse
import random

import numpy as np
import pytest
import torch

from utills import (CheckpointError, CheckpointWarning, atomic_save, atomic_write_bytes, capture_rng, find_latest,
                    list_checkpoints, load_checkpoint, read_metrics, resolve_checkpoint, restore_rng, save_checkpoint)


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
    atomic_save(incomplete, tmp_path / "incomplete.pt")
    with pytest.raises(CheckpointError, match="missing keys ema"):
        load_checkpoint(tmp_path / "incomplete.pt")
    nan = _ckpt(1)
    nan["ema"]["shadow_params"][0][1, 1] = float("nan")
    atomic_save(nan, tmp_path / "nan.pt")
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
    atomic_save({**_ckpt(1), "config": argparse.Namespace(lr=1.0)}, tmp_path / "obj.pt")
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_checkpoint(tmp_path / "obj.pt")


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "x.pt"
    atomic_save({"a": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")
    with pytest.raises(RuntimeError):
        atomic_save({"a": Unpicklable()}, path)
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
    random.random(); np.random.rand(); torch.rand(1)
    atomic_save({"rng": capture_rng()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(3), torch.rand(3), torch.randn(2))
    random.seed(99); np.random.seed(99); torch.manual_seed(99)
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    got = (random.random(), np.random.rand(3), torch.rand(3), torch.randn(2))
    assert got[0] == expected[0]
    assert np.array_equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2]) and torch.equal(got[3], expected[3])



def test_atomic_write_bytes_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "config.json"
    atomic_write_bytes(b'{"a": 1}', path)
    atomic_write_bytes(b'{"a": 2}', path)
    assert path.read_bytes() == b'{"a": 2}'
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]


def test_read_metrics_keeps_last_record_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 2.0), (2, 0.5)]
    assert read_metrics(tmp_path / "missing.jsonl") == []

"""data.py over the session's shards (tests/conftest.py: 203 fake faces at 32x32, 163 of them in train, 64 a shard).

Both backends: exact samples per epoch, the same pixels for the same samples, shuffles that are permutations and
change each epoch, one global order that ranks slice (the same on any number of ranks), exact resume (shuffle and
flips included) mid-epoch and at an epoch boundary, on 2 -> 1 -> 3 ranks and with another batch size, --where
subsets, the flip rate, the attribute count from the manifest, and each error with its one-line message; the
per-rank loaders of checkpoint format 1 (data_v1.py) still resume their states. A sample is
known by its pixels: the index of the reference image (or its mirror) it shows, every fake face being different. The
torch backend mostly runs in-process (num_threads=0) to keep the file fast; one test checks that DataLoader workers
give the same batches.
"""
from __future__ import annotations

import io
import json
import platform
import shutil
import sys
from pathlib import Path

import pytest
import torch

import data
import data_v1
from data import DaliMissingError, DataError, ShardReadError, make_loader
from fake_celeba import ATTRIBUTES

BACKENDS = ["dali", "torch"]
TRAIN = 163  # conftest: 203 images, 163 in the train split


def loader(shards: Path, backend: str, batch_size: int = 32, **kw) -> data.Loader:
    kw.setdefault("device", "cpu")
    kw.setdefault("num_threads", 0 if backend == "torch" else 2)
    return make_loader(shards, batch_size, backend=backend, **kw)


def epoch(ld: data.Loader) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One epoch: images [N,3,S,S], attributes [N,A] and the batch sizes."""
    images, attrs, sizes = [], [], []
    for b in ld:
        images.append(b["image"])
        attrs.append(b["attr"])
        sizes.append(len(b["image"]))
        assert b["attr"].shape == (len(b["image"]), len(ld.attributes))
    return torch.cat(images), torch.cat(attrs), sizes


@pytest.fixture(scope="module")
def reference(shards: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N,3,S,S] and attributes [N,A] of the train samples in manifest order (the torch backend, unshuffled and
    unflipped): sample i is index i."""
    images, attrs, _ = epoch(loader(shards, "torch", shuffle=False, flip=False))
    return images, attrs


def identify(images: torch.Tensor, reference: tuple[torch.Tensor, torch.Tensor]) -> list[int]:
    """Which reference sample each image is: the nearest reference image or mirror image, checked to be that image
    within 2/255 (two JPEG decoders differ by that much; flips are exact)."""
    ref = reference[0].flatten(1)
    x = images.float().flatten(1)
    ids = torch.minimum(torch.cdist(x, ref), torch.cdist(x, reference[0].flip(-1).flatten(1))).argmin(1)
    nearest = reference[0][ids]
    off = torch.minimum(*((images - r).abs().flatten(1).amax(1) for r in (nearest, nearest.flip(-1))))
    assert off.max() * 127.5 <= 2.0, f"not a reference image or its mirror: {off.max() * 127.5:.1f}/255 away"
    return ids.tolist()


@pytest.fixture
def broken(shards: Path, tmp_path: Path) -> Path:
    """A private copy of the shards to damage."""
    return Path(shutil.copytree(shards, tmp_path / "shards"))


# ---------------------------------------------------------------------------------------------------------------
# Counts, pixels, shuffles, ranks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_size,drop_last,sizes", [
    (32, False, [32] * 5 + [3]),  # partial last batch
    (32, True, [32] * 5),
    (163, False, [163]),  # exactly one full batch
    (163, True, [163]),
    (200, False, [163]),  # one partial batch
])
def test_each_sample_once_per_epoch(shards, reference, backend, batch_size, drop_last, sizes):
    ld = loader(shards, backend, batch_size, drop_last=drop_last)
    assert (len(ld), ld.num_samples, ld.image_size, ld.attributes) == (len(sizes), TRAIN, 32, ATTRIBUTES)
    for e in range(2):
        assert ld.epoch == e
        images, attrs, got = epoch(ld)
        assert got == sizes
        ids = identify(images, reference)
        assert len(set(ids)) == len(ids) == sum(sizes)
        assert torch.equal(attrs, reference[1][ids])
        assert images.shape == (sum(sizes), 3, 32, 32) and images.dtype == torch.float32
        assert -1 <= images.min() < -0.5 and 0.5 < images.max() <= 1
        assert attrs.dtype == torch.int64 and set(attrs.unique().tolist()) <= {0, 1}
    assert ld.epoch == 2


def test_drop_last_without_a_full_batch_is_an_error(shards):
    with pytest.raises(DataError, match="fewer than one batch"):
        loader(shards, "torch", 200, drop_last=True)


def test_same_pixels_and_attributes_through_both_backends(shards, reference):
    # In order (shuffle=False, flip=False): the same samples, pixels within 2/255 (two JPEG decoders), attributes.
    images, attrs, _ = epoch(loader(shards, "dali", shuffle=False, flip=False))
    assert images.shape == reference[0].shape and (images - reference[0]).abs().max() * 127.5 <= 2.0
    assert torch.equal(attrs, reference[1])
    # Shuffled and flipped: each sample is its reference image or that image's mirror (identify checks), with its
    # attributes, in both backends.
    for backend in BACKENDS:
        images, attrs, _ = epoch(loader(shards, backend, seed=5))
        assert torch.equal(attrs, reference[1][identify(images, reference)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_shuffle_is_a_new_permutation_each_epoch(shards, reference, backend):
    def order(ld: data.Loader) -> list[int]:
        return identify(epoch(ld)[0], reference)

    ld = loader(shards, backend, seed=1)
    orders = [order(ld) for _ in range(3)]
    for o in orders:
        assert sorted(o) == list(range(TRAIN))
    assert orders[0] != list(range(TRAIN)) and len({tuple(o) for o in orders}) == 3
    assert order(loader(shards, backend, seed=1)) == orders[0]  # the same seed, the same first epoch
    assert order(loader(shards, backend, seed=2)) != orders[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_slice_the_one_global_order(shards, reference, backend):
    # Two ranks of 16 take, step by step, the halves of what one rank of 32 takes: the same samples, flips and
    # pixels, in the same order, every epoch (5 steps; the 3 samples left wait for the next epoch's order).
    whole = loader(shards, backend, 32, seed=7, drop_last=True)
    parts = [loader(shards, backend, 16, seed=7, rank=r, world_size=2, drop_last=True) for r in range(2)]
    assert [p.num_samples for p in parts] == [TRAIN, TRAIN] and [len(p) for p in parts] == [5, 5] and len(whole) == 5
    seen = set()
    for _ in range(2):
        w, p0, p1 = epoch(whole), epoch(parts[0]), epoch(parts[1])
        assert p0[2] == p1[2] == [16] * 5
        joined = torch.cat([torch.cat([a, b]) for a, b in zip(p0[0].split(16), p1[0].split(16))])
        assert torch.equal(joined, w[0])
        ids = identify(joined, reference)
        assert len(set(ids)) == 160
        seen |= set(ids)
    assert len(seen) > 160  # another order the second epoch
    with pytest.raises(DataError, match=r"several ranks \(2\) read with drop_last=True only"):
        loader(shards, backend, 16, rank=0, world_size=2)
    # With drop_last every rank gives the same number of full batches (equal DDP steps).
    parts = [loader(shards, backend, 41, rank=r, world_size=2, drop_last=True) for r in range(2)]
    assert [len(p) for p in parts] == [1, 1] and [epoch(p)[2] for p in parts] == [[41], [41]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_epoch_resumed_on_2_then_1_then_3_ranks_sees_every_sample_once(shards, reference, backend):
    # A global batch of 12 (13 steps an epoch, 7 samples left over): 4 steps on 2 ranks, 5 on 1, the rest on 3.
    kw = dict(seed=3, drop_last=True)
    expected = epoch(loader(shards, backend, 12, **kw))[0]
    got, state = [], None
    for world, steps in ((2, 4), (1, 5), (3, None)):
        ranks = [loader(shards, backend, 12 // world, rank=r, world_size=world, state=state, **kw)
                 for r in range(world)]
        assert {(ld.epoch, ld.samples) for ld in ranks} == {(0, 0 if state is None else state["samples"])}
        streams = [iter(ld) for ld in ranks]
        for _ in range(steps or 99):
            batch = [next(s, None) for s in streams]
            if batch[0] is None:
                assert all(b is None for b in batch)
                break
            got.append(torch.cat([b["image"] for b in batch]))
        states = [saved(ld.state_dict()) for ld in ranks]
        assert all(st == states[0] for st in states)  # one position for all ranks
        state = states[0]
    assert state["epoch"] == 1 and state["samples"] == 0
    got = torch.cat(got)
    assert torch.equal(got, expected)  # the very images, flips included, of the uninterrupted epoch
    ids = identify(got, reference)
    assert len(ids) == len(set(ids)) == 13 * 12


@pytest.mark.parametrize("backend", BACKENDS)
def test_another_batch_size_continues_the_epoch(shards, reference, backend):
    ld = loader(shards, backend, 20, seed=9)
    first = [next(iter(ld))["image"] for _ in range(1)]
    state = saved(ld.state_dict())
    assert (state["epoch"], state["samples"]) == (0, 20)
    rest = epoch(loader(shards, backend, 7, seed=9, state=state))
    assert rest[2] == [7] * 20 + [3]
    ids = identify(torch.cat([*first, rest[0]]), reference)
    assert sorted(ids) == list(range(TRAIN))


@pytest.mark.parametrize("backend", BACKENDS)
def test_where_trains_on_the_matching_samples(shards, reference, backend):
    names = ATTRIBUTES
    male, glasses = names.index("Male"), names.index("Eyeglasses")
    want = ((reference[1][:, male] == 0) & (reference[1][:, glasses] == 0)).nonzero().flatten().tolist()
    ld = loader(shards, backend, 8, where="Male=0, Eyeglasses=0", seed=1)
    assert ld.num_samples == len(want) and 8 < len(want) < TRAIN
    images, attrs, _ = epoch(ld)
    assert sorted(identify(images, reference)) == want
    assert (attrs[:, male] == 0).all() and (attrs[:, glasses] == 0).all()
    state = saved(ld.state_dict())
    assert state["where"] == "Male=0, Eyeglasses=0" and state["num_samples"] == len(want)
    with pytest.raises(DataError, match="where="):
        loader(shards, backend, 8, seed=1, state=state)  # the whole split: another order


@pytest.mark.parametrize("where,message", [
    ("Bald=1,Nope=0", r"unknown attribute 'Nope' \(the shards have: 5_o_Clock_Shadow, "),
    ("Male", r"'Male' is not NAME=0 or NAME=1"),
    ("Male=2", r"'Male=2' is not NAME=0 or NAME=1"),
    ("Male=1,Male=0", r"no sample of split 'train' in .*manifest.json matches"),
])
def test_bad_where_is_one_line(shards, where, message):
    with pytest.raises(DataError, match=message) as e:
        loader(shards, "torch", 8, where=where)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flip_rate(shards, reference, backend):
    flipped = []
    ld = loader(shards, backend, 64, seed=3)
    for _ in range(3):
        images = epoch(ld)[0]
        for k, im in zip(identify(images, reference), images):
            ref = reference[0][k]
            same, mirror = (im - ref).abs().max(), (im - ref.flip(-1)).abs().max()
            if abs(same - mirror) > 0.05:  # skip the (rare) images that are their own mirror image
                flipped.append(bool(mirror < same))
    assert len(flipped) > 400
    assert 0.42 < sum(flipped) / len(flipped) < 0.58
    unflipped = epoch(loader(shards, backend, 64, flip=False))[0]
    ids = identify(unflipped, reference)
    assert (unflipped - reference[0][ids]).abs().max() * 127.5 <= 2.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_batches(shards, backend):
    b = next(iter(loader(shards, backend, dtype=torch.float16)))
    assert b["image"].dtype == torch.float16 and b["image"].shape == (32, 3, 32, 32)


def test_torch_workers_give_the_same_batches(shards):
    inline = epoch(loader(shards, "torch", 20, seed=4))
    workers = loader(shards, "torch", 20, seed=4, num_threads=2)
    assert workers._loader.num_workers == 2
    pooled = epoch(workers)
    assert pooled[2] == inline[2] and torch.equal(pooled[0], inline[0]) and torch.equal(pooled[1], inline[1])


def test_dali_on_cuda_falls_back_to_cpu_without_a_gpu(shards):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.warns(UserWarning, match="CUDA is not available"):
        ld = make_loader(shards, 32, backend="dali", device="cuda", num_threads=2)
    assert ld.device == torch.device("cpu")
    b = next(iter(ld))
    assert b["image"].device.type == "cpu" and b["attr"].device.type == "cpu"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_decode_matches_cpu_decode(shards64):
    kw = dict(shuffle=False, flip=False, num_threads=2)
    gpu = list(make_loader(shards64, 64, backend="dali", device="cuda", dtype=torch.float16, **kw))
    cpu = list(make_loader(shards64, 64, backend="dali", device="cpu", **kw))
    assert [len(b["image"]) for b in gpu] == [len(b["image"]) for b in cpu]
    for g, c in zip(gpu, cpu):  # the same samples in the same order: pixels within 2/255, the same attributes
        assert g["image"].device.type == "cuda" and g["image"].dtype == torch.float16
        assert g["attr"].device.type == "cuda" and torch.equal(g["attr"].cpu(), c["attr"])
        assert (g["image"].float().cpu() - c["image"]).abs().max() * 127.5 <= 2.0


# ---------------------------------------------------------------------------------------------------------------
# Resume


def saved(state: dict) -> dict:
    """A state through torch.save and torch.load(weights_only=True), as in a checkpoint."""
    buf = io.BytesIO()
    torch.save({"data_state": state}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)["data_state"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stop", [0, 2, 6, 8])  # start, mid-epoch 0, end of epoch 0, mid-epoch 1 (6 an epoch)
def test_resume_gives_the_batches_that_would_have_come_next(shards, backend, stop):
    kw = dict(batch_size=30, seed=11)
    expected = [b for ld in [loader(shards, backend, **kw)] for _ in range(3) for b in ld]
    ld = loader(shards, backend, **kw)
    batches = iter(ld)
    for i in range(stop):
        if i == 6:
            batches = iter(ld)  # the next epoch
        next(batches)
    state = saved(ld.state_dict())
    assert (state["epoch"], state["samples"]) == (stop // 6, stop % 6 * 30)
    resumed = loader(shards, backend, state=state, **kw)
    assert resumed.epoch == stop // 6
    got = [b for _ in range(3 - stop // 6) for b in resumed]
    assert len(got) == len(expected) - stop
    for g, e in zip(got, expected[stop:]):
        assert torch.equal(g["image"], e["image"]) and torch.equal(g["attr"], e["attr"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_reading_the_position_between_batches(shards, reference, backend):
    # A training loop asks for loader.epoch and state_dict() before each batch, and starts a new iteration when
    # the last one is exhausted: the epochs still come whole, one after the other.
    ld = loader(shards, backend, 40, seed=2)
    batches, seen = iter(ld), {}
    while len(seen) < 3 or len(seen[2]) < TRAIN:
        e, state = ld.epoch, ld.state_dict()
        assert (state["epoch"], state["samples"]) == (e, len(seen.get(e, [])))
        batch = next(batches, None)
        if batch is None:
            batches = iter(ld)
            continue
        seen.setdefault(e, []).extend(identify(batch["image"], reference))
    assert sorted(seen) == [0, 1, 2] and all(sorted(k) == sorted(seen[0]) and len(k) == TRAIN for k in seen.values())


def test_a_state_of_another_order_is_refused(shards):
    ld = loader(shards, "torch")
    next(iter(ld))
    state = saved(ld.state_dict())
    with pytest.raises(DataError, match=r"cannot resume the data position: seed=0 \(now 1\)"):
        loader(shards, "torch", 16, seed=1, state=state)
    with pytest.raises(DataError, match="from before format 2"):
        loader(shards, "dali", state={"world_size": 1, "ranks": [state]})
    # The other backend continues the same order (the same samples and flips; two JPEG decoders within 2/255).
    a, b = (next(iter(loader(shards, backend, state=state)))["image"] for backend in BACKENDS)
    assert (a - b).abs().max() * 127.5 <= 2.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_format_1_per_rank_states_still_resume(shards, backend):
    # data_v1.py keeps the loaders of checkpoint formats 0 and 1 for the runs that go on in their old order.
    kw = dict(seed=11, device="cpu", num_threads=0 if backend == "torch" else 2, backend=backend)
    expected = [b for ld in [data_v1.make_loader(shards, 30, **kw)] for _ in range(2) for b in ld]
    ld = data_v1.make_loader(shards, 30, **kw)
    batches = iter(ld)
    for _ in range(2):
        next(batches)
    state = saved(ld.state_dict())
    assert data_v1.is_v1_state(state) and (state["epoch"], state["batches"]) == (0, 2)
    resumed = data_v1.make_loader(shards, 30, state=state, **kw)
    got = [b for _ in range(2) for b in resumed]
    assert len(got) == len(expected) - 2
    for g, e in zip(got, expected[2:]):
        assert torch.equal(g["image"], e["image"]) and torch.equal(g["attr"], e["attr"])


# ---------------------------------------------------------------------------------------------------------------
# Errors


def one_line(excinfo: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_manifest(tmp_path, backend):
    with pytest.raises(FileNotFoundError) as e:
        make_loader(tmp_path, 8, backend=backend, device="cpu")
    one_line(e, tmp_path / "manifest.json")


def test_unreadable_manifest(broken):
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable manifest") as e:
        make_loader(broken, 8, backend="torch", device="cpu")
    one_line(e, broken / "manifest.json")


def test_missing_or_empty_split(broken):
    with pytest.raises(DataError, match="no split 'holdout'") as e:
        make_loader(broken, 8, split="holdout", backend="torch", device="cpu")
    one_line(e, broken / "manifest.json")
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["splits"]["valid"] = {"count": 0, "shards": []}
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="'valid' is empty") as e:
        make_loader(broken, 8, split="valid", backend="dali", device="cpu")
    one_line(e, broken / "manifest.json")


@pytest.mark.parametrize("suffix", ["tar", "idx"])
def test_missing_tar_or_index(broken, suffix):
    victim = broken / f"train-000001.{suffix}"
    victim.unlink()
    with pytest.raises(FileNotFoundError, match="missing") as e:
        make_loader(broken, 8, backend="dali", device="cpu")
    one_line(e, victim)


def test_changed_tar_caught_at_start_up(broken):
    tar = broken / "train-000002.tar"
    data_bytes = bytearray(tar.read_bytes())
    tar.write_bytes(data_bytes[:-512])
    with pytest.raises(DataError, match="manifest says") as e:
        make_loader(broken, 8, backend="torch", device="cpu")
    one_line(e, tar)
    data_bytes[1000] ^= 0xFF  # same size, other bytes: only the checksum sees it
    tar.write_bytes(data_bytes)
    make_loader(broken, 8, backend="torch", device="cpu")
    with pytest.raises(DataError, match="sha256") as e:
        make_loader(broken, 8, backend="torch", device="cpu", verify=True)
    one_line(e, tar)


@pytest.mark.parametrize("backend,workers", [("dali", 2), ("torch", 0), ("torch", 2)])
def test_truncated_tar_met_while_reading(broken, backend, workers):
    ld = make_loader(broken, 16, backend=backend, device="cpu", shuffle=False, num_threads=workers)
    tar = broken / "train-000001.tar"
    with open(tar, "r+b") as f:
        f.truncate(tar.stat().st_size // 2)
    with pytest.raises(ShardReadError, match="truncated") as e:
        for _ in range(2):
            for _ in ld:
                pass
    one_line(e, tar)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_broken_jpeg_is_one_line_naming_its_sample(broken, backend):
    """The same size, its marker segments overwritten (DALI's CPU decoder would crash the process on it: the DALI
    reader checks the framing first, data.check_image_structure)."""
    tar = broken / "train-000001.tar"
    line = (broken / "train-000001.idx").read_text().splitlines()[6].split()
    offset, size = next((int(line[i + 1]), int(line[i + 2])) for i in range(0, len(line), 4)
                        if line[i + 3].endswith(".jpg"))
    with open(tar, "r+b") as f:
        f.seek(offset + 2)
        f.write(bytes(size - 4))
    key = line[3].split(".")[0]
    with pytest.raises(ShardReadError, match=f"sample {key}: cannot decode its jpg") as e:
        for _ in loader(broken, backend, 16, shuffle=False):
            pass
    one_line(e, tar)


def test_read_error_frees_the_workers_and_a_retry_continues(broken):
    """A failed epoch stops its DataLoader workers at once; once the tar is back, iterating again goes on from the
    failed batch with fresh workers."""
    import multiprocessing

    ld = make_loader(broken, 16, backend="torch", device="cpu", shuffle=False, flip=False, num_threads=2)
    tar = broken / "train-000001.tar"
    good = tar.read_bytes()
    before = set(multiprocessing.active_children())
    seen = 0
    with pytest.raises(ShardReadError, match="truncated"):
        tar.write_bytes(good[:len(good) // 2])
        for b in ld:
            seen += len(b["image"])
    assert 0 < seen < ld.num_samples
    assert not set(multiprocessing.active_children()) - before, "workers of the failed epoch are still running"
    tar.write_bytes(good)
    assert seen + sum(len(b["image"]) for b in ld) == ld.num_samples


def test_exit_stops_workers_that_outlive_their_loader(shards, tmp_path):
    """Workers ignore SIGTERM (train.py checkpoints on it), so exit must stop them itself, even when their iterator
    outlives the DataLoader, as it does when a traceback keeps a failed epoch's frames: multiprocessing's own exit
    handler would otherwise wait on them forever."""
    import subprocess

    script = tmp_path / "keep_iterator.py"
    script.write_text(f"""
import gc, sys
sys.path.insert(0, {str(Path(data.__file__).parent)!r})
from data import make_loader
import weakref
ld = make_loader({str(shards)!r}, 16, backend="torch", device="cpu", num_threads=2)
for _ in ld:  # a whole epoch: the iterator's sampler is done and no longer holds the loader
    pass
kept = ld._loader._iterator  # the iterator alone survives, as a traceback's frames would keep it
loader = weakref.ref(ld._loader)
del ld
gc.collect()
assert loader() is None and all(w.is_alive() for w in kept._workers)
print("exiting", flush=True)
""")
    try:
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the process hung at exit waiting on its DataLoader workers")
    assert out.returncode == 0 and "exiting" in out.stdout, out.stderr


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc tuning is glibc's mallopt")
@pytest.mark.parametrize("setting", ["1", "0"])
def test_a_cpu_dali_loader_keeps_batch_memory_mapped(shards, tmp_path, setting):
    """Building a CPU DALI loader tunes glibc once per process (in a subprocess: the setting is process-wide), unless
    DDPM_MALLOC_TUNING=0."""
    import os
    import subprocess

    script = tmp_path / "tuned.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(Path(data.__file__).parent)!r})
import data
assert data._malloc_tuned is None  # importing data.py changes nothing
ld = data.make_loader({str(shards)!r}, 16, backend="dali", device="cpu")
print(data._malloc_tuned, data.keep_batch_memory_mapped())
""")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DDPM_MALLOC_TUNING": setting})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == (["True", "True"] if setting == "1" else ["False", "False"])


def test_without_dali(shards, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # `import nvidia.dali` now fails as if not installed
    with pytest.raises(DaliMissingError, match="pip install nvidia-dali-cuda130") as e:
        make_loader(shards, 8, backend="dali", device="cpu")
    assert "\n" not in str(e.value)
    assert len(next(iter(make_loader(shards, 8, backend="torch", device="cpu", num_threads=0)))["image"]) == 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_without_attributes(celeba_src, tmp_path_factory, backend):
    out = tmp_path_factory.getbasetemp() / "plain_shards"
    if not (out / "manifest.json").exists():  # a plain folder of images: no attributes, everything in train
        from prepare_shards import PrepareConfig, prepare

        folder = tmp_path_factory.mktemp("plain")
        for p in sorted((celeba_src / "img_align_celeba").glob("*.jpg"))[:40]:
            shutil.copy(p, folder / p.name)
        prepare(PrepareConfig(src=str(folder), out=str(out), size=32, samples_per_shard=16, workers=1))
    ld = loader(out, backend, 16)
    assert ld.attributes == [] and ld.num_samples == 40
    batches = list(ld)
    assert [len(b["image"]) for b in batches] == [16, 16, 8] and all("attr" not in b for b in batches)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attribute_count_comes_from_the_manifest(celeba_src, tmp_path_factory, backend):
    out = tmp_path_factory.getbasetemp() / "five_attribute_shards"
    lines = (celeba_src / "list_attr_celeba.txt").read_text().splitlines()
    rows = [line.split()[:6] for line in lines[2:26]]  # 24 images, the first 5 of CelebA's 40 attributes
    if not (out / "manifest.json").exists():
        from prepare_shards import PrepareConfig, prepare

        src = tmp_path_factory.mktemp("five") / "celeba"
        (src / "img_align_celeba").mkdir(parents=True)
        for r in rows:
            shutil.copy(celeba_src / "img_align_celeba" / r[0], src / "img_align_celeba" / r[0])
        table = [str(len(rows)), " ".join(lines[1].split()[:5])] + [" ".join(r) for r in rows]
        (src / "list_attr_celeba.txt").write_text("\n".join(table) + "\n")
        prepare(PrepareConfig(src=str(src), out=str(out), size=32, samples_per_shard=16, workers=1))
    ld = loader(out, backend, 16)
    assert ld.attributes == ATTRIBUTES[:5] and ld.num_samples == 24
    _, attrs, sizes = epoch(ld)  # epoch() checks each batch's attr is [B, 5]
    assert sizes == [16, 8]
    expected = sorted([int(v == "1") for v in r[1:]] for r in rows)
    assert sorted(attrs.tolist()) == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_manifest_whose_attributes_disagree_with_the_shards(broken, backend):
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["attributes"] = manifest["attributes"][:39]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="39") as e:  # the torch backend at start-up, DALI at the first batch
        next(iter(loader(broken, backend)))
    assert "\n" not in str(e.value) and str(broken) in str(e.value)

"""prepare_shards.py: every layout, pixels against an independent crop and resize, attributes, DALI indexes,
determinism, interruption and resume, and each kind of bad input.

Sources are fake CelebAs from fake_celeba.py (tests/conftest.py builds the shared 203-image one); everything runs at
--size 32 with one in-process worker unless the test is about workers, so the file stays fast on 2 cores.
"""
from __future__ import annotations

import io
import json
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import prepare_shards as ps
from fake_celeba import ATTRIBUTES, make_fake_celeba

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_ARGS = dict(size=32, format="jpg", split="all", samples_per_shard=64, workers=1)  # as conftest's `shards`


# --------------------------------------------------------------------------------------------------------------------
# Independent readers of what prepare_shards writes, and of what CelebA's metadata says.
# --------------------------------------------------------------------------------------------------------------------

def run(src: Path | str, out: Path, **kw) -> dict:
    args = dict(FIXTURE_ARGS, **kw)
    return ps.prepare(ps.PrepareConfig(src=str(src), out=str(out), **args))


def read_tar(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """[(key, {ext: bytes})] in tar order, keys split at the first dot as webdataset does."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            assert m.isfile() and m.mtime == 0 and m.uid == m.gid == 0 and m.uname == m.gname == ""
            key, ext = m.name.split(".", 1)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tar.extractfile(m).read()
    return samples


def read_split(out: Path, split: str) -> list[tuple[str, dict[str, bytes]]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [s for shard in manifest["splits"][split]["shards"] for s in read_tar(out / shard["tar"])]


def metadata(src: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """{image name: 40 attributes as 0/1} and {image name: split} read straight from CelebA's .txt files."""
    lines = (src / "list_attr_celeba.txt").read_text().splitlines()
    assert lines[1].split() == list(ATTRIBUTES)
    attrs = {r.split()[0]: [1 if v == "1" else 0 for v in r.split()[1:]] for r in lines[2:] if r.strip()}
    parts = {n: ("train", "valid", "test")[int(p)] for n, p in
             (ln.split() for ln in (src / "list_eval_partition.txt").read_text().splitlines() if ln.strip())}
    return attrs, parts


def reference(data: bytes, size: int, crop: str = "celeba") -> np.ndarray:
    """The crop and resize written out longhand at full resolution: what every shard image must be close to."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    if crop == "celeba":
        assert (w, h) == (178, 218)
        box = (89 - 64, 121 - 64, 89 + 64, 121 + 64)
    else:
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    return np.asarray(img.crop(box).resize((size, size), Image.Resampling.LANCZOS))


def decode(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.mode == "RGB"
    return np.asarray(img)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def wds2idx(tar_path: Path) -> str:
    """The index as DALI's tools/wds2idx.py builds it with tarfile (its fallback path): data offsets, tar order."""
    bundles: list[list[str]] = []
    last = None
    with tarfile.open(tar_path) as tar:
        for m in tar:
            base, ext = m.name.split(".", 1)
            if base != last:
                bundles.append([])
                last = base
            bundles[-1].append(f"{ext} {m.offset_data} {m.size} {m.name}")
    return f"v1.2 {len(bundles)}\n" + "".join(" ".join(b) + "\n" for b in bundles)


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def small_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """40-image fake CelebAs in the official, Kaggle and zip layouts."""
    base = tmp_path_factory.mktemp("layouts")
    return {layout: make_fake_celeba(base / layout, 40, seed=1, layout=layout) for layout in
            ("official", "kaggle", "zip")}


# --------------------------------------------------------------------------------------------------------------------
# What the shards hold.
# --------------------------------------------------------------------------------------------------------------------

def test_every_sample_is_the_celeba_crop_of_its_source(shards: Path, celeba_src: Path):
    attrs, parts = metadata(celeba_src)
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["version"] == 1 and manifest["size"] == 32 and manifest["crop"] == "celeba"
    assert manifest["format"] == "jpg" and manifest["quality"] == 95 and manifest["attributes"] == list(ATTRIBUTES)
    assert manifest["skipped"] == [] and manifest["args"]["samples_per_shard"] == 64
    seen = set()
    for split in ("train", "valid", "test"):
        samples = read_split(shards, split)
        expected = sorted(n for n, p in parts.items() if p == split)
        assert sorted(f"{k}.jpg" for k, _ in samples) == expected
        assert manifest["splits"][split]["count"] == len(expected)
        for key, members in samples:
            assert set(members) == {"jpg", "attr"}
            assert list(np.frombuffer(members["attr"], np.int8)) == attrs[f"{key}.jpg"]
            image = decode(members["jpg"])
            assert image.shape == (32, 32, 3)
            source = (celeba_src / "img_align_celeba" / f"{key}.jpg").read_bytes()
            assert psnr(image, reference(source, 32)) >= 35.0, key
            seen.add(key)
    assert len(seen) == 203


def test_samples_are_shuffled_across_shards(shards: Path, celeba_src: Path):
    manifest = json.loads((shards / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    n_train = sum(1 for p in metadata(celeba_src)[1].values() if p == "train")
    assert 128 < n_train <= 192 and [s["count"] for s in train["shards"]] == [64, 64, n_train - 128]
    assert [s["tar"] for s in train["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    keys = [k for k, _ in read_split(shards, "train")]
    assert keys != sorted(keys)
    first = sorted(int(k) for k, _ in read_tar(shards / "train-000000.tar"))
    assert first[-1] - first[0] > 100  # the first shard draws from the whole split, not from its start


def test_png_is_lossless_and_center_crop(tmp_path: Path, small_sources: dict[str, Path]):
    src = small_sources["official"]
    for crop in ("celeba", "center"):
        out = tmp_path / crop
        manifest = run(src, out, format="png", crop=crop, size=48)
        assert manifest["format"] == "png" and manifest["crop"] == crop
        n = 0
        for split in ("train", "valid", "test"):
            for key, members in read_split(out, split):
                assert set(members) == {"png", "attr"}
                source = (src / "img_align_celeba" / f"{key}.jpg").read_bytes()
                assert np.array_equal(decode(members["png"]), reference(source, 48, crop)), key
                n += 1
        assert n == 40


def test_idx_files_are_what_wds2idx_writes(shards: Path):
    manifest = json.loads((shards / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            text = (shards / shard["idx"]).read_text()
            assert text == wds2idx(shards / shard["tar"])
            assert text.splitlines()[0] == f"v1.2 {shard['count']}"
            assert re.fullmatch(r"attr \d+ 40 \d{6}\.attr jpg \d+ \d+ \d{6}\.jpg", text.splitlines()[1])


def test_tars_are_what_tarfile_writes(shards: Path):
    """The workers pack members themselves; the bytes must be those of tarfile with fixed, anonymous headers."""
    for path in sorted(shards.glob("*.tar")):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for key, members in read_tar(path):
                for ext in sorted(members):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mode, info.mtime, info.uname, info.gname = len(members[ext]), 0o444, 0, "", ""
                    tar.addfile(info, io.BytesIO(members[ext]))
        assert buf.getvalue() == path.read_bytes(), path.name


def test_dali_reads_every_sample_through_the_indexes(shards: Path):
    from nvidia.dali import fn, pipeline_def, types

    manifest = json.loads((shards / "manifest.json").read_text())
    for split in ("train", "valid", "test"):
        entries = manifest["splits"][split]["shards"]
        expected = read_split(shards, split)

        @pipeline_def(batch_size=16, num_threads=1, device_id=None, seed=0)
        def pipe():
            image, attr = fn.readers.webdataset(
                paths=[str(shards / e["tar"]) for e in entries], index_paths=[str(shards / e["idx"]) for e in entries],
                ext=["jpg", "attr"], dtypes=[types.UINT8, types.INT8], missing_component_behavior="error",
                random_shuffle=False, name="reader")
            return image, attr, fn.get_property(image, key="source_info")

        p = pipe()
        p.build()
        assert p.epoch_size("reader") == len(expected)
        got: list[tuple[bytes, bytes, str]] = []
        while len(got) < len(expected):
            image, attr, info = p.run()
            got += [(np.array(image[i]).tobytes(), np.array(attr[i]).tobytes(), bytes(np.array(info[i])).decode())
                    for i in range(len(image))]
        for (key, members), (image, attr, info) in zip(expected, got):
            assert info.endswith(f":{key}.jpg")
            assert image == members["jpg"] and attr == members["attr"]
            assert np.frombuffer(attr, np.int8).dtype == np.int8 and len(attr) == 40


# --------------------------------------------------------------------------------------------------------------------
# Layouts.
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["official", "kaggle", "zip", "zip-file", "zip-drive"])
def test_celeba_layouts(tmp_path: Path, small_sources: dict[str, Path], layout: str):
    folder = small_sources[layout.split("-")[0]]
    src = folder / "img_align_celeba.zip" if layout == "zip-file" else folder
    if layout == "zip-drive":  # as CelebA's Google Drive folder has it: Img/, Anno/, Eval/
        src = tmp_path / "CelebA"
        for sub, name in (("Img", "img_align_celeba.zip"), ("Anno", "list_attr_celeba.txt"),
                          ("Eval", "list_eval_partition.txt")):
            (src / sub).mkdir(parents=True)
            shutil.copy(folder / name, src / sub / name)
    manifest = run(src, tmp_path / "out")
    assert manifest["source"]["layout"] == layout.split("-")[0]
    attrs, parts = metadata(small_sources["official"])  # same seed and count: the same dataset in every layout
    assert manifest["attributes"] == list(ATTRIBUTES) and manifest["skipped"] == []
    reference_out = tmp_path / "official"
    if layout != "official":
        run(small_sources["official"], reference_out)
    for split in ("train", "valid", "test"):
        samples = read_split(tmp_path / "out", split)
        assert sorted(f"{k}.jpg" for k, _ in samples) == sorted(n for n, p in parts.items() if p == split)
        for key, members in samples:
            assert list(np.frombuffer(members["attr"], np.int8)) == attrs[f"{key}.jpg"]
        if layout != "official":  # same images, same seed: the same shards whatever the layout
            assert samples == read_split(reference_out, split)


def test_plain_folder_of_images(tmp_path: Path, small_sources: dict[str, Path]):
    images = sorted((small_sources["official"] / "img_align_celeba").glob("*.jpg"))[:12]
    src = tmp_path / "photos"
    for i, path in enumerate(images):
        folder = src / ("a" if i % 2 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / path.name)
    shutil.copy(images[0], src / "a" / images[0].name)  # the same stem twice, in two folders
    Image.open(images[1]).save(src / "a" / "photo.v2.png")  # a dot in the stem: must not split the key
    manifest = run(src, tmp_path / "out", samples_per_shard=5)
    assert manifest["source"]["layout"] == "folder" and manifest["attributes"] == []
    assert set(manifest["splits"]) == {"train", "valid", "test"}
    assert manifest["splits"]["valid"]["count"] == manifest["splits"]["test"]["count"] == 0
    samples = read_split(tmp_path / "out", "train")
    assert len(samples) == 14 == manifest["splits"]["train"]["count"]
    keys = [k for k, _ in samples]
    assert len(set(keys)) == 14 and "photo_v2" in keys
    assert all(set(m) == {"jpg"} for _, m in samples)


# --------------------------------------------------------------------------------------------------------------------
# Determinism, interruption, reruns.
# --------------------------------------------------------------------------------------------------------------------

def test_two_runs_are_byte_identical_with_any_worker_count(shards: Path, celeba_src: Path, tmp_path: Path):
    run(celeba_src, tmp_path / "two", workers=2)
    a, b = files_of(shards), files_of(tmp_path / "two")
    assert a.keys() == b.keys()
    for name in a:
        if name != "manifest.json":  # it records --workers
            assert a[name] == b[name], name
    # One split alone gives that split's shards of --split all.
    run(celeba_src, tmp_path / "train", split="train")
    assert {n: d for n, d in a.items() if n.startswith("train-")} == \
        {n: d for n, d in files_of(tmp_path / "train").items() if n != "manifest.json"}


def test_killed_run_resumes_to_the_same_output(shards: Path, celeba_src: Path, tmp_path: Path):
    out = tmp_path / "out"
    # SIGKILL as the third shard is being finished: its temp tar is left behind, never renamed.
    code = (
        "import os, signal, sys\n"
        "import prepare_shards as ps\n"
        "calls = []\n"
        "finish = ps.ShardWriter.finish\n"
        "def killed(self):\n"
        "    calls.append(self.name)\n"
        "    if len(calls) == 3:\n"
        "        self.file.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return finish(self)\n"
        "ps.ShardWriter.finish = killed\n"
        "ps.main(sys.argv[1:])\n"
    )
    args = ["--src", str(celeba_src), "--out", str(out), "--size", "32", "--format", "jpg", "--split", "all",
            "--samples-per-shard", "64", "--workers", "1"]
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert "manifest.json" not in names and "train-000002.tar.tmp" in names and "train-000002.tar" not in names
    kept = {n: (out / n).stat().st_mtime_ns for n in names if n.startswith(("train-000000.", "train-000001."))}
    assert len(kept) == 4

    ps.main(args)
    assert files_of(out) == files_of(shards)  # same arguments as the `shards` fixture: byte-identical, manifest too
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept  # finished shards were not rewritten
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or p.name == "manifest.partial.json"]


def test_rerun_rewrites_nothing_and_repairs_damage(shards: Path, celeba_src: Path, tmp_path: Path):
    out = tmp_path / "out"
    shutil.copytree(shards, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    run(celeba_src, out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    # A corrupted tar (same size) and a lost index: only that shard is written again.
    tar = out / "train-000001.tar"
    data = bytearray(tar.read_bytes())
    data[5000] ^= 0xFF
    tar.write_bytes(bytes(data))
    (out / "test-000000.idx").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    run(celeba_src, out)
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    changed = {n for n in after if after[n] != before.get(n)}
    assert changed == {"train-000001.tar", "train-000001.idx", "test-000000.tar", "test-000000.idx"}
    assert files_of(out) == files_of(shards)


def test_out_holding_another_dataset_or_foreign_files(shards: Path, celeba_src: Path, tmp_path: Path):
    out = tmp_path / "out"
    shutil.copytree(shards, out)
    before = files_of(out)
    with pytest.raises(ps.PrepareError, match=r"different dataset \(size 32 != 16"):
        run(celeba_src, out, size=16)
    assert files_of(out) == before
    manifest = run(celeba_src, out, size=16, samples_per_shard=100, overwrite=True)
    assert manifest["size"] == 16
    names = sorted(p.name for p in out.iterdir())
    assert names == ["manifest.json", "test-000000.idx", "test-000000.tar", "train-000000.idx", "train-000000.tar",
                     "train-000001.idx", "train-000001.tar", "valid-000000.idx", "valid-000000.tar"]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ps.PrepareError, match=r"did not write \(notes\.txt\).*--overwrite"):
        run(celeba_src, foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    run(celeba_src, foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine" and (foreign / "manifest.json").exists()


# --------------------------------------------------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------------------------------------------------

def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def broken_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 fake CelebA images with every kind of broken and unusual file mixed in."""
    src = make_fake_celeba(tmp_path_factory.mktemp("broken") / "celeba", 60, seed=2)
    d = src / "img_align_celeba"
    face = Image.open(d / "000001.jpg")
    (d / "000005.jpg").write_bytes(_encoded(face.convert("L"), "JPEG", quality=95))  # grayscale
    (d / "000006.jpg").write_bytes(_encoded(face.convert("CMYK"), "JPEG", quality=95))  # CMYK
    (d / "000007.jpg").write_bytes(_encoded(face.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"))  # palette PNG
    (d / "000008.jpg").write_bytes(_encoded(face.convert("RGBA"), "PNG"))  # PNG named .jpg, with alpha
    (d / "000009.jpg").unlink()  # listed in the metadata, missing on disk
    (d / "000010.jpg").write_bytes(b"")  # zero bytes
    whole = (d / "000011.jpg").read_bytes()
    (d / "000011.jpg").write_bytes(whole[: len(whole) // 2])  # truncated JPEG
    (d / "000012.jpg").write_bytes(np.random.default_rng(0).bytes(3000))  # random bytes named .jpg
    (d / "000013.jpg").write_text("this is not an image\n")  # text named .jpg
    (d / "notes.txt").write_text("a text file among the images\n")
    shutil.copy(d / "000014.jpg", d / "extra.jpg")  # an image without a metadata row
    return src


BROKEN = {"000009.jpg": "missing image", "000010.jpg": "empty", "000011.jpg": "truncated",
          "000012.jpg": "cannot identify", "000013.jpg": "cannot identify", "notes.txt": "not an image",
          "extra.jpg": "no row in list_attr_celeba.txt"}


def test_bad_files_are_skipped_and_listed(broken_src: Path, tmp_path: Path):
    manifest = run(broken_src, tmp_path / "out", max_bad_fraction=0.2)
    assert {s["file"] for s in manifest["skipped"]} == set(BROKEN)
    for s in manifest["skipped"]:
        assert BROKEN[s["file"]] in s["reason"], s
    attrs, parts = metadata(broken_src)
    counts = {split: sum(1 for n, p in parts.items() if p == split and n not in BROKEN) for split in parts.values()}
    assert {split: v["count"] for split, v in manifest["splits"].items()} == counts
    samples = dict(s for split in ("train", "valid", "test") for s in read_split(tmp_path / "out", split))
    assert len(samples) == 60 - 5
    for key in ("000005", "000006", "000007", "000008"):  # grayscale, CMYK, palette, RGBA PNG named .jpg
        image = decode(samples[key]["jpg"])
        assert image.shape == (32, 32, 3)
        source = (broken_src / "img_align_celeba" / f"{key}.jpg").read_bytes()
        assert psnr(image, reference(source, 32)) >= 35.0, key
        assert list(np.frombuffer(samples[key]["attr"], np.int8)) == attrs[f"{key}.jpg"]


def test_too_many_bad_files_write_the_manifest_then_fail(broken_src: Path, tmp_path: Path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"^error: .*manifest\.json: 7 of 62 inputs .* --max-bad-fraction 0\.01"):
        ps.main(["--src", str(broken_src), "--out", str(out), "--size", "16", "--workers", "1"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["skipped"]) == 7 and sum(v["count"] for v in manifest["splits"].values()) == 55


def _copy_with(src: Path, dst: Path, name: str, edit) -> Path:
    shutil.copytree(src, dst)
    lines = (dst / name).read_text().splitlines()
    edit(lines)
    (dst / name).write_text("\n".join(lines) + "\n")
    return dst


@pytest.mark.parametrize("case", ["missing-src", "empty-src", "out-inside-src", "attr-columns", "attr-value",
                                  "partition-value", "partition-columns", "csv-columns"])
def test_input_errors_stop_before_writing(case: str, small_sources: dict[str, Path], tmp_path: Path):
    official = small_sources["official"]
    src, out = official, tmp_path / "out"
    if case == "missing-src":
        src, match = tmp_path / "nowhere", r"nowhere: no such file or folder"
    elif case == "empty-src":
        src = tmp_path / "empty"
        src.mkdir()
        (src / "readme.txt").write_text("no pictures here")
        match = r"empty: no images found"
    elif case == "out-inside-src":
        src = tmp_path / "src"
        shutil.copytree(official, src)
        out, match = src / "shards", r"shards: is inside the source"
    elif case == "attr-columns":
        src = _copy_with(official, tmp_path / "src", "list_attr_celeba.txt", lambda ls: ls.__setitem__(7, ls[7][:-3]))
        match = r"list_attr_celeba\.txt:8: expected 41 columns .* found 40"
    elif case == "attr-value":
        src = _copy_with(official, tmp_path / "src", "list_attr_celeba.txt",
                         lambda ls: ls.__setitem__(4, ls[4][:-2] + " 7"))
        match = r"list_attr_celeba\.txt:5: attribute value '7'"
    elif case == "partition-value":
        src = _copy_with(official, tmp_path / "src", "list_eval_partition.txt",
                         lambda ls: ls.__setitem__(2, "000003.jpg 3"))
        match = r"list_eval_partition\.txt:3: unknown partition value '3'"
    elif case == "partition-columns":
        src = _copy_with(official, tmp_path / "src", "list_eval_partition.txt",
                         lambda ls: ls.__setitem__(9, "000010.jpg"))
        match = r"list_eval_partition\.txt:10: expected 2 columns"
    else:
        src = _copy_with(small_sources["kaggle"], tmp_path / "src", "list_attr_celeba.csv",
                         lambda ls: ls.__setitem__(3, ls[3] + ",1"))
        match = r"list_attr_celeba\.csv:4: expected 41 columns .* found 42"
    with pytest.raises(SystemExit, match="^error: .*" + match):
        ps.main(["--src", str(src), "--out", str(out), "--workers", "1"])
    assert not out.exists()


def test_cli_error_is_one_line_and_nonzero(tmp_path: Path):
    proc = subprocess.run([sys.executable, "prepare_shards.py", "--src", str(tmp_path / "missing"), "--out",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: no such file or folder (--src)"]
    assert not (tmp_path / "out").exists()


def test_crop_box_for_other_sizes():
    assert ps.crop_box(178, 218, "celeba") == (25, 57, 153, 185)
    assert ps.crop_box(356, 436, "celeba") == (50, 114, 306, 370)  # CelebA at twice the size: the same face
    for w, h in ((100, 100), (300, 120), (64, 400)):
        left, top, right, bottom = ps.crop_box(w, h, "celeba")
        assert right - left == pytest.approx(bottom - top) and 0 <= left and 0 <= top and right <= w and bottom <= h
    assert ps.crop_box(178, 218, "center") == (0, 20, 178, 198)


def test_zip_with_junk_members(tmp_path: Path, small_sources: dict[str, Path]):
    src = tmp_path / "img_align_celeba.zip"
    shutil.copy(small_sources["zip"] / "img_align_celeba.zip", src)
    with zipfile.ZipFile(src, "a") as zf:
        zf.writestr("__MACOSX/img_align_celeba/._000001.jpg", b"resource fork")
        zf.writestr("img_align_celeba/000099.jpg", b"\xff\xd8\xff garbage")
    manifest = run(src, tmp_path / "out", max_bad_fraction=0.1)  # no metadata beside this zip: a plain image set
    assert manifest["source"]["layout"] == "zip" and manifest["attributes"] == []
    assert [s["file"] for s in manifest["skipped"]] == ["000099.jpg"]
    assert manifest["splits"]["train"]["count"] == 40


def test_bench_script_reports_both_contenders(tmp_path: Path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench/shards.py", "--count", "40", "--size", "32", "--workers", "1",
                           "--repeat", "1", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [r["name"].split()[0] for r in report["results"]] == ["naive", "prepare_shards"]
    assert all(r["images"] == 40 and r["images_per_s"] > 0 for r in report["results"])
    assert report["ratio"] > 0 and report["machine"]["cores"] >= 1 and report["commit"]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == report

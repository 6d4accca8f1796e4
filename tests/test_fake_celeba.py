"""fake_celeba.py: CelebA's layouts and metadata formats, determinism, and faces that follow their attributes."""

import csv
import hashlib
import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fake_celeba
from fake_celeba import ATTRIBUTES, draw_face, make_fake_celeba, sample_attributes, split_counts

COUNT = 23  # small, but with all three partitions present


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_image(data: bytes) -> None:
    assert data[:3] == b"\xff\xd8\xff"  # JPEG magic
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (178, 218)


def _check_partitions(parts: list[tuple[str, int]], count: int) -> None:
    assert [n for n, _ in parts] == [f"{i:06d}.jpg" for i in range(1, count + 1)]
    values = [p for _, p in parts]
    assert set(values) <= {0, 1, 2} and values == sorted(values)  # contiguous: train, then valid, then test
    assert tuple(values.count(k) for k in range(3)) == split_counts(count)


def _parse_attr_txt(path: Path, count: int) -> list[list[int]]:
    lines = path.read_text().splitlines()
    assert lines[0] == str(count)
    assert lines[1].split() == ATTRIBUTES
    rows = []
    for i, line in enumerate(lines[2:], start=1):
        # The original's padding: one space before -1, two before 1.
        assert re.fullmatch(r"\d{6}\.jpg(?: -1|  1){40}", line), line
        assert line.startswith(f"{i:06d}.jpg")
        rows.append([int(v) for v in line.split()[1:]])
    assert len(rows) == count
    return rows


@pytest.mark.parametrize("layout", ["official", "kaggle", "zip"])
def test_layout_files_and_metadata(tmp_path, layout):
    out = make_fake_celeba(tmp_path / "celeba", COUNT, seed=3, layout=layout)
    assert out == tmp_path / "celeba"
    names = [f"{i:06d}.jpg" for i in range(1, COUNT + 1)]
    if layout == "kaggle":
        assert sorted(p.name for p in out.iterdir()) == [
            "img_align_celeba", "list_attr_celeba.csv", "list_eval_partition.csv"]
        img_dir = out / "img_align_celeba" / "img_align_celeba"
        assert sorted(p.name for p in img_dir.iterdir()) == names
        images = [(img_dir / n).read_bytes() for n in names]
        with open(out / "list_attr_celeba.csv", newline="") as f:
            table = list(csv.reader(f))
        assert table[0] == ["image_id", *ATTRIBUTES]
        assert [r[0] for r in table[1:]] == names
        rows = [[int(v) for v in r[1:]] for r in table[1:]]
        with open(out / "list_eval_partition.csv", newline="") as f:
            ptable = list(csv.reader(f))
        assert ptable[0] == ["image_id", "partition"]
        parts = [(n, int(p)) for n, p in ptable[1:]]
    else:
        expected = ["list_attr_celeba.txt", "list_eval_partition.txt"]
        expected += ["img_align_celeba.zip"] if layout == "zip" else ["img_align_celeba"]
        assert sorted(p.name for p in out.iterdir()) == sorted(expected)
        if layout == "zip":
            with zipfile.ZipFile(out / "img_align_celeba.zip") as zf:
                members = [n for n in zf.namelist() if not n.endswith("/")]
                assert members == [f"img_align_celeba/{n}" for n in names]
                images = [zf.read(m) for m in members]
        else:
            img_dir = out / "img_align_celeba"
            assert sorted(p.name for p in img_dir.iterdir()) == names
            images = [(img_dir / n).read_bytes() for n in names]
        rows = _parse_attr_txt(out / "list_attr_celeba.txt", COUNT)
        parts = [(n, int(p)) for n, p in (line.split(" ") for line in
                                          (out / "list_eval_partition.txt").read_text().splitlines())]
    for data in images:
        _check_image(data)
    assert all(len(r) == 40 and set(r) <= {-1, 1} for r in rows)
    _check_partitions(parts, COUNT)
    # The rows are the attributes the images were drawn from.
    assert rows[4] == [1 if v else -1 for v in fake_celeba.render_image(3, 5)[0].values()]


def test_same_seed_identical_bytes_other_seed_differs(tmp_path):
    for layout in ("official", "zip"):
        a = _digest(make_fake_celeba(tmp_path / f"a-{layout}", 12, seed=7, layout=layout))
        b = _digest(make_fake_celeba(tmp_path / f"b-{layout}", 12, seed=7, layout=layout))
        c = _digest(make_fake_celeba(tmp_path / f"c-{layout}", 12, seed=8, layout=layout))
        assert a == b
        assert a != c
    # Image i depends only on (seed, i): a larger dataset starts with the smaller one's images.
    small = _digest(tmp_path / "a-official" / "img_align_celeba")
    big = _digest(make_fake_celeba(tmp_path / "big", 15, seed=7) / "img_align_celeba")
    assert all(big[k] == v for k, v in small.items())
    pixels = [np.asarray(Image.open(tmp_path / "big" / "img_align_celeba" / f"{i:06d}.jpg")) for i in (1, 2)]
    assert np.abs(pixels[0].astype(int) - pixels[1]).mean() > 5  # images differ from one another


def test_rerun_smaller_count_leaves_a_consistent_dataset(tmp_path):
    out = make_fake_celeba(tmp_path / "d", 9)
    make_fake_celeba(out, 4)
    assert sorted(p.name for p in (out / "img_align_celeba").iterdir()) == [f"{i:06d}.jpg" for i in range(1, 5)]
    assert len(_parse_attr_txt(out / "list_attr_celeba.txt", 4)) == 4
    assert not list(out.glob(".*tmp"))


def test_single_image_and_bad_arguments(tmp_path):
    out = make_fake_celeba(tmp_path / "one", 1)
    _parse_attr_txt(out / "list_attr_celeba.txt", 1)
    assert (out / "list_eval_partition.txt").read_text() == "000001.jpg 0\n"
    with pytest.raises(ValueError, match="count"):
        make_fake_celeba(tmp_path / "zero", 0)
    with pytest.raises(ValueError, match="layout"):
        make_fake_celeba(tmp_path / "bad", 3, layout="tfds")


def test_cli(tmp_path, capsys):
    fake_celeba.main(["--out", str(tmp_path / "cli"), "--count", "5", "--seed", "2", "--layout", "kaggle"])
    assert "wrote 5 images" in capsys.readouterr().out
    assert len(list((tmp_path / "cli" / "img_align_celeba" / "img_align_celeba").glob("*.jpg"))) == 5
    with pytest.raises(SystemExit):
        fake_celeba.main(["--out", str(tmp_path / "cli2"), "--count", "0"])
    with pytest.raises(SystemExit):
        fake_celeba.main(["--out", str(tmp_path / "cli3"), "--layout", "nope"])


def test_split_counts_follow_celeba():
    assert split_counts(202_599) == (162_770, 19_867, 19_962)
    for n in (1, 2, 5, 10, 203, 3000):
        assert sum(split_counts(n)) == n and min(split_counts(n)) >= 0
    train, valid, test = split_counts(3000)
    assert 0.79 < train / 3000 < 0.82 and 0.09 < valid / 3000 < 0.11 and 0.09 < test / 3000 < 0.11


def test_attribute_sampling_is_plausible():
    rows = [sample_attributes(np.random.default_rng([0, i])) for i in range(3000)]
    freq = {a: np.mean([r[a] for r in rows]) for a in ATTRIBUTES}
    assert 0.37 < freq["Male"] < 0.47 and 0.70 < freq["Young"] < 0.84 and 0.42 < freq["Smiling"] < 0.54
    assert all(0.0 < f < 1.0 for f in freq.values()), freq  # every attribute occurs and is sometimes absent
    for r in rows:
        assert sum(r[c] for c in ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")) <= 1
        assert not (r["Straight_Hair"] and r["Wavy_Hair"])
        assert not (r["Bald"] and (r["Blond_Hair"] or r["Bangs"]))
        if r["Mustache"] or r["Goatee"]:
            assert not r["No_Beard"]
        if not r["Male"]:
            assert r["No_Beard"] and not (r["Mustache"] or r["Goatee"] or r["5_o_Clock_Shadow"])
    men = [r for r in rows if r["Male"]]
    women = [r for r in rows if not r["Male"]]
    assert np.mean([r["Wearing_Lipstick"] for r in women]) > 10 * np.mean([r["Wearing_Lipstick"] for r in men])
    assert np.mean([not r["No_Beard"] for r in men]) > 0.2


# -- the drawing follows the attributes ------------------------------------------------------------------------------

BASE = {name: False for name in ATTRIBUTES} | {"Young": True, "No_Beard": True, "Brown_Hair": True,
                                                 "Attractive": True, "Straight_Hair": True}


def _face(seed: int = 11, **changes: bool) -> np.ndarray:
    img = draw_face(BASE | changes, seed)
    assert img.size == (178, 218) and img.mode == "RGB"
    return np.asarray(img).astype(np.int32)


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b).sum(axis=2) > 30


def test_drawing_is_a_function_of_attributes_and_seed():
    assert np.array_equal(_face(), _face())
    assert not np.array_equal(_face(seed=11), _face(seed=12))
    vector = [1 if BASE[a] else -1 for a in ATTRIBUTES]
    assert np.array_equal(np.asarray(draw_face(vector, 11)), _face())
    with pytest.raises(ValueError):
        draw_face([1, -1], 0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_eyeglasses_draw_frames_in_the_eye_band(seed):
    plain, glasses = _face(seed), _face(seed, Eyeglasses=True)
    changed = _changed(plain, glasses)
    ys, xs = np.nonzero(changed)
    assert changed.sum() > 100
    assert 95 <= np.median(ys) <= 125 and 70 <= np.median(xs) <= 108  # eyes sit near y=112, x=89+-20
    assert not changed[150:].any()  # nothing changes below the nose


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_blond_hair_is_brighter_and_yellower_than_black(seed):
    black = _face(seed, Brown_Hair=False, Black_Hair=True)
    blond = _face(seed, Brown_Hair=False, Blond_Hair=True)
    hair = _changed(black, blond)
    assert hair[40:80].sum() > 300  # the top of the head
    assert blond[hair].mean() > black[hair].mean() + 100
    r, g, b = blond[hair].mean(axis=0)
    assert r > b + 50 and g > b + 30


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_smiling_lifts_the_mouth_corners(seed):
    plain, smile = _face(seed), _face(seed, Smiling=True)
    changed = _changed(plain, smile)
    ys, xs = np.nonzero(changed)
    assert changed.sum() > 30 and 135 <= np.median(ys) <= 170  # the mouth, near y=152
    assert not changed[:125].any()

    # The mouth: the box where the two faces differ. Inside it, mouth pixels are the ones far from the skin colour.
    y0, y1, x0, x1 = ys.min() - 2, ys.max() + 3, xs.min() - 2, xs.max() + 3
    border = np.concatenate([plain[y0, x0:x1], plain[y0:y1, x0], plain[y0:y1, x1 - 1]])
    skin = np.median(border, axis=0)  # the box's edge is mostly bare skin

    def corner_height(img: np.ndarray) -> float:
        """How far the mouth's outer columns sit below its middle columns (pixels; smaller = corners higher)."""
        box = np.abs(img[y0:y1, x0:x1] - skin).sum(axis=2) > 40
        cols = np.nonzero(box.any(axis=0))[0]
        left, right = cols.min(), cols.max()
        width = right - left
        y = np.arange(box.shape[0])[:, None]
        mean_y = (box * y).sum(axis=0) / np.maximum(box.sum(axis=0), 1)
        outer = np.r_[mean_y[left:left + width // 6], mean_y[right - width // 6 + 1:right + 1]]
        middle = mean_y[left + width * 2 // 5:left + width * 3 // 5 + 1]
        return float(outer.mean() - middle.mean())

    assert corner_height(smile) < corner_height(plain) - 1.0


def test_other_attributes_change_their_regions():
    base = _face(5)
    # Wearing_Hat changes the top of the head; Bald removes hair there (skin shows instead).
    hat = _changed(base, _face(5, Wearing_Hat=True))
    assert hat[30:90].sum() > 300 and not hat[130:].any()
    bald = _face(5, Bald=True, Brown_Hair=False, Straight_Hair=False)
    top = _changed(base, bald)[45:75, 60:118]
    assert top.mean() > 0.3
    # Pale_Skin lightens the cheeks; Wearing_Lipstick reddens the mouth; Mustache darkens above the mouth.
    assert _face(5, Pale_Skin=True)[125:135, 60:70].mean() > base[125:135, 60:70].mean() + 10
    lips = _changed(base, _face(5, Wearing_Lipstick=True))
    red = _face(5, Wearing_Lipstick=True)
    redness = [(img[lips][:, 0] - img[lips][:, 1]).mean() for img in (base, red)]
    assert lips.sum() > 30 and redness[1] > redness[0] + 20
    must = _changed(base, _face(5, Male=True, Mustache=True, No_Beard=False))
    assert must[135:150].sum() > 20
    # Blurry removes detail; Mouth_Slightly_Open darkens the middle of the mouth.
    def edge_energy(img: np.ndarray) -> float:
        return float((np.diff(img, axis=1) ** 2).mean() + (np.diff(img, axis=0) ** 2).mean())

    assert edge_energy(_face(5, Blurry=True)) < 0.5 * edge_energy(base)
    opened = _face(5, Mouth_Slightly_Open=True)
    assert opened[145:160, 84:94].mean() < base[145:160, 84:94].mean() - 10

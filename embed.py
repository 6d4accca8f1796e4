"""Embed every face of a shard folder once with a frozen image encoder, for reference-face conditioning.

    python embed.py --data SHARDS --encoder judge                       # SHARDS/judge.pt's features (offline)
    python embed.py --data SHARDS --encoder facebook/dinov2-small       # DINOv2 from the Hugging Face hub
    python embed.py --data SHARDS --encoder weights/dinov2-small        # a folder written by save_pretrained
    python train.py --data SHARDS --cond-embed ...                      # the UNet sees each image's embedding
    python sample.py --ckpt RUN --like face.jpg --guidance 3            # faces like that one

Encoders (`--encoder`):
- DINOv2 (`transformers.Dinov2Model`): a hub name or a local folder. The embedding is the CLS token after the final
  layer norm (`pooler_output`): DINOv2's image-level feature (its linear probes read it, beside the mean patch
  token). The face (the shard image, already cropped) is resized whole to the processor's crop size (224) and
  normalised with its mean and std (ImageNet's when the folder has no preprocessor_config.json).
- the project's attribute judge (`judge`: SHARDS/judge.pt, or a judge file's path): its penultimate features, the
  global average pool before the attribute logits. Small, trained here (judge.py), so everything works offline.

Storage. One float16 array per split, embed-NAME-SPLIT.npy ([N, E], row i = the i-th sample of the split in manifest
order, the loaders' sample numbering), beside the shards rather than inside the tars: adding a member to every tar
would rewrite (and re-hash, re-index) the whole data set for each encoder, and one array holds any number of
encoders side by side at the cost of a few hundred MB (CelebA's 163k training faces x 384 dims x 2 bytes = 125 MB
for dinov2-small). float16 because the UNet layer-normalises the embedding: its 3 significant digits are far below
what changes a face. The manifest's "embeddings" records each set: the encoder's identity (kind, name, weights'
sha256, input size, normalisation, pooling, dimension) and per split the file, its sha256 and the digest of the
shards it was computed from, so embeddings of other shards are refused as stale (data.py).

Resumable and deterministic: rows are written in chunks into embed-NAME-SPLIT.npy.partial with the progress in
embed-NAME.partial.json; a rerun with the same encoder continues there, a finished split whose file verifies is
skipped. `transformers` is imported only when a DINOv2 encoder is loaded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import config
from atomic import atomic_write, fsync_dir
from config import UserError
from manifest import MANIFEST, read_manifest, sha256_file

console = Console(stderr=True)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
DINOV2_SIZE = 224  # the crop size of DINOv2's image processor, when the folder has no preprocessor_config.json
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
CHUNK = 2048  # rows between two durable progress records


class EmbedError(UserError, ValueError):
    """An encoder that cannot be loaded, or embeddings that cannot be used: a one-line message naming the file."""


# ------------------------------------------------------------------------------------------------ encoders

@dataclass
class Encoder:
    """A frozen image encoder and its identity (what the manifest and checkpoints record)."""
    kind: str  # "dinov2" | "judge"
    name: str  # as the user gave it (a hub name, a folder, "judge" or a judge file)
    path: str  # the resolved local file or folder ("" when only the hub name is known)
    sha256: str  # of the weights file (several files: of their names and sha256s)
    input_size: int  # the square size the encoder reads
    mean: list[float]  # per-channel normalisation of [0, 1] pixels: (x - mean) / std
    std: list[float]
    dim: int  # embedding length
    pooling: str  # which features form the embedding
    features: Callable[[torch.Tensor], torch.Tensor]  # normalised [N, 3, s, s] float32 -> [N, dim]
    device: torch.device

    def identity(self) -> dict:
        return {"kind": self.kind, "name": self.name, "path": self.path, "sha256": self.sha256,
                "input_size": self.input_size, "mean": list(self.mean), "std": list(self.std), "dim": self.dim,
                "pooling": self.pooling}

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """[N, 3, H, W] faces in [-1, 1] (as the loaders give them) -> [N, dim] float32 on the CPU."""
        out = []
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        for i in range(0, images.shape[0], batch_size):
            x = (images[i:i + batch_size].to(self.device, torch.float32) + 1) / 2
            if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
                x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True,
                                  align_corners=False)
            out.append(self.features((x - mean) / std).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def weights_sha256(files: list[Path]) -> str:
    """One file: its sha256; several (a sharded checkpoint): sha256 over "name sha256" lines, in name order."""
    files = sorted(files, key=lambda p: p.name)
    if len(files) == 1:
        return sha256_file(files[0])
    return hashlib.sha256("".join(f"{p.name} {sha256_file(p)}\n" for p in files).encode()).hexdigest()


def _hf_weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    return [p for p in files if p.is_file()]


def looks_like_hub_name(spec: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec)) and not spec.endswith((".pt", ".pth", ".json"))


def load_encoder(spec: str, data_dir: str | Path | None = None, device: torch.device | str = "cpu") -> Encoder:
    """The encoder `spec` names: "judge" (DATA/judge.pt), a judge file, a save_pretrained folder or a hub name."""
    device = torch.device(device)
    spec = str(spec)
    if spec == "judge":
        if data_dir is None:
            raise EmbedError("--encoder judge: needs the shards folder (--data) that holds judge.pt")
        path = Path(data_dir) / "judge.pt"
        if not path.is_file():
            raise EmbedError(f"{path}: no judge here; train one with: python judge.py --data {data_dir}")
        return _judge_encoder(spec, path, device)
    path = Path(spec)
    if path.is_file():
        return _judge_encoder(spec, path, device)
    if path.is_dir():
        return _dinov2_encoder(spec, path, device)
    if looks_like_hub_name(spec):
        return _dinov2_encoder(spec, None, device)
    raise EmbedError(f"--encoder {spec}: no such file or folder (give 'judge', a judge .pt file, a folder saved with "
                     f"save_pretrained, or a hub name such as facebook/dinov2-small)")


def _judge_encoder(spec: str, path: Path, device: torch.device) -> Encoder:
    from judge import JudgeError, load_judge

    try:
        judge = load_judge(path, device)
    except JudgeError as e:
        raise EmbedError(f"--encoder {spec}: {e} (a file --encoder is a judge.pt; DINOv2 is a folder or hub name)"
                         ) from None
    net = judge.net

    def features(x: torch.Tensor) -> torch.Tensor:  # the global average pool that the attribute head reads
        return net.features(x).mean(dim=(2, 3))

    return Encoder("judge", spec, str(path.resolve()), sha256_file(path), judge.image_size, [0.5] * 3, [0.5] * 3,
                   int(net.head[-1].in_features), "judge penultimate features (global average pool)", features,
                   device)


def _dinov2_encoder(spec: str, folder: Path | None, device: torch.device) -> Encoder:
    try:
        from transformers import Dinov2Model
    except ImportError:
        raise EmbedError(f"--encoder {spec}: DINOv2 needs transformers: pip install -r requirements.lock") from None
    if folder is not None:
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise EmbedError(f"{folder}: no config.json (a DINOv2 folder is one written by save_pretrained)")
        try:
            model_type = json.loads(cfg_path.read_text()).get("model_type")
        except (OSError, ValueError) as e:
            raise EmbedError(f"{cfg_path}: unreadable ({config.one_line(e)[:160]})") from None
        if model_type != "dinov2":
            raise EmbedError(f"{cfg_path}: model_type {model_type!r}, not 'dinov2'")
        if not _hf_weight_files(folder):
            raise EmbedError(f"{folder}: no weights (model.safetensors or pytorch_model.bin) beside config.json")
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        model = Dinov2Model.from_pretrained(str(folder) if folder is not None else spec)
    except OSError as e:
        if folder is not None:
            raise EmbedError(f"{folder}: cannot load it as a DINOv2 model ({config.one_line(e)[:200]})") from None
        tail = spec.rsplit("/", 1)[-1]
        raise EmbedError(
            f"--encoder {spec}: not in the Hugging Face cache and the hub cannot be reached; where there is internet "
            f"run python -c \"from transformers import Dinov2Model; Dinov2Model.from_pretrained('{spec}')"
            f".save_pretrained('weights/{tail}')\", copy weights/{tail} here and pass --encoder weights/{tail}"
        ) from None
    if folder is None:  # the hub's files, from the cache from_pretrained just filled
        from transformers.utils import cached_file

        weight = None
        for fname in ("model.safetensors", "pytorch_model.bin"):
            weight = cached_file(spec, fname, _raise_exceptions_for_missing_entries=False)
            if weight:
                break
        if not weight:
            raise EmbedError(f"--encoder {spec}: loaded, but its weights file is not in the cache to hash")
        folder_files, path = [Path(weight)], ""
    else:
        folder_files, path = _hf_weight_files(folder), str(folder.resolve())
    size, mean, std = DINOV2_SIZE, IMAGENET_MEAN, IMAGENET_STD
    pre = folder / "preprocessor_config.json" if folder is not None else None
    if pre is None:
        from transformers.utils import cached_file

        found = cached_file(spec, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
        pre = Path(found) if found else None
    if pre is not None and pre.is_file():
        p = json.loads(pre.read_text())
        crop = p.get("crop_size", size)
        size = int(crop.get("height", size) if isinstance(crop, dict) else crop)
        mean, std = [float(v) for v in p.get("image_mean", mean)], [float(v) for v in p.get("image_std", std)]
    model = model.to(device).eval().requires_grad_(False)

    def features(x: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=x).pooler_output

    return Encoder("dinov2", spec, path, weights_sha256(folder_files), size, mean, std, int(model.config.hidden_size),
                   "DINOv2 CLS token after the final layer norm (pooler_output)", features, device)


def encoder_for(record: dict, override: str = "", data_dir: str | Path | None = None,
                device: torch.device | str = "cpu") -> Encoder:
    """The encoder a manifest or checkpoint `record` ("encoder" identity) names, checked against its sha256.

    override: another place for the same weights (--encoder), e.g. when the run moved to another machine."""
    ident = record.get("encoder", record)
    spec = override or (ident.get("path") if ident.get("path") and Path(ident["path"]).exists() else ident["name"])
    if spec == "judge" and data_dir is None:
        raise EmbedError("the model's encoder is a shards folder's judge.pt that is no longer at "
                         f"{ident.get('path')!r}; give its path with --encoder")
    enc = load_encoder(spec, data_dir, device)
    if enc.sha256 != ident["sha256"]:
        raise EmbedError(f"--encoder {spec}: its weights (sha256 {enc.sha256[:12]}...) are not the ones the "
                         f"embeddings were made with ({ident['name']}, sha256 {ident['sha256'][:12]}...)")
    return enc


# ------------------------------------------------------------------------------------------------ storage

def embed_file(name: str, split: str) -> str:
    return f"embed-{name}-{split}.npy"


def shards_digest(manifest: dict, split: str) -> str:
    """What the embeddings of a split were computed from: sha256 over its shards' names and sha256s, in order."""
    shards = [[s["tar"], s.get("sha256", ""), int(s["count"])] for s in manifest["splits"][split]["shards"]
              if int(s["count"]) > 0]
    return hashlib.sha256(json.dumps([manifest.get("size"), manifest.get("crop"), shards]).encode()).hexdigest()


def default_name(spec: str) -> str:
    """The set's name when --name is not given: "judge", the hub name's or folder's last part ("dinov2-small")."""
    if spec == "judge" or Path(spec).is_file():
        return "judge"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(spec.rstrip("/")).name) or "encoder"


def choose_set(manifest: dict, name: str, where: str) -> tuple[str, dict]:
    """The embedding set `name` of a manifest (name "": the only one); one line when there is none or several."""
    sets = manifest.get("embeddings") or {}
    how = f"make them with: python embed.py --data {Path(where).parent} --encoder judge|facebook/dinov2-small|FOLDER"
    if not isinstance(sets, dict) or not sets:
        raise EmbedError(f"{where}: the shards have no embeddings; {how}")
    if not name:
        if len(sets) > 1:
            raise EmbedError(f"{where}: the shards have several embedding sets ({', '.join(sorted(sets))}); "
                             f"choose one with --embeddings NAME")
        name = next(iter(sets))
    if name not in sets:
        raise EmbedError(f"{where}: no embedding set {name!r} (it has: {', '.join(sorted(sets))}); {how}")
    entry = sets[name]
    if not isinstance(entry, dict) or not isinstance(entry.get("encoder"), dict) or "splits" not in entry:
        raise EmbedError(f"{where}: embedding set {name!r} is malformed")
    return name, entry


def check_split(data_dir: Path, manifest: dict, name: str, entry: dict, split: str, verify: bool) -> Path:
    """The split's embeddings file after checking it: there, the right size and shape, made from these shards (and,
    with verify, its sha256). One line naming the file for each way it can be wrong."""
    where = data_dir / MANIFEST
    sp = entry["splits"].get(split)
    redo = f"run python embed.py --data {data_dir} --encoder {entry['encoder'].get('name', '...')} --name {name}"
    if not isinstance(sp, dict):
        raise EmbedError(f"{where}: embedding set {name!r} has no {split!r} split; {redo}")
    file = sp.get("file", "")
    from manifest import is_plain_name

    if not is_plain_name(file):
        raise EmbedError(f"{where}: embedding set {name!r}: {file!r} is not a file name in the shards folder")
    path = data_dir / file
    if sp.get("shards_digest") != shards_digest(manifest, split):
        raise EmbedError(f"{path}: stale: made from other shards than the {split!r} split's now; {redo}")
    if not path.is_file():
        raise EmbedError(f"{path}: missing (the manifest lists it); {redo}")
    if path.stat().st_size != int(sp["bytes"]):
        raise EmbedError(f"{path}: {path.stat().st_size} bytes, the manifest says {sp['bytes']}; {redo}")
    if verify and sha256_file(path) != sp["sha256"]:
        raise EmbedError(f"{path}: sha256 differs from the manifest's; {redo}")
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise EmbedError(f"{path}: not a .npy array ({config.one_line(e)[:160]}); {redo}") from None
    count = int(manifest["splits"][split]["count"])
    if arr.shape != (count, int(entry["encoder"]["dim"])):
        raise EmbedError(f"{path}: shape {arr.shape}, expected ({count}, {entry['encoder']['dim']}); {redo}")
    return path


def read_embeddings(data_dir: str | Path, split: str, name: str = "",
                    verify: bool = True) -> tuple[str, dict, np.ndarray]:
    """(set name, manifest entry, [N, E] float16 memory map) of a shard folder's split, checked."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    name, entry = choose_set(manifest, name, str(data_dir / MANIFEST))
    path = check_split(data_dir, manifest, name, entry, split, verify)
    return name, entry, np.load(path, mmap_mode="r")


# ------------------------------------------------------------------------------------------------ references

def prepare_reference(path: str | Path, shards: dict) -> torch.Tensor:
    """A face file made into a shard image (the crop, size and encoding of `shards`: a manifest, or a checkpoint's
    record of one) -> [3, S, S] float32 in [-1, 1]. One line naming the file when it is not an image."""
    from PIL import Image

    from prepare_shards import transform

    path = Path(path)
    try:
        data = path.read_bytes()
        encoded = transform(data, int(shards["size"]), shards.get("crop", "celeba"), shards.get("format", "png"),
                            int(shards.get("quality", 95)))
        image = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
    except FileNotFoundError:
        raise EmbedError(f"{path}: no such reference image") from None
    except Exception as e:  # PIL's many ways of refusing a file
        raise EmbedError(f"{path}: cannot read it as an image ({config.one_line(e)[:160]})") from None
    return torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 127.5 - 1


def shard_image(data_dir: str | Path, key: str) -> tuple[torch.Tensor, str, int]:
    """The shard image with sample key `key` (valid split first, then test, then train), or "SPLIT:I" (sample I of
    that split, in manifest order) -> ([3, S, S] in [-1, 1], split, its sample number in the split). One line when no
    split has it."""
    import webdataset.autodecode

    from data import SampleIndex

    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    splits = [s for s in ("valid", "test", "train") if s in manifest["splits"]]
    splits += [s for s in manifest["splits"] if s not in splits]
    by_number = re.fullmatch(r"(\w+):(\d+)", key)
    if by_number and by_number.group(1) in manifest["splits"]:
        splits = [by_number.group(1)]
    for split in splits:
        index = SampleIndex.of_split(data_dir, manifest, split)
        if by_number and by_number.group(1) == split and int(by_number.group(2)) >= len(index):
            raise EmbedError(f"{data_dir / MANIFEST}: --like-key {key}: split {split!r} has {len(index)} samples")
        if key in index.keys or (by_number and by_number.group(1) == split):
            i = index.keys.index(key) if key in index.keys else int(by_number.group(2))
            try:
                encoded = index.image(i)
            finally:
                index.close()
            img = webdataset.autodecode.imagehandler("rgb8")(manifest["format"], encoded)
            return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1, split, i
    raise EmbedError(f"{data_dir / MANIFEST}: no sample with key {key!r} in {', '.join(splits)}")


# ------------------------------------------------------------------------------------------------ command line

@dataclass
class EmbedConfig:
    data: str = ""  # shards folder (prepare_shards.py output); the arrays and the manifest entry are written there
    encoder: str = ""  # judge | a judge .pt | a DINOv2 folder (save_pretrained) | a hub name (facebook/dinov2-small)
    name: str = ""  # the set's name in the manifest (default: "judge" or the encoder's last name part)
    splits: str = ""  # comma-separated splits to embed (default: all of the manifest's)
    batch_size: int = 64  # images per encoder call
    device: str = "auto"  # auto | cuda | cuda:N | cpu
    threads: int = 0  # intra-op CPU threads (0 = PyTorch's default)

    REQUIRED: ClassVar[tuple] = ("data", "encoder")
    BOUNDS: ClassVar[dict] = {"batch_size": ">= 1", "threads": ">= 0"}


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=False)


def _write_json(path: Path, value: Any) -> None:
    atomic_write(path, (json.dumps(value, indent=1) + "\n").encode())


def main(cfg: EmbedConfig) -> dict:
    """Embed the splits of cfg.data; returns the manifest entry of the set."""
    from data import make_loader
    from utills import os_errors_as_write_error, pick_device, set_threads

    config.check(cfg)
    console.print(f"[bold]embed[/] {dataclasses.asdict(cfg)}")
    set_threads(cfg.threads)
    data_dir = Path(cfg.data)
    manifest = read_manifest(data_dir)
    name = cfg.name or default_name(cfg.encoder)
    if not NAME_RE.match(name):
        raise EmbedError(f"--name {name!r}: use letters, digits, '_', '-' and '.' only")
    splits = [s.strip() for s in cfg.splits.split(",") if s.strip()] or list(manifest["splits"])
    for split in splits:
        if split not in manifest["splits"]:
            raise EmbedError(f"{data_dir / MANIFEST}: no split {split!r} (it has: {', '.join(manifest['splits'])})")
    device = pick_device(cfg.device)
    encoder = load_encoder(cfg.encoder, data_dir, device)
    ident = encoder.identity()
    console.print(f"encoder: {ident['kind']} {ident['name']} ({ident['dim']} dims, {ident['input_size']} px, "
                  f"sha256 {ident['sha256'][:12]}...) on {device}")
    old = (manifest.get("embeddings") or {}).get(name)
    keep = dict(old["splits"]) if isinstance(old, dict) and old.get("encoder") == ident else {}
    if isinstance(old, dict) and old.get("encoder") != ident:
        console.print(f"[yellow]set {name!r} was made with another encoder ({old.get('encoder', {}).get('name')}); "
                      f"making it again")
    progress_path = data_dir / f"embed-{name}.partial.json"
    progress = {}
    if progress_path.is_file():
        try:
            progress = json.loads(progress_path.read_text())
        except ValueError:
            progress = {}
        if progress.get("encoder") != ident:
            progress = {}
    progress = {"encoder": ident, "done": dict(progress.get("done", {}))}

    for split in splits:
        digest = shards_digest(manifest, split)
        if split in keep:
            try:
                check_split(data_dir, manifest, name, {"encoder": ident, "splits": keep}, split, verify=True)
                console.print(f"{split}: up to date ({keep[split]['file']})")
                continue
            except EmbedError as e:
                console.print(f"[yellow]{e}: making it again")
        count = int(manifest["splits"][split]["count"])
        final = data_dir / embed_file(name, split)
        partial = final.with_name(final.name + ".partial")
        done = progress["done"].get(split, {})
        start = int(done.get("rows", 0)) if done.get("shards_digest") == digest and partial.is_file() else 0
        with os_errors_as_write_error(partial):
            rows = np.lib.format.open_memmap(partial, mode="r+" if start else "w+", dtype=np.float16,
                                             shape=(count, encoder.dim))
        if start:
            console.print(f"{split}: resuming at row {start:,} of {count:,}")
        loader = make_loader(data_dir, cfg.batch_size, split=split, backend="torch", device="cpu", shuffle=False,
                             flip=False, num_threads=0, verify=start == 0)
        if start:
            state = loader.state_dict()
            loader = make_loader(data_dir, cfg.batch_size, split=split, backend="torch", device="cpu", shuffle=False,
                                 flip=False, num_threads=0, state={**state, "samples": start})
        n, since = start, 0
        with _progress() as bar:
            task = bar.add_task(f"{split}: {name}", total=count, completed=start)
            for batch in loader:
                e = encoder(batch["image"], cfg.batch_size).numpy()
                if not np.isfinite(e).all():
                    raise EmbedError(f"--encoder {cfg.encoder}: non-finite embedding for a face of rows {n}.."
                                     f"{n + len(e) - 1} of {split}")
                rows[n:n + len(e)] = e.astype(np.float16)
                n += len(e)
                since += len(e)
                bar.advance(task, len(e))
                if since >= CHUNK or n == count:
                    rows.flush()
                    with open(partial, "rb+") as f:
                        os.fsync(f.fileno())
                    progress["done"][split] = {"rows": n, "shards_digest": digest}
                    _write_json(progress_path, progress)
                    since = 0
        if n != count:
            raise EmbedError(f"{data_dir / MANIFEST}: split {split!r} gave {n} images, the manifest says {count}")
        del rows
        os.replace(partial, final)
        fsync_dir(data_dir)
        keep[split] = {"file": final.name, "count": count, "bytes": final.stat().st_size,
                       "sha256": sha256_file(final), "shards_digest": digest}
        # Recorded split by split: a run stopped during the next split keeps this one.
        _record(data_dir, name, ident, keep)
        progress["done"].pop(split, None)
        _write_json(progress_path, progress)
    entry = _record(data_dir, name, ident, keep)
    progress_path.unlink(missing_ok=True)
    console.print(f"[bold green]embeddings {name!r}[/]: " + ", ".join(f"{s} {v['count']:,} x {ident['dim']}"
                                                                    for s, v in entry["splits"].items())
                  + f" in {data_dir}")
    return entry


def _record(data_dir: Path, name: str, ident: dict, splits: dict) -> dict:
    """Write the set's entry into the manifest (re-read now, so nothing else in it is lost), atomically."""
    path = data_dir / MANIFEST
    manifest = json.loads(path.read_text())
    sets = manifest.get("embeddings") if isinstance(manifest.get("embeddings"), dict) else {}
    entry = {"encoder": ident, "dtype": "float16", "splits": dict(sorted(splits.items()))}
    manifest["embeddings"] = {**sets, name: entry}
    atomic_write(path, (json.dumps(manifest, indent=1) + "\n").encode())
    return entry


def cli(argv: list[str] | None = None) -> None:
    with config.user_errors():
        main(config.parse(EmbedConfig, argv)[0])


if __name__ == "__main__":
    cli(sys.argv[1:])

"""Faces in a web page: a local Gradio app over a run (pick a checkpoint, set the sampler, press Generate).

    python app.py --ckpt RUN                                   # http://127.0.0.1:7860, the run's newest checkpoint
    python app.py --ckpt RUN/checkpoints/step-00004000.pt --port 8000 --device cpu

The page shows what the checkpoint is (step, images seen, parameters, image size, EMA or not, conditional or not)
with the run's loss curve and FID history, and offers sample.py's settings: sampler (diffusion.SAMPLERS: DDIM, DDPM,
DPM-Solver++(2M)), steps, timestep spacing, eta, seed, number of faces, precision, and for a conditional model one
yes / no / free control per attribute and the guidance scale. For a model trained with --cond-embed, a reference face:
an uploaded image, or one of the first validation faces of the run's shards (or any sample key): the faces are made
like it (`sample.py --like FILE` / `--like-key KEY`: prepared and embedded by embed.py's functions, the encoder loaded
once per model and kept), and the grid's row starts with the reference as sample.py draws it; none is unconditional.
Generate makes the grid through sample.py's own functions (sample_n, then save_grid to a PNG file: the code path of
`sample.py --out`), so the page shows the bytes `sample.py` writes for the same settings and seed; the status line
prints that sample.py command. Each face is also its own PNG (the bytes of `sample.py --outdir`), downloadable from
the gallery. The checkpoint dropdown lists the run's checkpoints and switches between them without a restart.

Local and offline: no share link, no analytics, no fonts or scripts from outside (system fonts only); the server
listens on --host (127.0.0.1: this machine only). A request from a page of another site (its Origin header) is refused,
and so, on 127.0.0.1, is one addressed to another host name (DNS rebinding); uploads (the reference face) are capped
at 16 MB.
A bad checkpoint, a setting the model cannot take or running out of memory is one line on the page, and the server
keeps running. Ctrl-C or SIGTERM stops it: a Generate under way is abandoned at its next step, and the temporary
folder of generated PNGs (ddpm-app-PID-*) is removed; the folders of app.py processes that were killed are removed at
the next start. Gradio is imported here only (`pip install -e .[app]`).
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import html
import ipaddress
import itertools
import math
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
from rich.console import Console

import config
import diffusion
from atomic import atomic_write
from config import UserError
from grids import png_bytes, save_grid, to_uint8
from sample import (
    References,
    SampleConfig,
    batches,
    check_config,
    check_model_settings,
    grid_columns,
    sample_images,
    sample_n,
    split_list,
    trajectory_strip,
)
from utills import (
    PRECISIONS,
    CheckpointError,
    CheckpointWarning,
    LoadedModel,
    list_checkpoints,
    load_model,
    owning_run,
    pick_device,
    pid_alive,
    read_metrics,
    resolve_checkpoint,
    run_paths,
    set_threads,
)

console = Console(stderr=True)

ATTR_STATES = ("free", "yes", "no")  # one control per attribute: yes -> NAME=1, no -> NAME=0, free -> not named
KEEP_GENERATIONS = 8  # folders of generated PNGs kept on disk (the page only shows the last)
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica", "Arial",
                "sans-serif"]  # no Google fonts: the page must load offline
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "Liberation Mono", "monospace"]
WORKDIR_PREFIX = "ddpm-app-"  # the generated PNGs: TMPDIR/ddpm-app-PID-XXXXXXXX, removed at exit
MAX_UPLOAD = "16mb"  # Gradio's upload route, capped: the page takes one upload, a reference face (a photo)
REFERENCE_FACES = 24  # the faces of the shards' valid split (else test) offered as references


@dataclass
class AppConfig:
    ckpt: str = ""  # run folder (its checkpoints in a dropdown, the newest valid one first), a .pt or .safetensors
    host: str = "127.0.0.1"  # address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)
    port: int = 7860  # port to listen on
    device: str = "auto"  # auto | cuda | cuda:N | cpu
    threads: int = 0  # intra-op CPU threads (0 = PyTorch's default, one per core)
    batch_size: int = 256  # images per sampling batch, as sample.py --batch-size (DDPM pixels depend on it)
    max_faces: int = 64  # the most faces one Generate may ask for

    REQUIRED: ClassVar[tuple[str, ...]] = ("ckpt",)
    BOUNDS: ClassVar[dict] = {"port": "1..65535", "threads": ">= 0", "batch_size": ">= 1", "max_faces": "1..1024"}


class AppError(UserError, ValueError):
    """Bad input for the app (no such run or file): a one-line message."""


def check_app_config(cfg: AppConfig) -> None:
    """Reject values that cannot work, with one line each (--device: pick_device, before the page is built)."""
    config.check(cfg)
    if not Path(cfg.ckpt).exists():
        raise AppError(f"--ckpt {cfg.ckpt}: no such checkpoint file or run folder")


def page_line(e: BaseException) -> str:
    """An error caught by the page as the one line it shows (the server stays up). A bug, neither a UserError nor an
    OSError, also prints its traceback on the console, as a script would."""
    if not isinstance(e, (UserError, OSError)):
        traceback.print_exception(type(e), e, e.__traceback__)
    return config.one_line(e)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def error_line(e: BaseException, device: torch.device, n: int, batch_size: int) -> str:
    """What the page says when Generate fails: out of memory with what to change, else the error's one line."""
    if is_oom(e):
        return (f"out of memory on {device} making {n} faces in batches of {batch_size}: ask for fewer faces, "
                f"or start app.py with a smaller --batch-size")
    return page_line(e)


# ------------------------------------------------------------------------------------------------ the run

def run_folder(ckpt: Path) -> Path | None:
    """The run a --ckpt belongs to: the folder itself, or RUN for RUN/checkpoints/FILE or RUN/phema/FILE; None for a
    lone file."""
    if ckpt.is_dir():
        return ckpt.parent if ckpt == run_paths(ckpt.parent).checkpoints else ckpt
    return owning_run(ckpt)


def checkpoint_choices(ckpt: Path) -> list[tuple[str, str]]:
    """The dropdown: (file name, path) for the run's step-*.pt (newest first), best-fid.pt, and the post-hoc EMA
    averages reconstructed by ema.py (RUN/phema/phema-*.pt, newest step first); a lone file alone."""
    run = run_folder(ckpt)
    files = list(reversed(list_checkpoints(run))) if run is not None else []
    if run is not None and run_paths(run).best_fid.is_file():
        files.append(run_paths(run).best_fid)
    if run is not None and run_paths(run).phema.is_dir():
        files += sorted(run_paths(run).phema.glob("phema-*-step-*.pt"), key=lambda p: (-phema_step(p), p.name))
    if ckpt.is_file() and ckpt.resolve() not in {f.resolve() for f in files}:
        files.insert(0, ckpt)
    return [(f"{f.parent.name}/{f.name}" if f.parent.name == "phema" else f.name, str(f)) for f in files]


def phema_step(path: Path) -> int:
    """The step in a reconstructed average's name, phema-0.0800-step-00004000.pt."""
    return int(path.stem.rsplit("-", 1)[1])


def first_choice(ckpt: Path) -> str:
    """The checkpoint shown first: the file given, or the run's newest one that verifies (the one sample.py takes)."""
    if ckpt.is_file():
        return str(ckpt)
    with warnings.catch_warnings(record=True) as skipped:  # newer files that do not load: one line each
        warnings.simplefilter("always", CheckpointWarning)
        try:
            return str(resolve_checkpoint(ckpt))
        except CheckpointError:  # nothing loads: show the newest, whose error the page then shows
            choices = checkpoint_choices(ckpt)
            return choices[0][1] if choices else ""
        finally:
            for w in skipped:
                console.print(f"[yellow]warning:[/] {w.message}")


def checkpoint_facts(path: Path) -> dict:
    """The plain values of a checkpoint file that LoadedModel does not carry (images seen, epoch, the training config),
    read without its weights (a memory map); {} for a safetensors export or a file that does not load."""
    if path.suffix == ".safetensors":
        return {}
    for mmap in (True, False):  # mmap needs the zip format of torch.save; older files are read whole
        with contextlib.suppress(Exception):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            if isinstance(ckpt, dict):
                return {k: ckpt.get(k) for k in ("images_seen", "epoch", "config")}
    return {}


def weights_words(weights: str) -> str:
    """LoadedModel.weights for a person: EMA, raw, or a post-hoc EMA average and its sigma_rel."""
    if weights.startswith("phema"):
        return f"post-hoc EMA, sigma_rel {float(weights.removeprefix('phema')):g}"
    return {"ema": "EMA", "raw": "raw (not EMA)"}.get(weights, weights)


def describe(loaded: LoadedModel) -> str:
    """Markdown: what the loaded checkpoint is."""
    facts = checkpoint_facts(loaded.source)
    params = sum(p.numel() for p in loaded.model.parameters())
    seen = facts.get("images_seen")
    train_cfg = facts.get("config") or {}
    dc = loaded.diffusion_config
    lines = [
        f"**{loaded.source.name}**",
        f"- step **{loaded.step if loaded.step >= 0 else 'unknown'}**, "
        + (f"**{seen:,}** images seen" if isinstance(seen, int) else "images seen: not recorded"),
        f"- **{params:,}** parameters" + (f" (preset {train_cfg['preset']})" if train_cfg.get("preset") else ""),
        f"- **{loaded.image_size}x{loaded.image_size}** px, {loaded.channels} channels",
        f"- **{weights_words(loaded.weights)}** weights",
        f"- **{'conditional' if loaded.conditional else 'unconditional'}**"
        + (f" on {len(loaded.attributes)} attributes" if loaded.conditional else ""),
    ] + ([f"- **reference face**: a {loaded.embed_dim}-value embedding "
          f"({(loaded.embedding or {}).get('encoder', {}).get('name', 'encoder not recorded')}), `--cond-embed`"]
         if loaded.embed_dim else []) + [
        f"- diffusion: {dc.get('objective', 'eps')} objective, {dc.get('schedule', 'linear')} schedule, "
        f"{dc.get('timesteps', '?')} timesteps",
    ]
    return "\n".join(lines)


def attribute_note(loaded: LoadedModel | None) -> str:
    """What "free" means for this checkpoint: three-state models leave an unnamed attribute to the model."""
    if loaded is None or not loaded.conditional:
        return ""
    if loaded.free_attributes:
        return "free: the model chooses (the attribute is left out of the request)."
    return ("This checkpoint was trained with two states per attribute: **free means no (0)** as soon as any "
            "attribute is set to yes or no; with every attribute free the faces are unconditional.")


def fid_history(run: Path | None) -> str:
    """Markdown table of the run's FIDs: training-time (metrics.jsonl) and evaluate.py's (eval.jsonl)."""
    if run is None:
        return "No run folder: no FID history."
    rows = []
    paths = run_paths(run)
    for r in read_metrics(paths.metrics) if paths.metrics.is_file() else []:
        if isinstance(r.get("fid"), (int, float)):
            kid = f"{r['kid']:.4f}" if isinstance(r.get("kid"), (int, float)) else ""
            rows.append((r["step"], f"{r['fid']:.2f}", kid, r.get("eval_n", ""), "training (EMA, DDIM)"))
    if paths.eval_history.is_file():
        import json

        for line in paths.eval_history.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                r = json.loads(line)
                s = r.get("sampler", {})
                kid = f"{r['kid_mean']:.4f}" if isinstance(r.get("kid_mean"), (int, float)) else ""
                rows.append((r["step"], f"{r['fid']:.2f}", kid, r.get("n", ""),
                             f"evaluate.py ({r.get('weights', '')}, {s.get('sampler', '')}-{s.get('steps', '')})"))
    if not rows:
        return "No FID in this run yet (train.py --eval-every, or evaluate.py)."
    table = ["| step | FID | KID | samples | from |", "| ---: | ---: | ---: | ---: | --- |"]
    table += [f"| {step} | {fid} | {kid} | {n} | {source} |" for step, fid, kid, n, source in rows]
    return "\n".join(table)


def loss_picture(run: Path | None, workdir: Path) -> str | None:
    """pictures.loss_plot of the run (loss, FID, lr), drawn from a copy of metrics.jsonl so that the run folder is
    only read; None when the run has no metrics."""
    if run is None or not run_paths(run).metrics.is_file():
        return None
    import pictures  # matplotlib: only when there is a curve to draw

    copy = Path(tempfile.mkdtemp(dir=workdir, prefix="plot-")) / run.name
    copy.mkdir()
    shutil.copyfile(run_paths(run).metrics, run_paths(copy).metrics)
    try:
        return str(pictures.loss_plot(copy))
    except pictures.PicturesError:  # no finite loss yet
        return None


# ------------------------------------------------------------------------------------------------ sampling

class CurrentModel:
    """The one loaded model (the last checkpoint asked for), shared by every page; a lock keeps one user of it."""

    def __init__(self, device: torch.device, stopping: threading.Event | None = None):
        self.device = device
        self.key: tuple | None = None
        self.loaded: LoadedModel | None = None
        self.lock = threading.Lock()
        self.stopping = stopping or threading.Event()  # set when the app stops: a Generate under way gives up
        self.encoder_key: str | None = None  # the reference encoder (--cond-embed models), kept while models use it
        self.reference_encoder: Any = None

    def get(self, path: str, ema: bool) -> LoadedModel:
        """The model of checkpoint `path` (reloaded when the file changed); CheckpointError for a bad file."""
        if not path:
            raise AppError("no checkpoint chosen (the run has none yet)")
        p = Path(path)
        if not p.is_file():
            raise CheckpointError(f"{p}: no such checkpoint file")
        st = p.stat()
        key = (str(p.resolve()), st.st_mtime_ns, st.st_size, bool(ema))
        if key != self.key:
            self.key, self.loaded = None, None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.loaded = load_model(p, use_ema=ema, device=self.device)
            self.key = key
            console.print(f"loaded {self.loaded.source} (step {self.loaded.step}, {self.loaded.weights} weights, "
                          f"{self.loaded.image_size} px, "
                          f"{'conditional' if self.loaded.conditional else 'unconditional'}) on {self.device}")
            if self.encoder_key != encoder_key(self.loaded):  # another encoder, or none: free the old one
                self.encoder_key, self.reference_encoder = None, None
        return self.loaded

    def encoder(self, loaded: LoadedModel) -> Any:
        """The embed.Encoder of a --cond-embed model (embed.encoder_for: the one its checkpoint names, its weights
        checked by sha256), loaded at its first reference and kept for every later one (and for the run's other
        checkpoints, which name the same). EmbedError when it cannot be loaded."""
        key = encoder_key(loaded)
        if key is None:
            raise AppError(f"{loaded.source.name}: the model was not trained with --cond-embed; it takes no reference "
                           f"face")
        if key != self.encoder_key:
            import embed

            self.encoder_key, self.reference_encoder = None, None
            data = loaded.embedding.get("data") or ""
            self.reference_encoder = embed.encoder_for(loaded.embedding, "", data if Path(data).is_dir() else None,
                                                       self.device)
            self.encoder_key = key
            console.print(f"loaded the reference encoder {loaded.embedding['encoder'].get('name')} on {self.device}")
        return self.reference_encoder


def encoder_key(loaded: LoadedModel | None) -> str | None:
    """What identifies a model's reference encoder (its record's identity and shards folder); None without one."""
    if loaded is None or not loaded.embed_dim or not isinstance(loaded.embedding, dict):
        return None
    import json

    return json.dumps([loaded.embedding.get("encoder"), loaded.embedding.get("data")], sort_keys=True)


# ------------------------------------------------------------------------------------------------ reference faces

def reference_faces(current: CurrentModel, loaded: LoadedModel, files: list[str], keys: list[str]) -> References:
    """The references of a Generate, as sample.py's load_references makes them (files, then sample keys; one row
    each): a face file prepared as the shards were (embed.prepare_reference, with the crop, size and encoding the
    checkpoint records), a key's image from the run's shards (embed.shard_image), embedded by the model's encoder
    (CurrentModel.encoder: loaded once). One line for what cannot work (not an image, no such key, no shards)."""
    import embed

    record = loaded.embedding
    if not loaded.embed_dim or not isinstance(record, dict):
        raise AppError(f"{loaded.source.name}: the model was not trained with --cond-embed; it takes no reference "
                       f"face")
    data = record.get("data") or ""
    images, labels = [], []
    for f in files:
        images.append(reference_image(record, f))
        labels.append(Path(f).stem[:14])
    for key in keys:
        if not data or not Path(data).is_dir():
            raise AppError(f"reference key {key}: the run's shards folder {data!r} is not here; upload the face "
                           f"instead")
        image, _, _ = embed.shard_image(data, key)
        if image.shape[-1] != loaded.image_size:
            raise AppError(f"reference key {key}: {data} holds {image.shape[-1]} px images, the model "
                           f"{loaded.image_size} px")
        images.append(image)
        labels.append(key[:14])
    batch = torch.stack(images)
    return References(batch, current.encoder(loaded)(batch), labels)


def reference_image(record: dict, path: str | os.PathLike) -> torch.Tensor:
    """A face file as sample.py --like prepares it (embed.prepare_reference with the shards' crop, size and encoding
    from the checkpoint's record) -> [3, S, S] in [-1, 1]; one line naming the file (by its own name, not its place
    in Gradio's cache) when it is not an image."""
    import embed

    try:
        return embed.prepare_reference(path, record["shards"])
    except embed.EmbedError as e:  # PIL names the in-memory copy it was given: not worth a line
        why = re.sub(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e).removeprefix(f"{Path(path)}: "))
        raise AppError(f"reference face {Path(path).name}: {why}") from None


def like_rows(loaded: LoadedModel, scfg: SampleConfig, refs: References) -> tuple[torch.Tensor, torch.Tensor]:
    """The pictures of sample.py's like_grid, made as it makes them (one row per reference: the reference, then
    scfg.n faces like it, column j from image j's noise) -> (the grid's pictures in order, the faces alone)."""
    pictures, faces = [], []
    for r in range(len(refs.labels)):
        pictures.append(refs.images[r:r + 1].clamp(-1, 1))
        for start, count in batches(scfg.n, scfg.batch_size):
            faces.append(sample_images(loaded, scfg, start, count, ref=refs.embeddings[r]))
            pictures.append(faces[-1])
    return torch.cat(pictures), torch.cat(faces)


def reference_split(data: str | os.PathLike) -> str:
    """The split whose faces the page offers as references: valid, else test (ManifestError without either)."""
    from manifest import read_manifest

    splits = read_manifest(data)["splits"]
    for split in ("valid", "test"):
        if int((splits.get(split) or {}).get("count", 0)) > 0:
            return split
    raise AppError(f"{data}: the shards have no valid or test split to pick a reference face from")


def shard_faces(data: str | os.PathLike, folder: Path,
                limit: int = REFERENCE_FACES) -> tuple[str, list[tuple[str, str]]]:
    """The first `limit` faces of the shards' valid split (else test), for the page to offer as references ->
    (split, [(picture file, sample key)]). The pictures are the shard images' own bytes, written into `folder`; the
    face a key gives to Generate is read again by embed.shard_image, as sample.py --like-key reads it."""
    from data import SampleIndex  # as embed.shard_image reads the shards
    from manifest import read_manifest

    data = Path(data)
    split = reference_split(data)
    manifest = read_manifest(data)
    index = SampleIndex.of_split(data, manifest, split)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        faces = [(str(atomic_write(folder / f"{i:03d}.{manifest['format']}", index.image(i))), index.keys[i])
                 for i in range(min(limit, len(index)))]
    finally:
        index.close()
    return split, faces


def reference_picker(loaded: LoadedModel | None, workdir: Path) -> tuple[list[tuple[str, str]], str]:
    """What the page offers to pick for a --cond-embed model: the first REFERENCE_FACES faces of its shards (the
    record's "data") as [(picture, sample key)] with a line saying where they are from, or [] and why there are none
    (the shards are not on this machine)."""
    if encoder_key(loaded) is None:
        return [], ""
    data = loaded.embedding.get("data") or ""
    if not data or not Path(data).is_dir():
        return [], (f"The run's shards (`{data}`) are not on this machine, so there are no faces of theirs to pick: "
                    f"upload one.")
    import hashlib

    folder = workdir / f"refs-{hashlib.sha256(str(Path(data).resolve()).encode()).hexdigest()[:12]}"
    try:
        split, faces = shard_faces(data, folder)
    except (UserError, OSError) as e:
        return [], f"The run's shards (`{data}`) cannot be read ({page_line(e)}): upload a face."
    return faces, (f"Or click one of the first {len(faces)} faces of the {split} split of `{data}`: its sample key "
                   f"goes in the box, which takes any key of the shards (several: KEY,KEY, a row each).")


def reference_note(loaded: LoadedModel | None, picker: str) -> str:
    """Markdown over the reference-face controls: what a reference does for this model, and where the faces to pick
    come from (or why there are none)."""
    if loaded is None or not loaded.embed_dim or not isinstance(loaded.embedding, dict):
        return ""
    name = loaded.embedding.get("encoder", {}).get("name", "?")
    return (f"This model was trained with `--cond-embed` (encoder `{name}`): Generate makes faces like a reference "
            f"face, cropped and resized as the shards were; the reference starts its row of the grid, and the guidance "
            f"scale pushes towards it. Upload a face, or pick one below; with none the faces are unconditional.\n\n"
            + picker)


def attrs_spec(names: list[str], states: list[str]) -> str:
    """The page's yes / no / free per attribute -> sample.py's --attrs ("Smiling=1,Eyeglasses=0"; free: left out)."""
    return ",".join(f"{name}={1 if state == 'yes' else 0}" for name, state in zip(names, states)
                    if state in ("yes", "no"))


def sample_command(scfg: SampleConfig) -> str:
    """The sample.py command line that makes the same grid (the fields that differ from its defaults)."""
    default = SampleConfig()
    parts = ["python", "sample.py"]
    for f in dataclasses.fields(SampleConfig):
        value = getattr(scfg, f.name)
        if f.name in ("out", "trajectory") or (value == getattr(default, f.name) and f.name not in ("ckpt", "n")):
            continue
        if isinstance(value, bool):
            parts.append(config.flag(f.name) if value else "--no-" + f.name.replace("_", "-"))
        else:
            parts += [config.flag(f.name), str(value)]
    return shlex.join(parts + ["--out", "grid.png"])


@contextlib.contextmanager
def counting_steps(model: torch.nn.Module, total: int, report: Callable[[int, int], None],
                   stopping: threading.Event | None = None):
    """Call report(done, total) at each forward of the model (one per sampling step and batch): the page's progress.
    Once `stopping` is set, the next forward raises AppError instead (the app is stopping: no sampling for minutes)."""
    done = 0

    def hook(module, args):
        nonlocal done
        if stopping is not None and stopping.is_set():
            raise AppError("app.py is stopping: this Generate was abandoned")
        done += 1
        report(min(done, total), total)

    handle = model.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def generate(current: CurrentModel, app_cfg: AppConfig, workdir: Path, values: dict,
             report: Callable[[int, int], None] = lambda done, total: None) -> tuple[Path, list[Path], Path | None,
                                                                                   str]:
    """Make the faces the page asks for -> (grid PNG, one PNG per face, trajectory PNG or None, status line).

    values: ckpt, ema, sampler, steps, spacing, eta, seed, n, precision, trajectory, guidance, attrs (the page's
    controls; spacing defaults to "auto"); like_file (an uploaded reference face) and like_key (sample keys of the
    run's shards, KEY[,KEY...]) for a --cond-embed model: one grid row per reference, the file first, each starting
    with its reference, as sample.py --like FILE --like-key KEY draws it (the faces: every row's, in order).
    Raises UserErrors (SampleError, ConfigError, CheckpointError, EmbedError, ...) with one-line messages.
    """
    n = int(values["n"])
    if not 1 <= n <= app_cfg.max_faces:
        raise AppError(f"faces: {n} is not in 1..{app_cfg.max_faces} (app.py --max-faces)")
    like_files = [values["like_file"]] if values.get("like_file") else []
    like_keys = split_list(values.get("like_key") or "")
    # eta is DDIM's noise: the slider's value is not an error for the other samplers, only unused.
    scfg = SampleConfig(ckpt=values["ckpt"], n=n, batch_size=app_cfg.batch_size, sampler=values["sampler"],
                        steps=int(values["steps"]), spacing=values.get("spacing", "auto"),
                        eta=float(values["eta"]) if values["sampler"] == "ddim" else 0.0, seed=int(values["seed"]),
                        ema=bool(values["ema"]), device=app_cfg.device, threads=app_cfg.threads,
                        precision=values["precision"], attrs=values["attrs"], guidance=float(values["guidance"]),
                        like=",".join(like_files), like_key=",".join(like_keys), out="grid.png",
                        trajectory="trajectory.png" if values["trajectory"] else "")  # for check_memory
    check_config(scfg)
    with current.lock:
        set_threads(app_cfg.threads)  # this runs on one of the server's threads, where --threads was not set
        loaded = current.get(scfg.ckpt, scfg.ema)
        check_model_settings(scfg, loaded)  # steps or an attribute the model cannot take: before any sampling
        refs = reference_faces(current, loaded, like_files, like_keys) if like_files or like_keys else None
        console.print(f"[bold]generate[/] {dataclasses.asdict(scfg)}")
        out = Path(tempfile.mkdtemp(dir=workdir, prefix=f"{time.strftime('%H%M%S')}-seed{scfg.seed}-"))
        rows = len(refs.labels) if refs is not None else 1
        total = scfg.steps * (rows * len(batches(n, scfg.batch_size)) + (1 if values["trajectory"] else 0))
        started = time.perf_counter()
        with counting_steps(loaded.model, total, report, current.stopping):
            if refs is None:  # the code path of `sample.py --out`: sample_n, then save_grid with grid_columns(n)
                images = sample_n(loaded, scfg)
                grid = save_grid(images, out / "grid.png", nrow=grid_columns(n), padding=2)
            else:  # that of `sample.py --like ... --out` (like_grid): a labelled row per reference
                pictures, images = like_rows(loaded, scfg, refs)
                grid = save_grid(pictures, out / "grid.png", nrow=n + 1, padding=2, labels=refs.labels)
            faces = [atomic_write(out / f"face-{i:03d}.png", png_bytes(picture))  # as sample.py --outdir writes them
                     for i, picture in enumerate(to_uint8(images))]
            traj = trajectory_strip(loaded, scfg, out / "trajectory.png", refs) if values["trajectory"] else None
        seconds = time.perf_counter() - started
    prune(workdir)
    like = f" like {', '.join(refs.labels)}" if refs is not None else ""
    status = (f"{n} faces{like}, {scfg.sampler}-{scfg.steps}, seed {scfg.seed}, in {seconds:.1f} s on "
              f"{current.device}. The same grid: {sample_command(scfg)}")
    return grid, faces, traj, status


def prune(workdir: Path) -> None:
    """Keep the newest KEEP_GENERATIONS folders of generated pictures (the page has copies of what it shows)."""
    folders = sorted((p for p in workdir.iterdir() if p.is_dir() and not p.name.startswith(("plot-", "refs-"))),
                     key=lambda p: p.stat().st_mtime)
    for old in folders[:-KEEP_GENERATIONS]:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ the page

STATUS_SERIAL = itertools.count(1)


def status_html(text: str, error: bool = False) -> str:
    """The page's one status line (escaped: attribute names and paths hold characters Markdown would eat). Each line
    carries a new data-serial, so that a script can tell a repeated message from the old one."""
    text = " ".join(text.split())
    kind, prefix = ("status-line error", "error: ") if error else ("status-line", "")
    return f'<div class="{kind}" data-serial="{next(STATUS_SERIAL)}">{prefix}{html.escape(text)}</div>'


CSS = """
.status-line { font-family: var(--font-mono); font-size: 0.9em; overflow-wrap: anywhere; }
.status-line.error { color: #c62828; font-weight: 600; white-space: nowrap; overflow-x: auto; }
#grid .image-frame, #traj .image-frame { width: 100%; height: 100%; }
#grid img, #traj img { width: 100% !important; height: 100% !important; object-fit: contain;
                       image-rendering: pixelated; }
#faces img { image-rendering: pixelated; }
#faces .grid-container { grid-template-columns: repeat(auto-fill, minmax(72px, 1fr)) !important; }
#faces .grid-wrap { height: auto !important; min-height: 0 !important; max-height: 640px; }
#like-faces img { image-rendering: pixelated; }
#like-faces .grid-container { grid-template-columns: repeat(auto-fill, minmax(64px, 1fr)) !important; }
#like-faces .caption-label { font-size: 0.7em; padding: 0 3px; max-width: 100%; }
#like-faces .grid-wrap { height: auto !important; min-height: 0 !important; max-height: 320px; }
#fid table { font-size: 0.85em; width: auto; }
#fid th, #fid td { padding: 2px 8px; }
"""


def build_page(cfg: AppConfig, device: torch.device, workdir: Path,
               stopping: threading.Event | None = None) -> tuple[Any, Any]:
    """The Gradio Blocks of the app and its theme (gradio is imported here, and only here); once `stopping` is set, a
    Generate under way gives up at its next step."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before the import: no telemetry, no version check
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio as gr
    except ImportError as e:  # gradio, or a package it needs
        raise AppError(f"{e.name or e}: not installed; app.py needs `pip install -e .[app]` "
                       f"(the versions of requirements.lock)") from None

    ckpt = Path(cfg.ckpt)
    run = run_folder(ckpt)
    current = CurrentModel(device, stopping)
    first = first_choice(ckpt)
    # The attribute controls are built once, from the checkpoint first shown (every checkpoint of a run has the same).
    names: list[str] = []
    startup_error = ""
    shown: LoadedModel | None = None  # the model the page comes up with (its sections shown or hidden)
    for path in [first] + [p for _, p in checkpoint_choices(ckpt) if p != first]:
        try:
            shown = current.get(path, True) if path else None
            names = list(shown.attributes) if shown is not None else []
            break
        except Exception as e:  # the page still comes up, with this line on it
            line = page_line(e)
            startup_error = startup_error or line
            console.print(f"[yellow]warning:[/] {line}")

    pickers: dict[str | None, tuple[list[tuple[str, str]], str]] = {}  # reference_picker per shards folder

    def picker(loaded: LoadedModel | None) -> tuple[list[tuple[str, str]], str]:
        data = loaded.embedding.get("data") if encoder_key(loaded) is not None else None
        if data not in pickers or (data and not pickers[data][0] and Path(data).is_dir()):  # shards back: read them
            pickers[data] = reference_picker(loaded, workdir)
        return pickers[data]

    def on_select(path: str, ema: bool):
        """The checkpoint dropdown or the EMA box changed: load it and describe it, or show why it cannot load; the
        guidance scale and the reference-face section are shown for the models that take them."""
        try:
            with current.lock:
                loaded = current.get(path, ema)
            embeds = encoder_key(loaded) is not None
            faces, where = picker(loaded)
            return (describe(loaded), attribute_note(loaded), status_html(f"{Path(path).name} loaded on {device}"),
                    gr.update(visible=loaded.conditional or embeds), gr.update(visible=embeds),
                    reference_note(loaded, where), gr.update(value=faces or None, visible=bool(faces)),
                    gr.update(visible=bool(faces)))
        except Exception as e:  # any failure is a line on the page; the server goes on
            return (f"**{Path(path).name if path else 'no checkpoint'}**: not loaded", "",
                    status_html(page_line(e), True)) + (gr.update(),) * 5

    def on_upload(payload: dict | None):
        """A reference face was uploaded (its file in Gradio's cache, unprocessed): remember it for Generate (the
        picked key is cleared: one reference at a time from the page) and say at once whether it is an image."""
        path = (payload or {}).get("path") or ""
        if not path:
            return "", gr.update(), gr.update()
        loaded = current.loaded
        try:
            if encoder_key(loaded) is not None:
                reference_image(loaded.embedding, path)
            return path, "", status_html(f"reference face {Path(path).name}: Generate makes faces like it")
        except Exception as e:  # not an image: the one line now, and again at Generate
            return path, "", status_html(page_line(e), True)

    def on_pick(evt: gr.SelectData):
        """A face of the shards was clicked: its sample key is the reference (the upload is cleared)."""
        key = str((evt.value or {}).get("caption") or "") if isinstance(evt.value, dict) else ""
        return key, None, "", status_html(f"reference key {key}: Generate makes faces like it")

    on_pick.__annotations__["evt"] = gr.SelectData  # the class itself: Gradio cannot resolve "gr.SelectData" here

    def on_refresh(path: str):
        """Re-read the run folder: new checkpoints (training may be running), the loss curve, the FID history."""
        choices = checkpoint_choices(ckpt)
        value = path if path in [p for _, p in choices] else (choices[0][1] if choices else None)
        return gr.update(choices=choices, value=value), loss_picture(run, workdir), fid_history(run)

    def on_generate(values: dict, progress=gr.Progress()):
        v = {key: values[component] for key, component in controls.items()}
        v["attrs"] = attrs_spec(names, [values[r] for r in radios])
        progress(0, desc="loading")
        try:
            grid, faces, traj, status = generate(current, cfg, workdir, v,
                                                 lambda done, total: progress((done, total), desc="sampling",
                                                                              unit="steps"))
            return str(grid), [str(f) for f in faces], gr.update(value=str(traj) if traj else None,
                                                                 visible=traj is not None), status_html(status)
        except Exception as e:  # a bad file, a setting the model cannot take, out of memory: one line, server up
            if is_oom(e) and device.type == "cuda":
                torch.cuda.empty_cache()
            message = error_line(e, device, v["n"], cfg.batch_size)
            console.print(f"[red]error:[/] {message}")
            return None, [], gr.update(value=None, visible=False), status_html(message, True)

    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)
    title = f"celeba-ddpm: {run.name if run is not None else ckpt.name}"
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown(f"## {html.escape(title)}")
        with gr.Row():
            with gr.Column(scale=2):
                with gr.Row():
                    dropdown = gr.Dropdown(checkpoint_choices(ckpt), value=first or None, label="checkpoint",
                                           elem_id="ckpt", scale=4)
                    refresh = gr.Button("refresh", elem_id="refresh", scale=0, min_width=90, size="sm")
                ema = gr.Checkbox(True, label="EMA weights", elem_id="ema")
                info = gr.Markdown(elem_id="info")
                with gr.Accordion("training", open=True):
                    loss = gr.Image(label="loss (and FID)", type="filepath", format="png", interactive=False,
                                    elem_id="loss", buttons=["download", "fullscreen"])
                    fids = gr.Markdown(elem_id="fid")
            with gr.Column(scale=3):
                with gr.Row():
                    sampler = gr.Radio(list(diffusion.SAMPLERS), value=SampleConfig.sampler,
                                       label="sampler (dpm++2m: DPM-Solver++, 10-20 steps)", elem_id="sampler")
                    precision = gr.Radio(list(PRECISIONS), value="fp32", label="precision", elem_id="precision")
                with gr.Row():
                    steps = gr.Slider(1, 1000, value=50, step=1, label="steps", elem_id="steps")
                    spacing = gr.Dropdown(list(SampleConfig.CHOICES["spacing"]), value=SampleConfig.spacing,
                                          label="timestep spacing", elem_id="spacing", min_width=140)
                    eta = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="eta (DDIM noise: 0 deterministic)",
                                    elem_id="eta")
                with gr.Row():
                    seed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="seed")
                    n = gr.Slider(1, cfg.max_faces, value=min(16, cfg.max_faces), step=1, label="faces",
                                  elem_id="n")
                    trajectory = gr.Checkbox(False, label="noise-to-face trajectory", elem_id="trajectory")
                embeds = encoder_key(shown) is not None
                guidance = gr.Slider(0.0, 10.0, value=1.0, step=0.1, label="guidance scale (1: plain conditional)",
                                     elem_id="guidance", visible=bool(names) or embeds)
                # The upload is never sent a gr.update (Gradio would rebuild it): only values, and its section's.
                with gr.Accordion("reference face", open=True, visible=embeds, elem_id="reference") as reference:
                    like_note = gr.Markdown(elem_id="like-note")
                    with gr.Row():
                        upload = gr.Image(label="reference face (upload)", type="filepath", image_mode=None,
                                          sources=["upload", "clipboard"], elem_id="like-upload", height=180,
                                          scale=1, min_width=160, buttons=[])
                        with gr.Column(scale=3):
                            like_key = gr.Textbox(label="or a sample key of the shards (empty: none)",
                                                  elem_id="like-key", max_lines=1)
                            picks = gr.Gallery(label="faces of the run's shards (click one)", columns=12,
                                               height="auto", allow_preview=False, elem_id="like-faces",
                                               buttons=[], format="png")
                    like_file = gr.State("")  # the uploaded face's file (in Gradio's cache), as uploaded
                radios: list[Any] = []
                with gr.Accordion("attributes", open=True, visible=bool(names)):
                    note = gr.Markdown(elem_id="attr-note")
                    for row in range(math.ceil(len(names) / 4)):
                        with gr.Row():
                            for name in names[row * 4:row * 4 + 4]:
                                radios.append(gr.Radio(list(ATTR_STATES), value="free", label=name,
                                                       elem_id=f"attr-{name}", min_width=120))
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.HTML(status_html(startup_error, True) if startup_error else status_html("ready"),
                                 elem_id="status")
                grid = gr.Image(label="grid (the PNG sample.py --out writes)", type="filepath", format="png",
                                interactive=False, elem_id="grid", height=480, buttons=["download", "fullscreen"])
                faces = gr.Gallery(label="faces (each a PNG to download)", columns=8, height="auto", elem_id="faces",
                                   format="png", buttons=["download", "download_all", "fullscreen"])
                traj = gr.Image(label="noise to face", type="filepath", format="png", interactive=False, height=360,
                                visible=False, elem_id="traj", buttons=["download", "fullscreen"])

        controls = {"ckpt": dropdown, "ema": ema, "sampler": sampler, "steps": steps, "spacing": spacing, "eta": eta,
                    "seed": seed,
                    "n": n, "precision": precision, "trajectory": trajectory, "guidance": guidance,
                    "like_file": like_file, "like_key": like_key}
        selected = [info, note, status, guidance, reference, like_note, picks, like_key]
        for trigger in (dropdown.change, ema.change):
            trigger(on_select, [dropdown, ema], selected)
        # Unprocessed: gr.Image would open the file itself and fail with no message on one that is not an image.
        upload.upload(on_upload, [upload], [like_file, like_key, status], preprocess=False)
        upload.clear(lambda: "", None, [like_file])
        picks.select(on_pick, None, [like_key, upload, like_file, status])
        refresh.click(on_refresh, [dropdown], [dropdown, loss, fids])
        generate_button.click(on_generate, set(controls.values()) | set(radios), [grid, faces, traj, status])
        page.load(on_refresh, [dropdown], [dropdown, loss, fids]).then(on_select, [dropdown, ema], selected)
    return page, theme


# ------------------------------------------------------------------------------------------------ the server

def is_loopback(name: str | None) -> bool:
    """Whether a host name or address is this machine only (localhost, 127.0.0.0/8, ::1)."""
    if name is not None and name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name or "").is_loopback
    except ValueError:
        return False


def request_refusal(host: str | None, origin: str | None, loopback: bool) -> str | None:
    """Why the app refuses a request, or None. An Origin that is not the app's own address is a page of another site
    sending it (a form or a script: CSRF); while the app listens on loopback only, a Host that is not a loopback name
    is another site's name resolved to 127.0.0.1 (DNS rebinding). Gradio itself only withholds the CORS header from
    those: the request still runs, so a page elsewhere could upload files or start Generates."""
    try:
        name = urllib.parse.urlsplit(f"//{host or ''}").hostname
    except ValueError:  # a malformed Host ("[::1")
        name = None
    if loopback and not is_loopback(name):
        return f"Host {host!r}: this app answers to 127.0.0.1 and localhost only"
    if origin is not None:
        try:
            own = urllib.parse.urlsplit(origin).netloc.lower() == (host or "").lower()
        except ValueError:
            own = False
        if not own:
            return f"Origin {origin!r}: requests from pages of other sites are refused"
    return None


class OriginCheck:
    """ASGI middleware in front of every route of the Gradio app: a request that request_refusal refuses gets 403 and
    its one line, before any of Gradio's code (an upload, a queue join) runs."""

    def __init__(self, app: Callable, loopback: bool):
        self.app, self.loopback = app, loopback

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            reason = request_refusal(headers.get("host"), headers.get("origin"), self.loopback)
            if reason is not None:
                console.print(f"[yellow]refused[/] {scope.get('method', 'websocket')} {scope['path']}: {reason}")
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})  # policy violation (403 before accept)
                    return
                body = (reason + "\n").encode()
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def remove_stale_workdirs(folder: str | os.PathLike | None = None) -> list[Path]:
    """Remove the folders of generated PNGs (ddpm-app-PID-*, in the temp dir) that app.py processes killed before
    their cleanup left behind: those whose PID is gone (utills.pid_alive, as for atomic_write's temporaries), and
    only this user's. A live process's folder is never touched. Returns the folders removed."""
    removed = []
    for path in Path(folder if folder is not None else tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*-*"):
        pid = path.name[len(WORKDIR_PREFIX):].partition("-")[0]
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to look at
            if (pid.isdigit() and path.is_dir() and not path.is_symlink() and path.stat().st_uid == os.getuid()
                    and not pid_alive(int(pid))):
                shutil.rmtree(path)
                removed.append(path)
    return removed


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: the app then stops as on Ctrl-C (a KeyboardInterrupt) and cleans up."""


@contextlib.contextmanager
def sigterm_stops() -> Iterator[None]:
    """In the block, SIGTERM (how services are stopped) raises Terminated in the main thread, so that the server is
    closed and the finally blocks and atexit handlers run; its default action ends the process with none of that, and
    Gradio installs no handler of its own. The exit status is then 0, as after Ctrl-C. A second SIGTERM ends the
    process at once (its folder is removed at the next start)."""

    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except Terminated:  # before the server was up (after, main's loop takes it)
        console.print("stopped (SIGTERM)")
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


# ------------------------------------------------------------------------------------------------ main

def main(cfg: AppConfig) -> None:
    """Serve the page until Ctrl-C or SIGTERM (under sigterm_stops)."""
    check_app_config(cfg)
    set_threads(cfg.threads)
    console.print(f"[bold]app[/] {dataclasses.asdict(cfg)}")
    device = pick_device(cfg.device)
    for old in remove_stale_workdirs():
        console.print(f"removed {old}, left by an app.py that was killed")
    workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-"))
    # Removed at exit: after Python has waited for the server's threads, so that no Generate is still writing there.
    atexit.register(shutil.rmtree, workdir, True)
    stopping = threading.Event()
    page, theme = build_page(cfg, device, workdir, stopping)
    from starlette.middleware import Middleware  # installed with gradio

    page.queue(default_concurrency_limit=1).launch(
        server_name=cfg.host, server_port=cfg.port, share=False, inbrowser=False, ssr_mode=False, quiet=True,
        show_error=False, footer_links=["settings"], allowed_paths=[str(workdir)], mcp_server=False, pwa=False,
        theme=theme, css=CSS, prevent_thread_lock=True, max_file_size=MAX_UPLOAD, strict_cors=True,
        num_workers=0,  # no static-file worker processes: they would serve without OriginCheck
        app_kwargs={"middleware": [Middleware(OriginCheck, loopback=is_loopback(cfg.host))]})
    # A page's open event stream (a Generate under way) would hold uvicorn's shutdown past the 5 s Blocks.close waits
    # for it, and Gradio's own cleanup (its cached copies of our PNGs) would never run: streams get 2 s.
    page.server.config.timeout_graceful_shutdown = 2
    console.print(f"[bold green]serving[/] http://{cfg.host}:{cfg.port} (Ctrl-C or SIGTERM stops)")
    try:
        while page.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
        console.print(f"stopping ({'SIGTERM' if isinstance(e, Terminated) else 'Ctrl-C'})")
    finally:
        stopping.set()
        page.close(verbose=False)
        # Blocks.close waits 5 s for the server's thread; on a loaded machine uvicorn's shutdown (2 s for open
        # streams, then Gradio's own cleanup) may need longer, and the thread is a daemon: wait for it a while more.
        page.server.thread.join(timeout=30)


def cli(argv: list[str] | None = None) -> None:
    with config.user_errors(), sigterm_stops():
        main(config.parse(AppConfig, sys.argv[1:] if argv is None else argv)[0])


if __name__ == "__main__":
    cli(sys.argv[1:])

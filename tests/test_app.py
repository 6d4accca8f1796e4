"""app.py in a real headless browser: the page loads offline, Generate shows sample.py's bytes, errors are one line.

The app runs as `python app.py --ckpt RUN --port FREE --device cpu` in a subprocess; Playwright drives Debian's
Chromium (`apt-get install -y chromium`; Playwright's own browser download is not used). Without Chromium, Playwright
or Gradio the browser tests are skipped with the reason. DDPM_CHROMIUM=PATH picks another Chromium.

A model trained with --cond-embed (a real tiny run: judge.py, embed.py, train.py --cond-embed on a copy of the test
shards) takes a reference face: the function layer against `sample.py --like`, and one browser pass (upload, pick a
face of the shards, a file that is not an image).

README screenshot: `DDPM_APP_SCREENSHOT=docs/app.png [DDPM_APP_RUN=demo/run] pytest tests/test_app.py -k generate`
saves the page after Generate (16 faces, DDIM-25 when DDPM_APP_RUN is given), by the code path of the test itself.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

import app
from tiny_run import REPO, conditional_run, one_thread_env, tiny_run

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START_TIMEOUT_S = 120  # app.py's start: torch, gradio, the model
GENERATE_TIMEOUT_MS = 120_000


def chromium() -> str | None:
    return os.environ.get("DDPM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def gradio() -> None:
    if importlib.util.find_spec("gradio") is None:
        pytest.skip("gradio is not installed (pip install -r requirements.lock, or pip install -e .[app])")


@pytest.fixture(scope="module")
def browser(gradio) -> Iterator:
    if importlib.util.find_spec("playwright") is None:
        pytest.skip("playwright is not installed (pip install -r requirements.lock)")
    path = chromium()
    if path is None:
        pytest.skip("no Chromium found (apt-get install -y chromium, or DDPM_CHROMIUM=PATH); .ci/run installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield b
        b.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def app_process(ckpt: Path, workdir: Path, *extra: str, env: dict | None = None) -> Iterator[tuple[Any, str, Path]]:
    """`python app.py --ckpt CKPT` on a free port until the block ends; yields (the process, its URL, its log) once it
    answers. env: more environment variables."""
    port = free_port()
    log = workdir / f"app-{port}.log"
    env = {**one_thread_env(), "GRADIO_TEMP_DIR": str(workdir / "gradio"), **(env or {})}
    cmd = [sys.executable, str(REPO / "app.py"), "--ckpt", str(ckpt), "--port", str(port), "--device", "cpu", *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            assert time.monotonic() < deadline, f"app.py did not answer in {START_TIMEOUT_S} s:\n{log.read_text()}"
            time.sleep(0.3)
        yield proc, url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def serving(ckpt: Path, workdir: Path, *extra: str) -> Iterator[str]:
    """`python app.py --ckpt CKPT` on a free port until the block ends; yields its URL once it answers."""
    with app_process(ckpt, workdir, *extra) as (proc, url, log):
        yield url
        assert proc.poll() is None, f"app.py died:\n{log.read_text()[-3000:]}"  # the server stays up through errors


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, shards: Path) -> Path:
    """The tests' short real training run (checkpoints at steps 2 and 4), copied, with a corrupt step 6 added: the
    newest file does not load, so the app (as sample.py) starts on step 4 and lists step 6 in its dropdown."""
    source = Path(os.environ["DDPM_APP_RUN"]) if os.environ.get("DDPM_APP_RUN") else tiny_run(tmp_path_factory, shards)
    run = tmp_path_factory.mktemp("app") / "run"
    shutil.copytree(source, run, ignore=shutil.ignore_patterns(".lock", "samples", "tensorboard", "eval"))
    newest = max(int(p.stem.split("-")[1]) for p in (run / "checkpoints").glob("step-*.pt"))
    (run / "checkpoints" / f"step-{newest + 2:08d}.pt").write_bytes(b"not a checkpoint\n" * 100)
    return run


@pytest.fixture(scope="module")
def server(run: Path, tmp_path_factory: pytest.TempPathFactory, gradio) -> Iterator[str]:
    with serving(run, tmp_path_factory.mktemp("app-server")) as url:
        yield url


# ------------------------------------------------------------------------------------------------ the page

def open_page(browser, url: str):
    """A new page on the app, loaded (the checkpoint described); page.requests collects every URL it asked for."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.requests = []
    page.on("request", lambda r: page.requests.append(r.url))
    page.goto(url)
    page.wait_for_selector("#info strong")  # the checkpoint's name, in bold, once described (or refused)
    return page


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def status(page) -> str:
    """The status line's text (not Gradio's progress overlay, "0.1s loading - 0.0%", that may still cover it)."""
    return page.inner_text("#status .status-line").strip()


def serial(page) -> str:
    """The status line's data-serial: new for every line the server sends, even one with the same words."""
    return page.get_attribute("#status .status-line", "data-serial")


def generate(page, **numbers) -> str:
    """Set the numbers, press Generate, wait for the grid (or an error line); returns the status line."""
    for elem_id, value in numbers.items():
        set_number(page, elem_id, value)
    before = serial(page)
    page.click("#generate")
    page.wait_for_function("before => document.querySelector('#status .status-line').dataset.serial !== before",
                           arg=before, timeout=GENERATE_TIMEOUT_MS)
    return status(page)


def shown_bytes(page, selector: str) -> bytes:
    """The bytes the browser gets for an <img> of the page (its src fetched through the page's own context)."""
    src = page.get_attribute(selector, "src")
    assert src and src.startswith("http://127.0.0.1:"), src
    response = page.request.get(src)
    assert response.ok, (src, response.status)
    return response.body()


def run_sample_py(tmp_path: Path, *args: str) -> Path:
    """`python sample.py ... --out grid.png --outdir faces` in a subprocess with the app's thread count."""
    cmd = [sys.executable, str(REPO / "sample.py"), *args, "--device", "cpu", "--out", str(tmp_path / "grid.png"),
           "--outdir", str(tmp_path / "faces")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=one_thread_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path


def assert_offline(page, url: str) -> None:
    """Every request the page made went to the app itself (no fonts, CDN or analytics from outside)."""
    outside = [u for u in page.requests if not (u.startswith(url) or u.startswith(("data:", "blob:")))]
    assert not outside, f"the page fetched from outside the app: {outside[:5]}"


# ------------------------------------------------------------------------------------------------ tests

def test_generate_gives_sample_py_bytes_offline(browser, server: str, run: Path, tmp_path: Path):
    shot = os.environ.get("DDPM_APP_SCREENSHOT")
    n, steps = (16, 25) if shot and os.environ.get("DDPM_APP_RUN") else (4, 5)
    page = open_page(browser, server)
    info = page.inner_text("#info")
    newest = sorted((run / "checkpoints").glob("step-*.pt"))[-2]  # the newest that loads
    assert newest.name in info and "images seen" in info and "parameters" in info and "EMA" in info, info
    assert "unconditional" in info and not page.locator("#attr-Smiling").count()
    assert not page.locator("#like-upload").is_visible() and not page.locator("#guidance").is_visible()
    assert page.locator("#loss img").count() == 1  # the run's loss curve (pictures.loss_plot)

    line = generate(page, seed=3, n=n, steps=steps)
    assert line.startswith(f"{n} faces") and "error" not in line, line
    assert f"--ckpt {newest}" in line and "--seed 3" in line, line  # the equivalent sample.py command
    ref = run_sample_py(tmp_path, "--ckpt", str(newest), "--n", str(n), "--steps", str(steps), "--seed", "3")
    assert shown_bytes(page, "#grid img") == (ref / "grid.png").read_bytes()
    faces = page.locator("#faces img")
    assert faces.count() == n
    assert shown_bytes(page, "#faces img >> nth=0") == (ref / "faces" / "000000.png").read_bytes()
    assert shown_bytes(page, f"#faces img >> nth={n - 1}") == (ref / "faces" / f"{n - 1:06d}.png").read_bytes()
    assert_offline(page, server)
    if shot:
        page.locator("#faces").scroll_into_view_if_needed()
        page.screenshot(path=shot, full_page=True)
    page.close()


def test_corrupt_checkpoint_is_one_line_and_the_server_stays_up(browser, server: str, run: Path):
    corrupt = sorted((run / "checkpoints").glob("step-*.pt"))[-1]
    page = open_page(browser, server)
    before = serial(page)
    choose(page, "ckpt", corrupt.name)
    page.wait_for_function("before => document.querySelector('#status .status-line').dataset.serial !== before",
                           arg=before)
    line = status(page)
    assert line.startswith(f"error: {corrupt}: ") and "\n" not in line, line
    line = generate(page, n=2, steps=2)  # Generate on it: the same one line, no grid
    assert line.startswith(f"error: {corrupt}") and "\n" not in line and not page.locator("#grid img").count(), line
    before = serial(page)
    choose(page, "ckpt", sorted((run / "checkpoints").glob("step-*.pt"))[-2].name)  # back to a good one: it works
    page.wait_for_function("before => document.querySelector('#status .status-line').dataset.serial !== before",
                           arg=before)
    assert "loaded" in status(page), status(page)
    line = generate(page, n=2, steps=2)
    assert line.startswith("2 faces") and page.locator("#grid img").count() == 1, line
    assert_offline(page, server)
    page.close()


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run folder with an untrained conditional `tiny` UNet (16 px, 40 attributes, T = 100) as a two-state
    checkpoint (step 1: an unnamed attribute is 0) and a three-state one (step 2, cond_free: it is free)."""
    run = tmp_path_factory.mktemp("app-cond") / "cond"
    (run / "checkpoints").mkdir(parents=True)
    for step, free in ((1, False), (2, True)):
        source = next((conditional_run(tmp_path_factory, free=free) / "checkpoints").glob("step-*.pt"))
        shutil.copy(source, run / "checkpoints" / f"step-{step:08d}.pt")
    return run


def test_conditional_model_attribute_controls(browser, cond_run: Path, tmp_path_factory: pytest.TempPathFactory,
                                              tmp_path: Path):
    from fake_celeba import ATTRIBUTES

    two_state, first = cond_run / "checkpoints" / "step-00000001.pt", cond_run / "checkpoints" / "step-00000002.pt"
    with serving(cond_run, tmp_path_factory.mktemp("app-cond-server")) as url:
        page = open_page(browser, url)
        assert first.name in page.inner_text("#info") and "conditional on 40 attributes" in page.inner_text("#info")
        for name in ATTRIBUTES:
            assert page.locator(f"#attr-{name}").count() == 1, name
        assert "the model chooses" in page.inner_text("#attr-note"), page.inner_text("#attr-note")
        page.locator("#attr-Smiling label", has_text="yes").click()
        page.locator("#attr-Male label", has_text="no").click()
        line = generate(page, seed=5, n=2, steps=3, guidance=3)
        assert "--attrs Male=0,Smiling=1" in line and "--guidance 3.0" in line, line
        ref = run_sample_py(tmp_path, "--ckpt", str(first), "--n", "2", "--steps", "3", "--seed", "5",
                            "--attrs", "Smiling=1,Male=0", "--guidance", "3")
        assert shown_bytes(page, "#grid img") == (ref / "grid.png").read_bytes()
        before = serial(page)  # the two-state checkpoint of the same run: the page says what free means there
        choose(page, "ckpt", two_state.name)
        page.wait_for_function("b => document.querySelector('#status .status-line').dataset.serial !== b", arg=before)
        assert "free means no" in page.inner_text("#attr-note"), page.inner_text("#attr-note")
        assert two_state.name in page.inner_text("#info")
        assert_offline(page, url)
        page.close()


# ------------------------------------------------------------------------------------------------ without a browser

# ------------------------------------------------------------------------------------------------ reference faces

@pytest.fixture(scope="module")
def embed_run(tmp_path_factory: pytest.TempPathFactory, shards: Path) -> Path:
    """A real --cond-embed run (one checkpoint, step 2) on a copy of the test shards with the attribute judge's
    embeddings (judge.py, embed.py --encoder judge, train.py --cond-embed: about 10 s on one thread)."""
    root = tmp_path_factory.mktemp("app-embed")
    data, run = root / "shards", root / "run"
    shutil.copytree(shards, data)
    for script, *args in (("judge.py", "--data", data, "--epochs", "1", "--device", "cpu"),
                          ("embed.py", "--data", data, "--encoder", "judge", "--device", "cpu"),
                          ("train.py", "--data", data, "--out", run, "--preset", "tiny", "--cond-embed", "--steps",
                           "2", "--batch-size", "4", "--device", "cpu", "--loader", "torch", "--warmup", "1",
                           "--ckpt-every", "2", "--sample-every", "0")):
        proc = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=root, capture_output=True,
                              text=True, timeout=300, env=one_thread_env())
        assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return run


@pytest.fixture(scope="module")
def face(celeba_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A face file as a user has one: an aligned CelebA-layout JPEG (178 x 218), named face.jpg."""
    path = tmp_path_factory.mktemp("app-face") / "face.jpg"
    shutil.copy(next(iter(sorted((celeba_src / "img_align_celeba").glob("*.jpg")))), path)
    return path


LIKE = {"ema": True, "sampler": "ddim", "steps": 3, "spacing": "auto", "eta": 0.0, "seed": 1, "n": 2,
        "precision": "fp32", "trajectory": False, "guidance": 2.0, "attrs": ""}


def first_tile(grid: Path, n: int, size: int) -> Any:
    """The first picture of a grid of rows of n + 1 (a reference, then n faces), right of its label margin."""
    import numpy as np
    from PIL import Image

    picture = np.asarray(Image.open(grid).convert("RGB"))
    x = picture.shape[1] - ((n + 1) * (size + 2) + 2) + 2
    return picture[2:2 + size, x:x + size]


def test_reference_face_generate_matches_sample_py(embed_run: Path, face: Path, tmp_path: Path):
    """For a --cond-embed model, Generate with an uploaded face or a sample key of the shards draws the reference
    first in its row, as prepared by embed.py (the bytes of sample.py --like / --like-key); the encoder loads once;
    a file that is not an image is one line; without a reference the model samples unconditionally."""
    import dataclasses

    import torch

    import embed
    from grids import to_uint8

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the sample.py subprocess (OMP_NUM_THREADS=1): the same float rounding
    try:
        ckpt = str(next((embed_run / "checkpoints").glob("step-*.pt")))
        current, work = app.CurrentModel(torch.device("cpu")), tmp_path / "work"
        work.mkdir()
        cfg = app.AppConfig(ckpt=ckpt)
        loaded = current.get(ckpt, True)
        record = loaded.embedding
        assert loaded.embed_dim > 0 and "reference face" in app.describe(loaded)
        picks, where = app.reference_picker(loaded, work)  # the valid split's 20 faces (fewer than REFERENCE_FACES)
        assert len(picks) == 20 and "valid split" in where and all(Path(p).is_file() for p, _ in picks), where
        key = picks[3][1]

        grid, faces, _, line = app.generate(current, cfg, work, {**LIKE, "ckpt": ckpt, "like_file": str(face)})
        assert line.startswith("2 faces like face, ") and f"--like {face}" in line, line
        prepared = to_uint8(embed.prepare_reference(face, record["shards"])[None])[0]
        assert (first_tile(grid, 2, loaded.image_size) == prepared).all()
        encoder = current.reference_encoder
        assert encoder is not None and len(faces) == 2

        grid, _, _, line = app.generate(current, cfg, work, {**LIKE, "ckpt": ckpt, "like_key": key})
        assert line.startswith(f"2 faces like {key}, ") and f"--like-key {key}" in line, line
        image, split, _ = embed.shard_image(record["data"], key)
        assert split == "valid" and (first_tile(grid, 2, loaded.image_size) == to_uint8(image[None])[0]).all()
        assert current.reference_encoder is encoder  # loaded once, kept

        # Both: one row each, the file first: the bytes sample.py writes for --like FILE --like-key KEY.
        grid, faces, _, line = app.generate(current, cfg, work,
                                            {**LIKE, "ckpt": ckpt, "like_file": str(face), "like_key": key})
        ref = run_sample_py(tmp_path, "--ckpt", ckpt, "--n", "2", "--steps", "3", "--seed", "1", "--guidance", "2",
                            "--like", str(face), "--like-key", key)
        assert grid.read_bytes() == (ref / "grid.png").read_bytes()
        assert faces[0].read_bytes() == (ref / "faces" / "000000.png").read_bytes()  # image 0: like the file

        bad = tmp_path / "not-a-face.png"
        bad.write_text("this is not an image\n")
        with pytest.raises(app.AppError) as e:
            app.generate(current, cfg, work, {**LIKE, "ckpt": ckpt, "like_file": str(bad)})
        assert app.page_line(e.value) == "reference face not-a-face.png: cannot read it as an image (cannot identify " \
                                         "image file)", app.page_line(e.value)
        with pytest.raises(app.AppError, match="no such reference image"):
            app.generate(current, cfg, work, {**LIKE, "ckpt": ckpt, "like_file": str(tmp_path / "gone.jpg")})

        grid, _, _, line = app.generate(current, cfg, work, {**LIKE, "ckpt": ckpt})  # no reference: as before
        assert line.startswith("2 faces, ") and "--like" not in line, line
        from PIL import Image

        assert Image.open(grid).size == (2 * (loaded.image_size + 2) + 2, loaded.image_size + 4)  # no label margin

        # The run's shards elsewhere: nothing to pick (the page says why), a key is one line, an upload still works.
        moved = dataclasses.replace(loaded, embedding={**record, "data": str(tmp_path / "elsewhere")})
        assert app.reference_picker(moved, work) == ([], app.reference_picker(moved, work)[1])
        assert "not on this machine" in app.reference_picker(moved, work)[1]
        with pytest.raises(app.AppError, match=f"reference key {key}: the run's shards folder .* is not here"):
            app.reference_faces(current, moved, [], [key])
        assert app.reference_faces(current, moved, [str(face)], []).labels == ["face"]
        plain = dataclasses.replace(loaded, model_config={**loaded.model_config, "embed_dim": 0}, embedding=None)
        with pytest.raises(app.AppError, match="not trained with --cond-embed"):
            app.reference_faces(current, plain, [str(face)], [])
        assert app.reference_picker(plain, work) == ([], "") and app.reference_note(plain, "") == ""
    finally:
        torch.set_num_threads(threads)


def test_reference_face_in_the_browser(browser, embed_run: Path, face: Path, tmp_path_factory: pytest.TempPathFactory,
                                       tmp_path: Path):
    """The page of a --cond-embed model: the reference section and the guidance scale are shown, an uploaded face
    gives the grid app.generate (hence sample.py --like) makes, a clicked face of the shards fills its key and clears
    the upload, and a file that is not an image is the one line, at upload and at Generate."""
    import torch
    ckpt = next((embed_run / "checkpoints").glob("step-*.pt"))
    with serving(embed_run, tmp_path_factory.mktemp("app-embed-server")) as url:
        page = open_page(browser, url)
        assert "reference face" in page.inner_text("#info") and page.locator("#guidance").is_visible()
        assert "--cond-embed" in page.inner_text("#like-note") and page.locator("#like-faces img").count() == 20

        before = serial(page)
        page.set_input_files("#like-upload input[type=file]", str(face))
        page.wait_for_function("b => document.querySelector('#status .status-line').dataset.serial !== b", arg=before)
        assert status(page) == "reference face face.jpg: Generate makes faces like it", status(page)
        line = generate(page, seed=1, n=2, steps=3, guidance=2)
        assert line.startswith("2 faces like face, ") and "--like " in line, line
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the app (OMP_NUM_THREADS=1)
        try:
            work = tmp_path / "work"
            work.mkdir()
            grid, *_ = app.generate(app.CurrentModel(torch.device("cpu")), app.AppConfig(ckpt=str(ckpt)), work,
                                    {**LIKE, "ckpt": str(ckpt), "like_file": str(face)})
        finally:
            torch.set_num_threads(threads)
        assert shown_bytes(page, "#grid img") == grid.read_bytes()

        before = serial(page)
        page.locator("#like-faces .thumbnail-item").nth(3).click()
        page.wait_for_function("b => document.querySelector('#status .status-line').dataset.serial !== b", arg=before)
        key = page.input_value("#like-key textarea, #like-key input")
        assert key and status(page) == f"reference key {key}: Generate makes faces like it", status(page)
        assert not page.locator("#like-upload img").count()  # the upload is cleared: one reference
        line = generate(page, n=2, steps=3)
        assert line.startswith(f"2 faces like {key}, ") and f"--like-key {key}" in line, line

        bad = tmp_path / "not-a-face.png"
        bad.write_text("this is not an image\n")
        before = serial(page)
        page.set_input_files("#like-upload input[type=file]", str(bad))
        page.wait_for_function("b => document.querySelector('#status .status-line').dataset.serial !== b", arg=before)
        message = "error: reference face not-a-face.png: cannot read it as an image (cannot identify image file)"
        assert status(page) == message and not page.input_value("#like-key textarea, #like-key input")
        assert generate(page) == message
        assert_offline(page, url)
        page.close()


def test_attrs_spec_and_sample_command():
    assert app.attrs_spec(["A", "B", "C"], ["yes", "free", "no"]) == "A=1,C=0"
    assert app.attrs_spec(["A", "B"], ["free", "free"]) == ""
    cmd = app.sample_command(app.SampleConfig(ckpt="r/checkpoints/step-00000004.pt", n=4, steps=5, seed=3,
                                              attrs="A=1,C=0", ema=False))
    assert cmd == ("python sample.py --ckpt r/checkpoints/step-00000004.pt --n 4 --steps 5 --seed 3 --no-ema "
                   "--attrs A=1,C=0 --out grid.png")


def test_dropdown_lists_post_hoc_ema_reconstructions(run: Path, tmp_path: Path):
    """Averages reconstructed by ema.py (RUN/phema/phema-*.pt) are in the checkpoint dropdown after the run's
    checkpoints, newest step first, and the page says what they are."""
    import shutil

    import ema
    from utills import load_checkpoint, load_model

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ckpt = load_checkpoint(copy / "checkpoints" / "step-00000004.pt")
    model = load_model(copy / "checkpoints" / "step-00000004.pt").model
    phema = ema.PowerEMA(model, [0.05, 0.10])
    meta = {k: ckpt[k] for k in ("model_config", "diffusion_config", "image_size", "attributes", "config")}
    for step in (2, 4):
        phema.update(step * 4, 4)
        phema.write_snapshots(copy / "phema" / "snapshots", model, step=step, batch_size=4, meta=meta)
    ema.reconstruct(copy, [0.08], step=2, log=lambda *a: None)
    ema.reconstruct(copy, [0.08, 0.12], log=lambda *a: None)
    names = [label for label, _ in app.checkpoint_choices(copy)]
    assert names[-3:] == ["phema/phema-0.0800-step-00000004.pt", "phema/phema-0.1200-step-00000004.pt",
                          "phema/phema-0.0800-step-00000002.pt"], names
    assert "step-00000004.pt" in names[:3] and not any("snapshot" in n for n in names)
    path = dict(app.checkpoint_choices(copy))["phema/phema-0.0800-step-00000004.pt"]
    assert app.run_folder(Path(path)) == copy
    page = app.describe(load_model(path))
    assert "post-hoc EMA, sigma_rel 0.08" in page and "step **4**" in page


def test_cli_errors_are_one_line(tmp_path: Path):
    cases = [(["--ckpt", str(tmp_path / "nope")], "no such checkpoint file or run folder"),
             (["--ckpt", str(tmp_path), "--port", "0"], "--port 0: must be in 1..65535"),
             (["--ckpt", str(tmp_path), "--device", "tpu"], "--device must be auto, cuda, cuda:N or cpu")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            app.cli(argv)
        assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value)


def test_gradio_is_imported_by_app_only():
    code = "import sys, sample, train, evaluate, app; assert 'gradio' not in sys.modules, 'gradio imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env=one_thread_env())
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ the server

def request(url: str, path: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, str]:
    """(status, body) of a GET (or a POST of data) to the app, with these headers."""
    req = urllib.request.Request(url + path, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def multipart(filename: str, content: bytes) -> tuple[bytes, dict]:
    """A multipart/form-data body with one file in the field "files" (Gradio's upload route) and its header."""
    boundary = "ddpm-test-boundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    body = head + content + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_request_refusal_rules():
    own = "127.0.0.1:7860"
    for host, origin in [(own, None), (own, "http://127.0.0.1:7860"), ("localhost:7860", "http://localhost:7860"),
                         ("[::1]:7860", "http://[::1]:7860"), ("127.0.0.2:80", None)]:
        assert app.request_refusal(host, origin, loopback=True) is None, (host, origin)
    for host, origin, words in [
        (own, "http://evil.example", "Origin 'http://evil.example': requests from pages of other sites are refused"),
        (own, "null", "Origin 'null'"),  # a sandboxed frame or a file:// page
        (own, "http://127.0.0.1:8000", "Origin 'http://127.0.0.1:8000'"),  # another port is another site
        ("evil.example:7860", "http://evil.example:7860", "Host 'evil.example:7860': this app answers to 127.0.0.1"),
        ("[::1", None, "Host '[::1'"),
        (None, None, "Host None"),
    ]:
        assert app.request_refusal(host, origin, loopback=True).startswith(words), (host, origin)
    # --host 0.0.0.0: any host name reaches it; the Origin must still be the app's own address.
    assert app.request_refusal("192.168.1.5:7860", "http://192.168.1.5:7860", loopback=False) is None
    assert app.request_refusal("192.168.1.5:7860", "http://evil.example", loopback=False).startswith("Origin ")
    assert [app.is_loopback(h) for h in ("localhost", "127.0.0.1", "::1", "0.0.0.0", "example.org", None)] == \
        [True, True, True, False, False, False]


def test_requests_from_other_sites_are_refused(server: str):
    """Gradio alone only withholds the CORS header from another origin (the upload or the queue join still runs);
    app.py's OriginCheck answers 403 before any of Gradio's code."""
    port = urllib.parse.urlsplit(server).port
    body, headers = multipart("from-elsewhere.bin", b"x" * 100)
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{port + 1}"):
        status, text = request(server, "gradio_api/upload", body, {**headers, "Origin": origin})
        assert status == 403 and text.strip() == f"Origin {origin!r}: requests from pages of other sites are refused", \
            (status, text)
    status, text = request(server, "gradio_api/queue/join", b"{}", {"Content-Type": "application/json",
                                                                    "Origin": "http://evil.example"})
    assert status == 403, (status, text)
    # DNS rebinding: another site's name resolved to 127.0.0.1, its page same-origin with itself.
    rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
    for path, data in (("", None), ("config", None), ("gradio_api/upload", body)):
        status, text = request(server, path, data, {**headers, **rebound} if data else rebound)
        assert status == 403 and text.startswith(f"Host 'evil.example:{port}'"), (path, status, text)
    # The app's own page: its address as Origin and Host.
    status, text = request(server, "config", headers={"Origin": f"http://127.0.0.1:{port}"})
    assert status == 200 and '"version"' in text, (status, text[:200])
    status, text = request(server, "config", headers={"Host": f"localhost:{port}"})
    assert status == 200, (status, text[:200])


def test_uploads_are_capped(server: str):
    """Gradio's upload route (the page takes a reference face there) is capped by max_file_size at 16 MB."""
    body, headers = multipart("small.bin", b"x" * 1000)
    status, text = request(server, "gradio_api/upload", body, headers)
    assert status == 200 and "small.bin" in text, (status, text)  # the route is there: the cap is what refuses
    body, headers = multipart("big.bin", b"x" * 17_000_000)
    status, text = request(server, "gradio_api/upload", body, headers)
    assert status == 413 and "maximum allowed size" in text, (status, text)


def test_stale_workdirs_of_dead_processes_are_removed(tmp_path: Path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        folders = {name: tmp_path / f"{app.WORKDIR_PREFIX}{name}" for name in
                   (f"{dead.pid}-abc123", f"{os.getpid()}-def456", f"{sleeper.pid}-ghi789", "old")}
        for folder in folders.values():
            (folder / "x").mkdir(parents=True)
            (folder / "x" / "face.png").write_bytes(b"png")
        (tmp_path / f"{app.WORKDIR_PREFIX}{dead.pid}-file").write_text("not a folder of ours")
        assert app.remove_stale_workdirs(tmp_path) == [folders[f"{dead.pid}-abc123"]]
        assert not folders[f"{dead.pid}-abc123"].exists()
        for name in (f"{os.getpid()}-def456", f"{sleeper.pid}-ghi789", "old"):  # live processes', and no pid: kept
            assert (folders[name] / "x" / "face.png").is_file(), name
        assert (tmp_path / f"{app.WORKDIR_PREFIX}{dead.pid}-file").is_file()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_sigterm_stops_the_app_and_removes_its_pngs(browser, run: Path, tmp_path: Path):
    """SIGTERM (how services are stopped) takes the path of Ctrl-C: a Generate under way is abandoned, the server
    closes (Gradio deletes its cached copies), the folder of generated PNGs goes, and the exit status is 0. At start,
    the folder of an app.py that was killed (its pid gone) is removed, a live process's kept."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = temp / f"{app.WORKDIR_PREFIX}{dead.pid}-stale000"
    live = temp / f"{app.WORKDIR_PREFIX}{os.getpid()}-live0000"  # this test's own pid: alive
    for folder in (stale, live):
        folder.mkdir()
        (folder / "grid.png").write_bytes(b"png")
    with app_process(run, tmp_path, env={"TMPDIR": str(temp)}) as (proc, url, log):
        assert not stale.exists() and (live / "grid.png").is_file()
        (workdir,) = temp.glob(f"{app.WORKDIR_PREFIX}{proc.pid}-*")
        page = open_page(browser, url)
        line = generate(page, n=2, steps=2)
        assert line.startswith("2 faces"), line
        assert list(workdir.rglob("*.png")), "no PNG in the app's folder after Generate"
        assert list((tmp_path / "gradio").rglob("*.png")), "no PNG in Gradio's cache after Generate"
        # A long Generate, under way when SIGTERM comes.
        set_number(page, "steps", 1000)
        page.click("#generate")
        deadline = time.monotonic() + GENERATE_TIMEOUT_MS / 1000
        while log.read_text().count("generate {") < 2:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=120)
        text = log.read_text()
        page.close()
    assert status == 0, f"exit status {status}:\n{text[-3000:]}"
    assert "stopping (SIGTERM)" in text and "this Generate was abandoned" in text, text[-3000:]
    assert not workdir.exists(), (sorted(p.name for p in workdir.rglob("*")), text[-3000:])
    left = list((tmp_path / "gradio").rglob("*.png"))  # Gradio's copies too: its shutdown ran
    assert not left, (left, text[-3000:])
    assert (live / "grid.png").is_file()

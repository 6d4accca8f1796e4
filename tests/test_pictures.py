"""pictures.py on a short real `tiny` run and the 32 px shards: progress GIF, loss curve, noising strip, the CLI."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pictures
import sample
from pictures import PicturesConfig, PicturesError
from tiny_run import REPO, one_thread_env, tiny_run

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, shards: Path) -> Path:
    return tiny_run(tmp_path_factory, shards)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / name), *args], cwd=cwd, capture_output=True, text=True,
                          env=one_thread_env())


def test_progress_gif_and_loss_plot(run: Path, tmp_path: Path):
    copy = shutil.copytree(run, tmp_path / "run")  # the shared run stays untouched
    assert pictures.main(PicturesConfig(progress_gif=str(copy))) == [copy / "progress.gif", copy / "loss.png"]
    with Image.open(copy / "progress.gif") as gif:
        assert gif.n_frames == len(list((run / "samples").glob("*.png"))) == 2
        grid = pixels(run / "samples" / "step-00000002.png")
        assert gif.size == (grid.shape[1], grid.shape[0] + 16)  # + the label band
    with Image.open(copy / "loss.png") as png:
        assert png.format == "PNG" and png.width > 300
    # A run with metrics but no sample grids still gets its loss curve; one with neither is an error.
    shutil.rmtree(copy / "samples")
    (copy / "loss.png").unlink()
    assert pictures.run_pictures(copy) == [copy / "loss.png"]
    (copy / "metrics.jsonl").unlink()
    with pytest.raises(PicturesError, match="nothing to draw"):
        pictures.run_pictures(copy)


def test_loss_plot_needs_finite_losses(tmp_path: Path):
    with pytest.raises(PicturesError, match="no such metrics file"):  # not read as an empty log
        pictures.loss_plot(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": NaN}\n{"step": 2}\n')
    with pytest.raises(PicturesError, match="no records with a finite loss"):
        pictures.loss_plot(tmp_path)


def test_smooth_is_a_debiased_average():
    np.testing.assert_allclose(pictures.smooth(np.full(50, 3.0)), 3.0)  # no warm-up bias towards 0
    out = pictures.smooth(np.array([0.0, 1.0]), weight=0.5)
    np.testing.assert_allclose(out, [0.0, 1 / 1.5])


def test_sample_py_progress_gif_is_forwarded(run: Path, tmp_path: Path):
    # The old command line, in both spellings, writes what pictures.py writes, byte for byte (the copies share their
    # folder name: the loss plot's title shows it).
    old, old_eq, new = (shutil.copytree(run, tmp_path / name / "run") for name in ("old", "old_eq", "new"))
    for name, args in (("sample.py", ["--progress-gif", str(old)]), ("sample.py", [f"--progress-gif={old_eq}"]),
                       ("pictures.py", ["--progress-gif", str(new)])):
        proc = script(name, *args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
    for made in ("progress.gif", "loss.png"):
        assert (old / made).read_bytes() == (old_eq / made).read_bytes() == (new / made).read_bytes(), made


def test_cli_errors_are_one_line(tmp_path: Path):
    cases = [
        (pictures.cli, ["--progress-gif", str(tmp_path / "nope")], "no such run folder"),
        (sample.cli, ["--progress-gif", str(tmp_path / "nope")], "no such run folder"),  # through the forward
        (pictures.cli, [], "nothing asked for"),
        (pictures.cli, ["--noising", str(tmp_path), "--seed", "-1"], "--seed -1: must be >= 0"),
    ]
    for cli, argv, message in cases:
        with pytest.raises(SystemExit) as e:
            cli(argv)
        assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value)


def test_noising_strip_follows_q_sample(shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "noising.png"
    pictures.main(PicturesConfig(noising=str(shards), out=str(out), seed=3))
    picture = np.asarray(Image.open(out)).astype(np.float64)
    s, cols = 32, len(pictures.NOISING_STEPS)
    assert picture.shape == (4 * (s + 2) + 2, cols * (s + 2) + 2, 3)
    tile = lambda r, c: picture[2 + r * (s + 2):2 + r * (s + 2) + s, 2 + c * (s + 2):2 + c * (s + 2) + s]  # noqa: E731
    # t = 0 is the face itself (alpha_bar_0 = 1 - 1e-4); by t = 999 only noise is left, uncorrelated with the face.
    face = tile(0, 0)
    first = np.corrcoef(face.ravel(), tile(0, 1).ravel())[0, 1]
    last = np.corrcoef(face.ravel(), tile(0, cols - 1).ravel())[0, 1]
    assert first > 0.9 and abs(last) < 0.2
    # The strip draws the forward process only: a checkpoint is refused, through the old command line too.
    with pytest.raises(SystemExit) as e:
        sample.cli(["--noising", str(shards), "--ckpt", "x", "--out", str(out)])
    assert e.value.code == 2 and "unrecognized arguments: --ckpt x" in capsys.readouterr().err  # argparse's exit


def test_cli_noising(shards: Path, tmp_path: Path):
    proc = script("pictures.py", "--noising", str(shards), "--out", "noising.png", "--seed", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote noising.png" in proc.stderr
    pictures.noising_strip(shards, tmp_path / "same.png", seed=0)
    assert (tmp_path / "noising.png").read_bytes() == (tmp_path / "same.png").read_bytes()


def test_loss_plot_draws_the_training_fid(tmp_path: Path):
    """FID records (train.py --eval-every) add a curve on a second axis; the plot is made either way."""
    import matplotlib.pyplot as plt
    lines = [{"step": i, "loss": 1.0 / i, "lr": 1e-3} for i in range(1, 21)]
    lines[9]["fid"], lines[19]["fid"] = 300.0, 120.0
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    made: list = []
    real = plt.Figure.savefig
    with pytest.MonkeyPatch.context() as m:
        m.setattr(plt.Figure, "savefig", lambda fig, *a, **k: (made.append(fig), real(fig, *a, **k))[1])
        path = pictures.loss_plot(tmp_path)
    assert path.is_file() and path.stat().st_size > 0
    fid_axes = [ax for ax in made[0].axes if ax.get_ylabel() == "FID"]
    assert len(fid_axes) == 1 and list(fid_axes[0].lines[0].get_ydata()) == [300.0, 120.0]

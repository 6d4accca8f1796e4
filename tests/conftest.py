"""Session fixtures shared by every test file: a fake CelebA and its shards, built once per test session.

    celeba_src  Path: a clean fake CelebA in the official layout, 203 images (163 train, 20 valid, 20 test)
    shards      Path: prepare_shards output of celeba_src at --size 32 --format jpg --split all
                --samples-per-shard 64 (several shards per split)
    shards64    Path: the same at --size 64
Treat them as read-only: they are shared by all tests of the session.

    one_thread  module-scoped: torch on one intra-op thread for the module, restored afterwards. Small tensors gain
                nothing from more, a second thread idle-spinning on a shared 2-core CPU slows every op many times,
                and CPU results are bit-identical only between runs with the same thread count (the subprocesses
                the tests start run with OMP_NUM_THREADS=1). Use: `pytestmark = pytest.mark.usefixtures("one_thread")`.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

CELEBA_COUNT = 203  # odd on purpose: the last shard of each split is partly filled
SAMPLES_PER_SHARD = 64


@pytest.fixture(scope="session")
def celeba_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fake_celeba import make_fake_celeba

    return make_fake_celeba(tmp_path_factory.mktemp("celeba_src") / "celeba", CELEBA_COUNT, seed=0,
                            layout="official")


def _shard(src: Path, out: Path, size: int) -> Path:
    from prepare_shards import PrepareConfig, prepare

    # One in-process worker: 203 small images take well under a second, and no processes are forked under pytest.
    prepare(PrepareConfig(src=str(src), out=str(out), size=size, format="jpg", split="all",
                          samples_per_shard=SAMPLES_PER_SHARD, workers=1))
    return out


@pytest.fixture(scope="session")
def shards(celeba_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _shard(celeba_src, tmp_path_factory.mktemp("shards") / "shards32", 32)


@pytest.fixture(scope="session")
def shards64(celeba_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _shard(celeba_src, tmp_path_factory.mktemp("shards64") / "shards64", 64)


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """If the interpreter then hangs on its way out (a child process or thread something forgot to stop), print every
    thread's stack and exit 1 after $DDPM_TEST_EXIT_GRACE_S seconds (120), rather than hold CI until its time limit
    with nothing to show. Not in pytest-xdist's workers: a worker unconfigures when its last file is done, then
    serves its controller until the other worker is done too, minutes later; the controller's own guard covers the
    end of the run, and a worker left over is the controller's child."""
    import faulthandler
    import os
    import sys

    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    faulthandler.dump_traceback_later(float(os.environ.get("DDPM_TEST_EXIT_GRACE_S", 120)), exit=True,
                                      file=sys.__stderr__)

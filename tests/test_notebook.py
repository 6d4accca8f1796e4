"""ddpm_test.ipynb: committed without outputs, and executes headless from a scratch folder without an error."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# The notebook's runner is a test dependency only; a machine without it (the GPU check's) skips this file.
nbformat = pytest.importorskip("nbformat")
NotebookClient = pytest.importorskip("nbclient").NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "ddpm_test.ipynb"
KERNEL = "ddpm-test-venv"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"cell {cell.get('id')} has outputs"


def kernel_spec(root: Path, workdir: Path) -> Path:
    """A kernel spec that runs this interpreter (the project's .venv in CI) with the repo importable."""
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ddpm test (this interpreter)",
        "language": "python",
        "env": {"DDPM_REPO": str(REPO), "PYTHONPATH": str(REPO), "IPYTHONDIR": str(workdir / ".ipython"),
                "MPLBACKEND": "module://matplotlib_inline.backend_inline"},
    }))
    return root


def test_notebook_runs_headless(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_spec(tmp_path / "jupyter", workdir)))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name=KERNEL, resources={"metadata": {"path": str(workdir)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images >= 5  # batch, noising strip, samples, trajectory, loss curve (+ the GIF)
    out = workdir / "ddpm_test_work"
    assert (out / "shards32" / "manifest.json").is_file()
    assert [p.name for p in (out / "run" / "checkpoints").glob("step-*.pt")]
    for name in ("trajectory.png", "run/progress.gif", "run/loss.png"):
        assert (out / name).stat().st_size > 0, name

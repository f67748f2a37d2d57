"""The analysis notebooks execute top to bottom, in the venv's kernel, and their checks hold.

Each notebook asserts its own properties in its cells (notebook 01: every Gaussian latent reaches
the linear closed form sqrt(sum of the D-k smallest eigenvalues) within 15 % under distributional
fitting, paired fitting gives the other closed forms, the floor grows with dimension; notebook 02:
the DAE's encoder is untouched by stage 2, shared floors, D_c falls with capacity; notebook 03:
the metric object's logged distance is sample_distance's on the same rows, to the last bit, and
falls as the autoencoder trains). Notebooks are
executed in memory with LATENTDIST_NB_SMALL=1 and never written back.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ALL = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))


def _execute(name: str, tmp_path: Path, monkeypatch) -> nbformat.NotebookNode:
    monkeypatch.setenv("LATENTDIST_NB_SMALL", "1")
    monkeypatch.setenv("LATENTDIST_NB_OUT", str(tmp_path / "runs"))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # the kernel must be this interpreter (the venv), not whatever `python` is first on PATH
    probe = nbformat.v4.new_code_cell(
        f"import sys\nassert sys.prefix == {sys.prefix!r}, (sys.prefix, sys.executable)"
    )
    nb.cells.insert(0, probe)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=600,
        resources={"metadata": {"path": str(tmp_path)}},  # cwd: nothing lands in the repo
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error or failed assert
    return nb


def _stdout(nb) -> str:
    return "".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "stream"
    )


def _images(nb) -> int:
    return sum(
        "image/png" in o.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )


@pytest.mark.parametrize("name", ALL)
def test_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{name}: clear the outputs before committing"
            )


def test_linear_gaussian_notebook(tmp_path, monkeypatch):
    before = (NOTEBOOKS / "01_linear_gaussian.ipynb").read_bytes()
    nb = _execute("01_linear_gaussian.ipynb", tmp_path, monkeypatch)
    out = _stdout(nb)
    assert "all within 15% of their closed forms" in out
    assert "closed form inf_g W2 = 1.4142" in out  # sqrt(1 + 1)
    assert _images(nb) >= 3
    assert (NOTEBOOKS / "01_linear_gaussian.ipynb").read_bytes() == before


def test_dae_vs_joint_notebook(tmp_path, monkeypatch):
    before = (NOTEBOOKS / "02_dae_vs_joint.ipynb").read_bytes()
    nb = _execute("02_dae_vs_joint.ipynb", tmp_path, monkeypatch)
    out = _stdout(nb)
    for mode in ("dae", "joint"):
        assert (tmp_path / "runs" / mode / "encoder.pt").is_file()
        assert f"{mode:5s}: D_c from" in out
    assert _images(nb) >= 1
    assert (NOTEBOOKS / "02_dae_vs_joint.ipynb").read_bytes() == before


def test_metric_in_training_loop_notebook(tmp_path, monkeypatch):
    before = (NOTEBOOKS / "03_metric_in_training_loop.ipynb").read_bytes()
    nb = _execute("03_metric_in_training_loop.ipynb", tmp_path, monkeypatch)
    out = _stdout(nb)
    assert "metric object == sample_distance on the same rows" in out
    assert "distance fell from" in out
    assert out.count("spectrum_kl") >= 3  # a line per log point after step 0
    assert _images(nb) >= 1
    assert (NOTEBOOKS / "03_metric_in_training_loop.ipynb").read_bytes() == before

"""The teaching notebooks: committed stripped, and each runs top to bottom and draws a figure.

Each notebook is executed in memory with nbclient (kernel ``python3``, working directory
``notebooks/``) on the tiny environment it uses by default, with ``DRRL_CACHE_DIR`` pointing at
a temporary folder shared by the notebooks of this module; nothing is written back to the
committed files.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = (
    "01_environment_tour",
    "02_honest_flops",
    "03_train_and_compare",
    "04_transformer_policy",
    "05_budgets",
    "06_adaptivity",
)
CELL_TIMEOUT_S = 600


def _code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_the_notebooks_are_there():
    assert tuple(path.stem for path in NOTEBOOKS) == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_committed_notebook_is_stripped_and_tiny_by_default(path: Path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    for cell in _code_cells(notebook):
        assert cell.outputs == [] and cell.execution_count is None, "strip the outputs"
    first = _code_cells(notebook)[0].source
    assert "torch.set_num_threads(1)" in first
    assert re.search(r'^ENV_ID = "DRRL-Tiny(-\w+)*-v0"', first, re.MULTILINE), (
        "one variable: ENV_ID"
    )


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("notebook-cache")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_and_draws(path: Path, cache_dir: Path, monkeypatch):
    monkeypatch.setenv("DRRL_CACHE_DIR", str(cache_dir))  # the kernel inherits os.environ
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()  # raises CellExecutionError at the first failing cell
    images = [
        output
        for cell in _code_cells(notebook)
        for output in cell.outputs
        if output.output_type == "display_data" and "image/png" in output.get("data", {})
    ]
    assert images, f"{path.name} displayed no image"

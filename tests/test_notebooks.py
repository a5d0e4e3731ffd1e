"""Every notebook in notebooks/ runs top to bottom in smoke mode, and is committed without outputs.

Each notebook reads ``SMOKE`` from ``$PYRO_AEVB_SMOKE`` (or ``$CI``) in its parameter cell and then uses tiny
budgets. It runs here through ``nbclient`` in a real ``python3`` kernel, with the working directory a
temporary folder (the notebooks write their run directories under ``./runs``). A notebook that is not in
:data:`NOTEBOOKS` fails the listing test, so a new notebook cannot escape CI.
"""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"

#: Every notebook, in reading order. Add new ones here.
NOTEBOOKS = [
    "01_quickstart.ipynb",
    "02_estimators.ipynb",
    "03_priors.ipynb",
    "04_posterior_diagnostics.ipynb",
    "05_manifolds.ipynb",
    "06_diffusion.ipynb",
]


def test_every_notebook_is_listed():
    found = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
    assert found == sorted(NOTEBOOKS), (
        f"notebooks/ and tests/test_notebooks.py NOTEBOOKS differ: unlisted {sorted(set(found) - set(NOTEBOOKS))}, "
        f"missing {sorted(set(NOTEBOOKS) - set(found))}")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.outputs or cell.execution_count is not None or "execution" in cell.metadata)]
    assert not dirty, f"{name}: cells {dirty} carry outputs or execution counts; run notebooks/strip_outputs.py"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_opens_and_closes_with_prose_and_has_a_smoke_switch(name):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "open with a title cell"
    assert nb.cells[-1].cell_type == "markdown" and "take from this" in nb.cells[-1].source, \
        "end with a 'What to take from this' cell"
    parameters = nb.cells[1]
    assert parameters.cell_type == "code"
    assert 'SMOKE = bool(os.environ.get("CI") or os.environ.get("PYRO_AEVB_SMOKE"))' in parameters.source


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_runs_in_smoke_mode(name, tmp_path, monkeypatch, shared_data):
    from nbclient import NotebookClient

    monkeypatch.setenv("PYRO_AEVB_SMOKE", "1")
    monkeypatch.setenv("PYRO_AEVB_DATA", str(shared_data))  # Frey Face (05) reads the shared data
    # Tiny models: one intra-op thread. On a shared 2-core runner, torch's default thread pool waits on
    # busy cores and a training step of the smoke networks was measured ~100x slower with 2 threads than 1.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    started = time.perf_counter()
    try:
        client.execute()  # raises CellExecutionError, with the cell's traceback, on any error
    finally:
        nbformat.write(nb, tmp_path / name)  # the executed notebook, to look at after a failure
    print(f"\n{name}: {time.perf_counter() - started:.1f} s in smoke mode")
    assert (tmp_path / "runs").is_dir(), "the notebook should write its runs under its working directory"

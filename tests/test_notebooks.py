"""The Colab notebooks run top to bottom, headless, in quick mode (DINO_JAX_QUICK=1): any cell error fails.

The three notebooks share one demo run, as they do in a Colab session: train_demo.ipynb trains it into
DINO_JAX_WORKDIR (a temporary folder) and the other two reuse it. Each of them also trains the run itself when it is
missing, so any one of them can be run alone (`pytest -k attention_maps`), just more slowly.

Executed copies (with outputs, figures included) are written to pytest's temporary folder, never into the repo;
set DINO_JAX_NOTEBOOK_OUT=DIR to keep them somewhere else. The notebooks in colab/ are committed without outputs.
"""
import os
import pathlib
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

COLAB = pathlib.Path(__file__).resolve().parents[1] / "colab"
NOTEBOOKS = ["train_demo.ipynb", "attention_maps.ipynb", "knn_and_features.ipynb"]  # the first trains the run


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """The demo run's workdir, shared by the notebooks, and where the executed copies go."""
    base = tmp_path_factory.mktemp("notebooks")
    out = pathlib.Path(os.environ.get("DINO_JAX_NOTEBOOK_OUT") or base / "executed")
    out.mkdir(parents=True, exist_ok=True)
    return base / "demo_run", out


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, shared_run, monkeypatch):
    workdir, out = shared_run
    # The kernel is a child process: it inherits this environment.
    monkeypatch.setenv("DINO_JAX_QUICK", "1")
    monkeypatch.setenv("DINO_JAX_WORKDIR", str(workdir))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(COLAB / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        f"{name} is committed with outputs; clear them (jupyter nbconvert --clear-output --inplace)"
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(COLAB)}})
    t0 = time.time()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{name}: a cell failed (executed copy: {out / name}):\n{e}", pytrace=False)
    finally:
        nbformat.write(nb, out / name)
        print(f"{name}: {time.time() - t0:.0f} s; executed copy in {out / name}")
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images >= 2, f"{name} displayed {images} figures"

"""Every notebook runs top to bottom in a Jupyter kernel (nbclient), draws at least one figure, ends
with the explorer's page of its results, and keeps its outputs (layers for QGIS, the page) in the
folder its first cell chooses (here a temporary one, through ``DINOV3GEO_NOTEBOOK_OUT``): nothing in
the repository, nothing left in the temporary folder."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def untracked(root: Path) -> set[str]:
    """Untracked and modified files where a notebook could write (its own folder and the data it
    reads; git's view): other tests running beside it write elsewhere, so no race."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", "notebooks", "data_samples"],
                         cwd=root, text=True, capture_output=True, check=True).stdout
    return set(out.splitlines())


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_draws(path, tmp_path, monkeypatch):
    home, scratch, kept = tmp_path / "home", tmp_path / "tmp", tmp_path / "kept"
    home.mkdir(), scratch.mkdir()
    monkeypatch.setenv("HOME", str(home))               # no real weights: the notebook makes a toy model
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setenv("DINOV3GEO_NOTEBOOK_OUT", str(kept))     # the notebooks' OUT folder
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    before = untracked(ROOT)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert "RANDOM" in next(o["text"] for o in outputs if o.get("output_type") == "stream" and o["name"] == "stdout")
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert not [o for o in outputs if o.get("output_type") == "error"]
    # the last cell shows the explorer's page of the results, also written beside them
    last = nb.cells[-1].outputs
    assert any(o.get("data", {}).get("text/html", "").startswith("<iframe srcdoc=") for o in last)
    out = kept / path.stem
    assert (out / "explore.html").read_text().startswith("<!DOCTYPE html>")
    assert {p.suffix for p in out.iterdir()} >= {".tif", ".gpkg", ".html"}      # the layers for QGIS are kept
    # nothing in the temporary folder; torch's own compile cache (made when transformers builds the
    # toy canopy model) is torch's, shared by every run, like ~/.cache
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")] == []
    assert untracked(ROOT) == before

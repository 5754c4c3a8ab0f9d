"""The notebooks run top to bottom (code cells executed in order, in one namespace)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(path.parent)
    monkeypatch.setenv("HOME", str(tmp_path))          # no real weights: the notebook makes a toy model
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert cells
    namespace: dict = {}
    for cell in cells:
        exec(compile("".join(cell["source"]), f"{path.name}", "exec"), namespace)
    assert namespace["result"].output.exists()
    assert {"area_m2", "mean_height_m", "max_height_m"} <= set(namespace["canopy"].columns)
    assert namespace["heights"].rio.crs is not None

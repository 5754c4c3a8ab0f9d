"""The notebooks run top to bottom (code cells executed in order, in one namespace) and leave
nothing in temporary folders."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import timm  # noqa: F401  (importing it makes torch's inductor cache folder once per machine: not the notebook's)

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    work, temp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    temp.mkdir()
    monkeypatch.chdir(work)                            # the notebook's working folder
    monkeypatch.setenv("HOME", str(tmp_path))          # no real weights: the notebook uses the demo model
    monkeypatch.setattr(tempfile, "tempdir", str(temp))    # where anything temporary would go
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert cells
    namespace: dict = {}
    for cell in cells:
        exec(compile("".join(cell["source"]), f"{path.name}", "exec"), namespace)
    assert namespace["result"].output.exists()
    assert namespace["result"].output.resolve().parent.parent == work
    assert {"area_m2", "mean_height_m", "max_height_m"} <= set(namespace["canopy"].columns)
    assert namespace["heights"].rio.crs is not None
    assert list(temp.iterdir()) == [], list(temp.iterdir())

"""Every notebook runs top to bottom in a Jupyter kernel (nbclient), draws at least one figure and
leaves nothing behind: not in the repository, not in the temporary folder."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def untracked(root: Path) -> set[str]:
    """Untracked and modified files of the repository (git's view)."""
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root, text=True,
                         capture_output=True, check=True).stdout
    return set(out.splitlines())


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_draws(path, tmp_path, monkeypatch):
    home, scratch = tmp_path / "home", tmp_path / "tmp"
    home.mkdir(), scratch.mkdir()
    monkeypatch.setenv("HOME", str(home))               # no real weights: the notebook makes a toy model
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    before = untracked(ROOT)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert "RANDOM" in next(o["text"] for o in outputs if o.get("output_type") == "stream" and o["name"] == "stdout")
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert not [o for o in outputs if o.get("output_type") == "error"]
    # the notebook removed its temporary folder; torch's own compile cache (made when transformers
    # builds the toy canopy model) is torch's, shared by every run, like ~/.cache
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")] == []
    assert untracked(ROOT) == before

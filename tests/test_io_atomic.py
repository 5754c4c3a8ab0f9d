"""Outputs published atomically: a temporary file beside the target, moved onto it only when complete."""
import os

import pytest

from dinov3_geo.io.atomic import atomic_output


def leftovers(folder, keep):
    return sorted(p for p in os.listdir(folder) if p not in keep)


def test_atomic_output_helper(tmp_path):
    target = tmp_path / "a.txt"
    with atomic_output(target) as tmp:
        tmp.write_text("done")
        assert not target.exists()
    assert target.read_text() == "done"
    with pytest.raises(ValueError):
        with atomic_output(target, overwrite=True) as tmp:
            tmp.write_text("half")
            raise ValueError
    assert target.read_text() == "done" and leftovers(tmp_path, {"a.txt"}) == []

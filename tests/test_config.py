"""Option files (configs/*.yaml) through the command line."""
from __future__ import annotations

import pytest

from dinov3_geo.cli import main, parse
from helpers import ROOT, SAMPLES

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_parse(path):
    args = parse(["segment", "scene.tif", "-o", "out.tif", "--config", str(path)])
    assert args.task == "canopy" and args.tile % 16 == 0 and args.overlap < args.tile // 2


def test_command_line_wins_over_the_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tile: 256\nbands: [3, 2, 1]\nprogress: false\noverwrite: true\n")
    args = parse(["segment", "scene.tif", "-o", "out.tif", "--tile", "128", "--config", str(cfg)])
    assert args.tile == 128 and args.bands == [3, 2, 1] and args.progress is False and args.overwrite


@pytest.mark.parametrize("text, message", [
    ("tiles: 256\n", "unknown option 'tiles'"),
    ("- tile\n", "expected a mapping"),
    ("tile: [1, 2\n", "not a readable YAML file"),
    ("overwrite: maybe\n", "takes true or false"),
    ("tile: 250\n", "multiple of 16"),
])
def test_bad_config_is_one_usage_error(tmp_path, capsys, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    scene = SAMPLES / "stars_L7_ETMs.tif"
    code = main(["segment", str(scene), "-o", str(tmp_path / "o.tif"), "--config", str(cfg)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "o.tif").exists()


def test_missing_config_file(tmp_path, capsys):
    assert main(["segment", "x.tif", "-o", "y.tif", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err

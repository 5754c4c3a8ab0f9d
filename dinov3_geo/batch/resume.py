"""Resuming a job: a small JSON sidecar beside each output says how it was made.

``<output>.json`` records the input's size and modification time, the weights' SHA-256, the
options that change values as the job resolved them (the precision the device runs at, the tiling
and reading a head implies), and the output's own size and modification time. An output is
complete when its sidecar says so, every record still matches, and the file is a valid output on
the input's grid; anything else is redone. A sidecar in state ``running`` is written before a
scene starts and says ``failed`` (with the reason) or ``interrupted`` when it did not finish, so
an output left by such a run is known to be ours and replaced, while a file of the user's without
a sidecar is never overwritten (unless ``overwrite``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from dinov3_geo.batch.plan import Grid
from dinov3_geo.models.identity import tree_sha256
from dinov3_geo.errors import DinoGeoError
from dinov3_geo.io.patchmap import cells
from dinov3_geo.tasks.features import open_store

SIDECAR_VERSION = 1


def sidecar_path(output: Path) -> Path:
    return output.with_name(output.name + ".json")


def file_stamp(path: Path) -> dict[str, int]:
    """Size and modification time (ns) of ``path``."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def weights_hash(path: Optional[os.PathLike]) -> Optional[str]:
    """SHA-256 of a weights file or folder (:func:`~dinov3_geo.models.identity.tree_sha256`)."""
    return None if path is None else tree_sha256(path)


def write_sidecar(output: Path, state: str, scene: Path, recipe: dict[str, Any],
                  extra: Optional[dict[str, Any]] = None) -> None:
    """Write ``<output>.json`` atomically (state ``running`` or ``complete``)."""
    record = {"version": SIDECAR_VERSION, "state": state, "input": {"path": str(scene), **file_stamp(scene)},
              "recipe": recipe}
    if state == "complete":
        record["output"] = file_stamp(output)
    record.update(extra or {})
    path = sidecar_path(output)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, path)


def read_sidecar(output: Path) -> Optional[dict[str, Any]]:
    """The sidecar's record, or None when there is none or it cannot be parsed."""
    try:
        return json.loads(sidecar_path(output).read_text())
    except (OSError, ValueError):
        return None


def is_ours(output: Path) -> bool:
    """Whether ``output`` was (being) written by a job: it has our sidecar."""
    record = read_sidecar(output)
    return isinstance(record, dict) and "recipe" in record and "version" in record


def why_not_complete(output: Path, scene: Path, recipe: dict[str, Any], grid: Grid,
                     extra_files: tuple[Path, ...] = ()) -> Optional[str]:
    """None when ``output`` is complete for this scene and recipe, else the reason in a few words
    (the file itself checked as its kind: :data:`FILE_CHECKS`)."""
    record = read_sidecar(output)
    if not output.exists():
        return "no output yet"
    if record is None:
        return "no sidecar"
    if record.get("version") != SIDECAR_VERSION or record.get("state") != "complete":
        return "left unfinished by an earlier run"
    try:
        if {k: record["input"][k] for k in ("size", "mtime_ns")} != file_stamp(scene):
            return "the input changed"
        if record.get("recipe") != json.loads(json.dumps(recipe, default=str)):
            return "the weights or options changed"
        if record["output"] != file_stamp(output):
            return "the output changed since it was written"
    except (KeyError, TypeError, OSError):
        return "sidecar incomplete"
    missing = [p for p in extra_files if not p.exists()]
    if missing:
        return f"{missing[0].name} is missing"
    return FILE_CHECKS.get(output.suffix.lower(), cog_problem)(output, grid)


def cog_problem(output: Path, grid: Grid) -> Optional[str]:
    """None when ``output`` is a COG on ``grid`` whose last block reads, else what is wrong."""
    import rasterio
    from rasterio.errors import RasterioError
    from rasterio.windows import Window

    try:
        with rasterio.open(output) as ds:
            if ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") != "COG":
                return "not a COG"
            crs = ds.crs.to_string() if ds.crs else None
            if (ds.height, ds.width, crs) != (grid.height, grid.width, grid.crs) or \
                    not all(abs(a - b) <= 1e-9 * max(1.0, abs(b)) for a, b in zip(tuple(ds.transform)[:6], grid.transform)):
                return "not on the input's grid"
            ds.read(1, window=Window(ds.width - 1, ds.height - 1, 1, 1))
    except RasterioError as exc:
        return f"unreadable ({str(exc).splitlines()[0][:80]})"
    return None


def geopackage_problem(output: Path, grid: Grid) -> Optional[str]:
    """None when ``output`` is a GeoPackage whose layers can be listed, else what is wrong (a
    per-chip output has no grid to check)."""
    import pyogrio

    try:
        if not len(pyogrio.list_layers(output)):
            return "no layer"
    except Exception as exc:  # noqa: BLE001 - pyogrio raises several types for a damaged file
        return f"unreadable ({str(exc).splitlines()[0][:80]})"
    return None


def parquet_problem(output: Path, grid: Grid) -> Optional[str]:
    """None when ``output`` is a Parquet file whose footer reads, else what is wrong."""
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(output)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        return f"unreadable ({str(exc).splitlines()[0][:80]})"
    return None


def features_problem(output: Path, grid: Grid) -> Optional[str]:
    """None when ``output`` is a whole feature store (every chunk there) on the input's grid of
    16-px cells, else what is wrong."""
    try:
        store = open_store(output)
    except DinoGeoError as exc:
        return exc.problem[:80]
    if tuple(store.feats.shape[1:]) != (cells(grid.height), cells(grid.width)):
        return "not on the input's grid of 16-px cells"
    return None


#: How an output is checked, by its extension (anything else: a COG on the input's grid).
FILE_CHECKS = {".gpkg": geopackage_problem, ".parquet": parquet_problem, ".zarr": features_problem}

"""The job's combined products: VRT mosaics of the scenes' COGs, the combined GeoPackage of all
scenes' polygons (or chips) with a ``scene`` column, and the STAC catalogue of every output.

**One CRS rule for every combined output.** Scenes are grouped by CRS; the most common CRS (ties:
the one met first, in input order) takes the plain name (``mosaic_canopy.vrt``, layer ``canopy``),
and every other CRS gets its own mosaic and its own layer, named after it
(``mosaic_canopy_EPSG-32618.vrt``, layer ``canopy_EPSG-32618``). Nothing is resampled or
reprojected: each scene's pixels and polygons stay exactly as written, and polygon areas are the
true areas computed in each scene's own CRS. Outputs without a CRS (the outputs of inputs
without georeference) have no place on a common grid: they are left out of the combined outputs,
with a note in the job's summary; rasters georeferenced by ground control points only, or on grids
that are not north-up, are left out of the mosaics (their polygons join the combined layers).

rasterio has no ``gdalbuildvrt``: GDAL's VRT driver writes the skeleton from the first output
(``rasterio.shutil.copy(..., driver="VRT")``: CRS, data type, nodata, band descriptions, colour
table) and we place one ``ComplexSource`` per output on the mosaic grid, as ``gdalbuildvrt
-resolution highest`` does.
"""
from __future__ import annotations

import hashlib
import os
import xml.etree.ElementTree as ET
from collections.abc import Hashable
from pathlib import Path
from typing import Optional, Sequence

import rasterio
import rasterio.shutil

from dinov3_geo.batch import resume
from dinov3_geo.io import stac
from dinov3_geo.io.georef import is_pixel_grid
from dinov3_geo.io.gpkg import write_gpkg_layer
from dinov3_geo.io.atomic import atomic_output
from dinov3_geo.io.stac import COLLECTION_NAME, ITEM_SUFFIX
from dinov3_geo.io.styles import copy_layer_style, is_ours, write_raster_style

#: How many file names a note lists before it says "and N more".
NOTE_NAMES = 5


def crs_groups(members: Sequence[tuple[Hashable, object]]) -> list[tuple[object, list]]:
    """``(crs, [member, ...])`` of ``members`` (``(member, crs)`` pairs) grouped by CRS: the most
    common CRS first (ties: the CRS met first), then the others, larger groups first."""
    groups: dict = {}
    for member, crs in members:
        groups.setdefault(crs, []).append(member)
    return sorted(groups.items(), key=lambda kv: -len(kv[1]))      # stable: ties keep their order


def crs_tag(crs) -> str:
    """A file- and layer-name-safe tag of a CRS: ``EPSG-32612``, else a short hash of its WKT."""
    epsg = crs.to_epsg()
    return f"EPSG-{epsg}" if epsg else hashlib.sha256(crs.to_wkt().encode()).hexdigest()[:8]


def _left_out(names: list[str], why: str) -> list[str]:
    """One note for the outputs ``names`` left out of combined outputs (a few named)."""
    if not names:
        return []
    shown = ", ".join(names[:NOTE_NAMES]) + (f" and {len(names) - NOTE_NAMES} more" if len(names) > NOTE_NAMES else "")
    return [f"{len(names)} output(s) {why}: {shown}"]


# -- VRT mosaics --------------------------------------------------------------------------------

def write_vrts(outputs: Sequence[Path], path: Path) -> tuple[list[Path], list[str]]:
    """Mosaics of ``outputs`` (COGs with the same bands) by the CRS rule: the most common CRS at
    ``path``, each other one beside it as ``<stem>_<CRS tag>.vrt``. Returns the files written and
    notes on outputs left out (no georeference, ground control points only, grids not north-up)."""
    members, unplaced, rotated = [], [], []
    for out in outputs:
        with rasterio.open(out) as ds:
            if ds.crs is None or is_pixel_grid(ds.crs, ds.transform):
                unplaced.append(out.name)
            elif ds.transform.b or ds.transform.d or ds.transform.e > 0:      # rotated or south-up
                rotated.append(out.name)
            else:
                members.append(((out, ds.transform, ds.width, ds.height), ds.crs))
    written = []
    for i, (crs, grids) in enumerate(crs_groups(members)):
        name = path if i == 0 else path.with_name(f"{path.stem}_{crs_tag(crs)}{path.suffix}")
        write_vrt({out: (t, w, h) for out, t, w, h in grids}, name)
        written.append(name)
    notes = _left_out(unplaced, "without a CRS or geotransform (or with ground control points only) have "
                                "no mosaic: no common grid to place them on")
    notes += _left_out(rotated, "on grids that are not north-up (rotated, or rows going north) are left out "
                                "of the mosaic")
    return written, notes


def write_vrt(grids: dict, path: Path) -> None:
    """Write the VRT mosaic of ``{output: (transform, width, height)}`` (one CRS, north-up) to ``path``."""
    with atomic_output(path, overwrite=True, tag="partial") as tmp:
        rasterio.shutil.copy(next(iter(grids)), tmp, driver="VRT")
        tree = ET.parse(tmp)
        _place_sources(tree.getroot(), grids, path.parent)
        tree.write(tmp)


def _place_sources(root: ET.Element, grids: dict, folder: Path) -> None:
    """Size and geotransform of the mosaic, and one ComplexSource per output in every band."""
    rx = min(abs(t.a) for t, _, _ in grids.values())
    ry = min(abs(t.e) for t, _, _ in grids.values())
    left = min(t.c for t, _, _ in grids.values())
    top = max(t.f for t, _, _ in grids.values())
    right = max(t.c + w * t.a for t, w, _ in grids.values())
    bottom = min(t.f + h * t.e for t, _, h in grids.values())
    root.set("rasterXSize", str(round((right - left) / rx)))
    root.set("rasterYSize", str(round((top - bottom) / ry)))
    for meta in root.findall("Metadata[@domain='IMAGE_STRUCTURE']"):   # the first file's, not the VRT's
        root.remove(meta)
    root.find("GeoTransform").text = f"{left!r}, {rx!r}, 0.0, {top!r}, 0.0, {-ry!r}"
    for band in root.iter("VRTRasterBand"):
        for old in [e for e in band if e.tag.endswith("Source")]:
            band.remove(old)
        nodata = band.findtext("NoDataValue")
        for out, (t, w, h) in grids.items():
            band.append(_source(out, folder, int(band.get("band")), t, w, h, rx, ry, left, top, nodata))


def _source(out: Path, folder: Path, index: int, t, w: int, h: int, rx: float, ry: float, left: float,
            top: float, nodata) -> ET.Element:
    src = ET.Element("ComplexSource")
    relative = os.path.relpath(out, folder)
    ET.SubElement(src, "SourceFilename", relativeToVRT="1").text = relative
    ET.SubElement(src, "SourceBand").text = str(index)
    ET.SubElement(src, "SrcRect", xOff="0", yOff="0", xSize=str(w), ySize=str(h))
    ET.SubElement(src, "DstRect", xOff=repr((t.c - left) / rx), yOff=repr((top - t.f) / ry),
                  xSize=repr(w * abs(t.a) / rx), ySize=repr(h * abs(t.e) / ry))
    if nodata is not None:
        ET.SubElement(src, "NODATA").text = nodata
    return src


# -- the combined GeoPackage --------------------------------------------------------------------

def merge_vectors(parts: Sequence[tuple[str, Path]], path: Path, layer: str,
                  overwrite: bool = True) -> tuple[int, list[str], list[str]]:
    """The combined GeoPackage ``path`` of every ``(scene name, per-scene GeoPackage)`` by the CRS
    rule: layer ``layer`` holds the scenes in the most common CRS, ``<layer>_<CRS tag>`` each other
    CRS; every feature keeps its geometry and attributes (areas computed in its scene's CRS) and
    gets a ``scene`` column; each layer gets the parts' QGIS style. Parts without a CRS are left
    out. Written atomically. Returns the feature count, the layers written and notes."""
    import pyogrio
    from rasterio.crs import CRS


    members, unplaced = [], []
    for scene, part in parts:
        wkt = pyogrio.read_info(part, layer=layer).get("crs")
        if wkt is None:
            unplaced.append(Path(part).name)
        else:
            members.append(((scene, part), CRS.from_user_input(wkt)))
    total, layers = 0, []
    with atomic_output(path, overwrite=overwrite, tag="partial") as tmp:
        os.unlink(tmp)      # the GPKG driver creates the file itself
        for i, (crs, group) in enumerate(crs_groups(members)):
            name = layer if i == 0 else f"{layer}_{crs_tag(crs)}"
            total += _append_parts(group, tmp, layer, name)
            copy_layer_style(group[0][1], layer, tmp, name)
            layers.append(name)
        if not layers:          # no placeable part: an empty layer, so the file is a GeoPackage
            _append_parts([], tmp, layer, layer)
    notes = _left_out(unplaced, f"without a CRS are left out of {path.name} (polygons in pixel units of "
                                "different images cannot share a layer)")
    return total, layers, notes


def _append_parts(group: Sequence[tuple[str, Path]], gpkg: Path, layer: str, name: str) -> int:
    """Append layer ``layer`` of every ``(scene, part)`` of ``group`` to layer ``name`` of ``gpkg``
    (created empty when the group is empty) with a ``scene`` column; returns the feature count."""
    import geopandas as gpd


    total = 0
    for scene, part in group:
        frame = gpd.read_file(part, layer=layer, engine="pyogrio")
        frame.insert(0, "scene", scene)
        write_gpkg_layer(frame, gpkg, name, append=gpkg.exists())
        total += len(frame)
    if not group:
        write_gpkg_layer(gpd.GeoDataFrame({"scene": []}, geometry=[]), gpkg, name, append=gpkg.exists(),
                         geometry_type="Polygon")
    return total


# -- the STAC catalogue -------------------------------------------------------------------------

def write_catalogue(out_dir: Path, task: str, outputs: Sequence[tuple[Path, Path]],
                    combined: Sequence[Optional[Path]] = ()) -> Path:
    """The job's STAC Collection ``out_dir/collection_<task>.json`` linking an Item beside every
    output (each ``(scene, output)``, its per-scene GeoPackage when there is one) and every
    combined product (``combined``: mosaics, combined GeoPackage), with the QGIS style of each
    raster. An Item newer than its output is kept (a resumed job rewrites only what changed).
    Each scene's Item carries its recipe (weights' hashes, options) from the resume sidecar."""
    collection = stac.collection_for(out_dir, task)
    items = []
    for scene, output in outputs:
        properties = _recipe_properties(output)
        items.append(_item(output, scene, properties, collection))
        polygons = output.with_suffix(".gpkg")
        if output.suffix.lower() != ".gpkg" and polygons.exists():
            items.append(_item(polygons, output, properties, collection))
    for path in combined:
        if path is not None and path.exists():
            items.append(_item(path, None, {"task": task}, collection))
    return stac.write_collection(collection, items)


def _item(output: Path, source, properties: dict, collection) -> Path:
    """The Item (and for a raster, the QGIS style) of ``output``: kept when newer than the output."""
    item = stac.item_path(output)
    if item.exists() and item.stat().st_mtime_ns >= output.stat().st_mtime_ns:
        return item
    if output.suffix.lower() in (".tif", ".vrt"):
        write_raster_style(output)
    return stac.write_item(output, source, properties, collection=collection)


def _recipe_properties(output: Path) -> dict:
    """The recipe of an output's resume sidecar (task, weights' SHA-256, options) as Item properties."""
    record = resume.read_sidecar(output) or {}
    return {k: v for k, v in (record.get("recipe") or {}).items() if v is not None}


def sidecar_names(names: set[str], task: str) -> set[str]:
    """The names of the GIS sidecars a job writes beside the files ``names`` (STAC Items, QGIS
    styles of rasters) and its Collection: files of the job, as the outputs are."""
    styles = {Path(n).stem + ".qml" for n in names if n.lower().endswith((".tif", ".vrt"))}
    return {n + ITEM_SUFFIX for n in names} | styles | {COLLECTION_NAME.format(task=task)}


def is_sidecar(path: Path) -> bool:
    """Whether ``path`` is a GIS sidecar of a job's output (an Item, a style, a Collection), so
    never an input scene (a glob over an output folder finds them)."""
    name = path.name
    return name.endswith(ITEM_SUFFIX) or (name.startswith("collection_") and name.endswith(".json")) or \
        (name.endswith(".qml") and is_ours(path))

"""The job's combined products: a VRT mosaic of the scenes' COGs and one GeoPackage layer of all
scenes' polygons with a ``scene`` column.

rasterio has no ``gdalbuildvrt``: GDAL's VRT driver writes the skeleton from the first output
(``rasterio.shutil.copy(..., driver="VRT")``: CRS, data type, nodata, band descriptions, colour
table) and we place one ``ComplexSource`` per output on the mosaic grid, as ``gdalbuildvrt
-resolution highest`` does. A VRT holds one CRS: outputs in several CRSs give one mosaic per CRS.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

import rasterio
import rasterio.shutil

from dinov3_geo.io.sinks import atomic_output


def write_vrts(outputs: Sequence[Path], path: Path) -> tuple[list[Path], list[str]]:
    """Mosaics of ``outputs`` (north-up rasters with the same bands), one per CRS: the most common
    CRS at ``path``, each other one beside it as ``<stem>_<CRS>.vrt``. Returns the files written and
    notes on outputs left out."""
    groups: dict = {}
    notes = []
    for out in outputs:
        with rasterio.open(out) as ds:
            if ds.transform.b or ds.transform.d:
                notes.append(f"{out.name}: rotated grid, left out of the mosaic")
                continue
            groups.setdefault(ds.crs, {})[out] = (ds.transform, ds.width, ds.height)
    written = []
    for i, (crs, grids) in enumerate(sorted(groups.items(), key=lambda kv: -len(kv[1]))):
        name = path if i == 0 else path.with_name(f"{path.stem}_{_crs_tag(crs)}{path.suffix}")
        write_vrt(grids, name)
        written.append(name)
    return written, notes


def _crs_tag(crs) -> str:
    """A file-name-safe tag of a CRS: ``EPSG-32612``, else a short hash of its WKT."""
    import hashlib

    if crs is None:
        return "no-crs"
    epsg = crs.to_epsg()
    return f"EPSG-{epsg}" if epsg else hashlib.sha256(crs.to_wkt().encode()).hexdigest()[:8]


def write_vrt(grids: dict, path: Path) -> None:
    """Write the VRT mosaic of ``{output: (transform, width, height)}`` (one CRS) to ``path``."""
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


def merge_vectors(parts: Sequence[tuple[str, Path]], path: Path, layer: str, overwrite: bool = True) -> int:
    """One GeoPackage layer ``layer`` at ``path`` of every ``(scene name, per-scene GeoPackage)``,
    with a ``scene`` column, in the first part's CRS; returns the feature count. Written atomically."""
    import geopandas as gpd
    import pyogrio

    total, crs = 0, None
    with atomic_output(path, overwrite=overwrite, tag="partial") as tmp:
        os.unlink(tmp)      # the GPKG driver creates the file itself
        for scene, part in parts:
            frame = gpd.read_file(part, layer=layer, engine="pyogrio")
            crs = crs or frame.crs
            frame.insert(0, "scene", scene)
            frame = frame.to_crs(crs) if frame.crs != crs else frame
            pyogrio.write_dataframe(frame, tmp, layer=layer, driver="GPKG", append=tmp.exists())
            total += len(frame)
    return total

"""The job's combined products: a VRT mosaic of the scenes' COGs and one GeoPackage layer of all
scenes' polygons with a ``scene`` column.

rasterio has no ``gdalbuildvrt``: GDAL's VRT driver writes the skeleton from the first output
(``rasterio.shutil.copy(..., driver="VRT")``: CRS, data type, nodata, band descriptions, colour
table) and we place one ``ComplexSource`` per output on the mosaic grid, as ``gdalbuildvrt
-resolution highest`` does. A VRT holds one CRS: outputs in other CRSs than the most common one
are left out (and named in the notes).
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Sequence

import rasterio
import rasterio.shutil

from dinov3_geo.io.sinks import atomic_output


def write_vrt(outputs: Sequence[Path], path: Path) -> list[str]:
    """Write the mosaic of ``outputs`` (north-up rasters with the same bands) to ``path``; return
    notes on outputs left out."""
    grids, notes = {}, []
    for out in outputs:
        with rasterio.open(out) as ds:
            if ds.transform.b or ds.transform.d:
                notes.append(f"{out.name}: rotated grid, left out of the mosaic")
                continue
            grids[out] = (ds.crs, ds.transform, ds.width, ds.height)
    if not grids:
        return notes
    crs = Counter(g[0] for g in grids.values()).most_common(1)[0][0]
    notes += [f"{o.name}: CRS {g[0]} differs from the mosaic's {crs}, left out of the mosaic"
              for o, g in grids.items() if g[0] != crs]
    grids = {o: g for o, g in grids.items() if g[0] == crs}
    with atomic_output(path, overwrite=True, tag="partial") as tmp:
        rasterio.shutil.copy(next(iter(grids)), tmp, driver="VRT")
        tree = ET.parse(tmp)
        _place_sources(tree.getroot(), grids, path.parent)
        tree.write(tmp)
    return notes


def _place_sources(root: ET.Element, grids: dict, folder: Path) -> None:
    """Size and geotransform of the mosaic, and one ComplexSource per output in every band."""
    rx = min(abs(g[1].a) for g in grids.values())
    ry = min(abs(g[1].e) for g in grids.values())
    left = min(g[1].c for g in grids.values())
    top = max(g[1].f for g in grids.values())
    right = max(g[1].c + g[2] * g[1].a for g in grids.values())
    bottom = min(g[1].f + g[3] * g[1].e for g in grids.values())
    root.set("rasterXSize", str(round((right - left) / rx)))
    root.set("rasterYSize", str(round((top - bottom) / ry)))
    for meta in root.findall("Metadata[@domain='IMAGE_STRUCTURE']"):   # the first file's, not the VRT's
        root.remove(meta)
    root.find("GeoTransform").text = f"{left!r}, {rx!r}, 0.0, {top!r}, 0.0, {-ry!r}"
    for band in root.iter("VRTRasterBand"):
        for old in [e for e in band if e.tag.endswith("Source")]:
            band.remove(old)
        nodata = band.findtext("NoDataValue")
        for out, (_, t, w, h) in grids.items():
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

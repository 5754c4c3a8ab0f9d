"""The page's layers, gathered from the files given: what each file is and how it is drawn.

- the scene: a colour picture by the product's band and scaling rules (:func:`open_scene`);
- class rasters (uint8 with a colour table or ``CLASS_i`` names: ``segment --head``, ``cluster``):
  their colours and names;
- value rasters (canopy heights, similarity, change, any other band): a colour ramp stretched to
  the 2-98 % of the values shown, with its units where the product names them;
- other rasters of three or more bands (another date): a colour picture, by the same rules as the
  scene;
- feature maps (``embed --patch``: a Zarr store, or a COG on the scene's 16-px cells): the
  similarity layer (:mod:`dinov3_geo.explorer.similarity`);
- vector files (GeoPackage layers, GeoParquet, ...): :mod:`dinov3_geo.explorer.vectors`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import RasterioError

from dinov3_geo.errors import DinoGeoWarning, InputError, short_message
from dinov3_geo.explorer import render
from dinov3_geo.explorer.grid import DisplayGrid, read_onto
from dinov3_geo.io.pixels import to_unit
from dinov3_geo.io.scene import open_scene

VECTOR_SUFFIXES = {".gpkg", ".geojson", ".json", ".shp", ".fgb", ".parquet", ".geoparquet", ".kml", ".gml", ".gpx"}
#: What the product's band descriptions mean: label, units, colour map, the values' domain, and
#: how to decimate (the 16-px cell results of similar and change: nearest, each display pixel one
#: cell's value, and a palette PNG of a third of the size).
KNOWN_BANDS = {
    "canopy_height_m": ("canopy height", "m", "YlGn", (0.0, None), Resampling.average),
    "cosine_similarity": ("cosine similarity", "", "magma", (-1.0, 1.0), Resampling.nearest),
    "cosine_distance": ("change (cosine distance)", "", "inferno", (0.0, 2.0), Resampling.nearest),
}
OTHER_BANDS = ("values", "", "viridis", (None, None), Resampling.average)
RASTER_OPACITY = 0.8


@dataclass
class Layer:
    """One layer of the page: its ``name`` and what the page gets (``page``: image or vector
    data, bounds, legend), with notes for the page's "about" box."""

    name: str
    page: dict
    notes: list[str] = field(default_factory=list)


def kind_of(path: Path) -> str:
    """``"features"`` (a Zarr store), ``"vector"`` (by suffix) or ``"raster"``."""
    if path.is_dir():
        return "features"
    return "vector" if path.suffix.lower() in VECTOR_SUFFIXES else "raster"


def open_raster(path: Path):
    """rasterio.open with failures as one-line :class:`InputError`."""
    if not path.exists():
        raise InputError(path, "file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioError as exc:
        raise InputError(path, f"neither a raster nor a vector file GDAL opens ({short_message(exc)})") from None


def colour_layer(scene, grid: DisplayGrid, name: str) -> Layer:
    """An open scene (:func:`open_scene`) as a colour picture: its bands and scaling are those
    every command uses (colour interpretation, band names or ``bands``; bytes /255, else the
    scene-wide 2-98 % stretch or ``scale``), read decimated onto ``grid``."""
    for text in scene.warnings:
        warnings.warn(text, DinoGeoWarning, stacklevel=3)
    with open_raster(Path(scene.path)) as ds:
        data = read_onto(ds, scene.bands, grid, Resampling.average, where=scene.path)
    valid = np.isfinite(data).any(axis=0)
    rgb = data / 255.0 if scene.scaling is None else to_unit(data, scene.scaling)
    rgb = np.nan_to_num(rgb, nan=0.0)
    if rgb.shape[0] == 1:
        rgb = np.repeat(rgb, 3, axis=0)
    how = "/255" if scene.scaling is None else "stretched " + ", ".join(f"{lo:g}..{hi:g}" for lo, hi in scene.scaling)
    text = f"bands {','.join(map(str, scene.bands))} as red, green, blue ({how})"
    legend = {"kind": "image", "label": "colour picture", "text": text}
    page = _image(name, render.rgb_image(rgb, valid), grid, legend, pixelated=False, opacity=1.0)
    return Layer(name, page, [f"{name}: {text}"] + list(scene.warnings))


def raster_layer(path: Path, grid: DisplayGrid, name: str, bands: Optional[Sequence[int]] = None,
                 scale=None) -> Layer:
    """A result raster: classes in their colours, or the first band's values on a colour ramp;
    three or more bands (another date): a colour picture, with the scene's ``bands`` and ``scale``
    when given and it has those bands."""
    with open_raster(path) as ds:
        if ds.count < 3:
            return _classes_layer(ds, grid, name, path) if _is_classes(ds) else _values_layer(ds, grid, name, path)
        same = bands is not None and max(bands) <= ds.count
    with open_scene(path, bands=bands if same else None, scale=scale if same else None) as scene:
        return colour_layer(scene, grid, name)


def _is_classes(ds) -> bool:
    """uint8 classes: one band with a colour table (palette) or ``CLASS_i`` names."""
    if ds.count != 1 or ds.dtypes[0] != "uint8":
        return False
    return ds.colorinterp[0] == ColorInterp.palette or bool(class_names(ds))


def class_names(ds) -> dict[int, str]:
    """Class names from ``CLASS_i`` tags (the dataset's or band 1's); empty when none."""
    names = {}
    for tags in (ds.tags(), ds.tags(1)):
        for key, value in tags.items():
            if key.upper().startswith("CLASS_") and key[6:].isdigit():
                names[int(key[6:])] = value
    return names


def _classes_layer(ds, grid: DisplayGrid, name: str, path: Path) -> Layer:
    values = read_onto(ds, [1], grid, Resampling.nearest, where=path)[0]
    try:
        table = {k: v for k, v in ds.colormap(1).items()}
    except ValueError:                      # no colour table: matplotlib's tab20
        table = {i: tuple(int(c) for c in render.ramp_colours("tab20", 20)[i % 20][:3]) for i in range(256)}
    names = class_names(ds)
    present = sorted(int(v) for v in np.unique(values[np.isfinite(values)]))
    word = "unit" if (ds.descriptions[0] or "").lower() == "cluster" else "class"
    shown = sorted(set(names) | set(present)) if names else present
    items = [(names.get(v, f"{word} {v}"), render.hex_colour(table.get(v, (128, 128, 128)))) for v in shown]
    legend = render.classes_legend(ds.descriptions[0] or "classes", items)
    return Layer(name, _image(name, render.classes_image(values, table), grid, legend, pixelated=True))


def _values_layer(ds, grid: DisplayGrid, name: str, path: Path) -> Layer:
    description = (ds.descriptions[0] or "").strip()
    label, units, cmap, domain, resampling = KNOWN_BANDS.get(description.lower(), OTHER_BANDS)
    if description and description.lower() not in KNOWN_BANDS:
        label = description
    units = units or (ds.units[0] or "")
    values = read_onto(ds, [1], grid, resampling, where=path)[0]
    lo, hi = render.stretch(values, domain)
    legend = render.ramp_legend(label, units, cmap, lo, hi)
    notes = [f"{name}: band 1 of {ds.count}"] if ds.count > 1 else []
    return Layer(name, _image(name, render.values_image(values, lo, hi, cmap), grid, legend, pixelated=True), notes)


def _image(name: str, url: str, grid: DisplayGrid, legend: dict, pixelated: bool,
           opacity: float = RASTER_OPACITY) -> dict:
    return {"name": name, "type": "image", "url": url, "bounds": grid.leaflet_bounds(), "legend": legend,
            "pixelated": pixelated, "opacity": opacity}


def is_feature_raster(path: Path, cells) -> bool:
    """A float GeoTIFF of several bands on the scene's grid of 16-px ``cells`` (a
    :class:`~dinov3_geo.io.patchmap.CellGrid`): ``embed --patch -o x.tif``."""
    with open_raster(path) as ds:
        return (ds.count >= 2 and ds.dtypes[0] in ("float32", "float64", "float16")
                and (ds.height, ds.width) == (cells.height, cells.width) and ds.crs == cells.crs
                and ds.transform.almost_equals(cells.transform))


def unique_names(paths: Sequence[Path]) -> list[str]:
    """Layer names from file names, made unique with the parent folder where two clash."""
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]

"""Vector files as page layers: every layer of a GeoPackage (or a GeoParquet, GeoJSON, ... file) as
GeoJSON on the page's CRS, with its attributes for pop-ups.

Geometries are simplified to half a display pixel (shapely, topology kept) and their coordinates
rounded to a tenth of one, so a layer costs what the screen can show; a layer of more than
``MAX_FEATURES`` features or ``MAX_VERTICES`` vertices keeps the largest (the page says so). Only plain attributes travel
(numbers, text, booleans, dates as text); lists such as ``embed``'s embeddings stay in the file.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from dinov3_geo.errors import InputError, short_message
from dinov3_geo.explorer import render
from dinov3_geo.explorer.grid import WGS84, DisplayGrid, Placement
from dinov3_geo.explorer.layers import Layer

#: Features and vertices per layer the page holds (the largest features first).
MAX_FEATURES = 20_000
MAX_VERTICES = 50_000
#: Outline colours of vector layers, in turn.
OUTLINES = ("#00e5ff", "#ff4081", "#ffd740", "#69f0ae", "#e040fb", "#ff6e40")


def read_layers(path: Path) -> list[tuple[Optional[str], object]]:
    """``(layer name, GeoDataFrame)`` of every layer with geometries of a vector file (one ``None``
    for GeoParquet)."""
    import geopandas as gpd
    import pyogrio

    if not path.exists():
        raise InputError(path, "file not found")
    try:
        if path.suffix.lower() in (".parquet", ".geoparquet"):
            return [(None, gpd.read_parquet(path))]
        names = [str(n) for n, kind in pyogrio.list_layers(path) if kind is not None]   # not tables (layer_styles)
        return [(n, gpd.read_file(path, layer=n)) for n in names]
    except Exception as exc:  # pyogrio's DataSourceError, pyarrow's errors...
        raise InputError(path, f"not a readable vector file ({short_message(exc)})") from None


def vector_layers(path: Path, grid: DisplayGrid, scene: Placement, name: str, first_colour: int = 0) -> list[Layer]:
    """One page layer per layer of the vector file ``path``."""
    found = read_layers(path)
    layers = []
    for i, (layer, frame) in enumerate(found):
        title = f"{name}: {layer}" if layer is not None and len(found) > 1 else name
        colour = OUTLINES[(first_colour + i) % len(OUTLINES)]
        layers.append(_layer(frame, path, grid, scene, title, colour))
    return layers


def _layer(frame, path: Path, grid: DisplayGrid, scene: Placement, name: str, colour: str) -> Layer:
    frame = frame[frame.geometry.notna() & ~frame.geometry.is_empty]
    notes: list[str] = []
    frame, flipped = _on_page_crs(frame, path, grid, scene)
    if flipped:
        notes.append(f"{name}: pixel coordinates with y = row, drawn with y = -row as the scene is")
    total = len(frame)
    frame = frame.assign(**{frame.geometry.name: _simplified(frame.geometry, grid)})
    frame = _largest(frame)
    if len(frame) < total:
        notes.append(f"{name}: {len(frame)} of its {total} features shown (the largest: at most {MAX_FEATURES} "
                     f"features and {MAX_VERTICES} vertices a layer); the file has them all")
    geometry = frame.geometry
    if grid.basemap:
        geometry = geometry.to_crs(WGS84)
    decimals = 7 if grid.basemap else _decimals(grid)
    properties = _plain_columns(frame)
    features = [{"type": "Feature", "geometry": g, "properties": p}
                for g, p in zip(_geojson(geometry.to_numpy(), decimals), properties)]
    style, legend = _style(frame, colour, name, total)
    page = {"name": name, "type": "vector", "geojson": {"type": "FeatureCollection", "features": features},
            "style": style, "legend": legend}
    return Layer(name, page, notes)


def _on_page_crs(frame, path: Path, grid: DisplayGrid, scene: Placement):
    """``frame`` on the display grid's CRS; without CRS (the scene has none either) in pixel
    coordinates, y mirrored when they run downwards (y = row) while the scene is drawn y = -row."""
    if frame.crs is None and grid.crs is not None:
        raise InputError(path, "no CRS: cannot be placed over a georeferenced scene")
    if frame.crs is not None and grid.crs is None:
        raise InputError(path, "has a CRS, but the scene has no georeference: cannot be placed over it")
    if frame.crs is None:
        bounds = frame.total_bounds
        downwards = len(frame) and bounds[1] >= 0 and bounds[3] > 0 and scene.transform.e < 0
        if downwards:
            frame = frame.copy()
            frame.geometry = frame.geometry.scale(1.0, -1.0, origin=(0, 0))
        return frame, bool(downwards)
    return frame.to_crs(grid.crs), False


def _largest(frame):
    """The largest features (by area, else in file order) within ``MAX_FEATURES`` and
    ``MAX_VERTICES``, in file order."""
    import shapely

    polygons = frame.geom_type.str.contains("Polygon").any()
    order = np.argsort(-frame.geometry.area.to_numpy(), kind="stable") if polygons else np.arange(len(frame))
    vertices = np.cumsum(shapely.get_num_coordinates(frame.geometry.to_numpy()[order]))
    keep = order[:min(MAX_FEATURES, int(np.searchsorted(vertices, MAX_VERTICES, side="right")))]
    return frame if len(keep) == len(frame) else frame.iloc[np.sort(keep)]


def _simplified(geometry, grid: DisplayGrid):
    """Simplified to half a display pixel (topology kept)."""
    tolerance = 0.5 * min(grid.resolution)
    return geometry.simplify(tolerance, preserve_topology=True)


def _decimals(grid: DisplayGrid) -> int:
    """Decimals that keep a tenth of a display pixel."""
    return max(0, int(math.ceil(-math.log10(min(grid.resolution) / 10))))


def _geojson(geoms: np.ndarray, decimals: int) -> list[dict]:
    """GeoJSON geometries with coordinates rounded to ``decimals`` (shapely, all at once)."""
    import json

    import shapely

    rounded = shapely.transform(geoms, lambda xy: np.round(xy, decimals))
    return [json.loads(text) for text in shapely.to_geojson(rounded)]


def _plain_columns(frame) -> list[dict]:
    """Each feature's plain attributes (JSON values: numbers, text, booleans; dates as text; NaN
    as null) for its pop-up; lists, arrays and bytes stay in the file."""
    import pandas as pd

    rows: list[dict] = [dict() for _ in range(len(frame))]
    for column in (c for c in frame.columns if c != frame.geometry.name):
        series = frame[column]
        if pd.api.types.is_datetime64_any_dtype(series):
            series = series.astype(str)
        values = [_plain(v) for v in series.tolist()]
        if any(v is _NOT_PLAIN for v in values):
            continue
        for row, value in zip(rows, values):
            row[str(column)] = value
    return rows


_NOT_PLAIN = object()


def _plain(value):
    """``value`` as a JSON value, ``None`` for missing ones, ``_NOT_PLAIN`` for lists and such."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return _NOT_PLAIN


def _style(frame, colour: str, name: str, total: int) -> tuple[dict, dict]:
    """Outline colour, or colours by class where the layer has an integer ``class`` column."""
    if "class" in frame.columns and frame["class"].dtype.kind in "iu" and len(frame):
        values = sorted(int(v) for v in frame["class"].unique())
        names = dict(zip(frame["class"].astype(int), frame.get("class_name", frame["class"]).astype(str)))
        palette = render.ramp_colours("tab20", 20) if len(values) > 10 else render.ramp_colours("tab10", 10)
        colours = {str(v): render.hex_colour(palette[v % len(palette)]) for v in values}
        legend = render.classes_legend(f"{total} polygons by class", [(names[v], colours[str(v)]) for v in values])
        return {"colour": colour, "by": "class", "colours": colours}, legend
    kinds = sorted(set(frame.geom_type.str.replace("Multi", "").str.lower() + "s")) or ["features"]
    return {"colour": colour, "by": None}, {"kind": "vector", "label": f"{total} {', '.join(kinds)}",
                                            "colour": colour}

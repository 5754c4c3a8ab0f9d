"""Polygons of a thresholded raster into a GeoPackage, strip by strip, with no seams.

The raster is read in row strips. In each strip the selected pixels are labelled into 4-connected
components (``scipy.ndimage.label``, the same connectivity as ``rasterio.features.shapes``), traced
to polygons in *pixel* coordinates (exact integers, so pieces from adjacent strips share edges
exactly) and summarised (sum, count, max). Components whose pixels touch across a strip boundary
are joined with a union-find and their pieces merged with ``shapely.union_all``; a component is
written once no later strip can reach it. Memory is one strip plus the open components.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import RasterioError
from rasterio.features import shapes
from rasterio.transform import from_gcps
from rasterio.warp import transform as warp_transform
from rasterio.windows import Window
from scipy import ndimage

from dinov3_geo.errors import InputError, short_message
from dinov3_geo.io import styles
from dinov3_geo.io.atomic import atomic_output
from dinov3_geo.io.cog import bounded_gdal_cache
from dinov3_geo.io.georef import area_column, vector_transform
from dinov3_geo.io.gpkg import write_gpkg_layer

FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


@dataclass
class _Component:
    """Pieces and running statistics of one (possibly merged) component."""

    pieces: list = field(default_factory=list)
    total: float = 0.0
    count: int = 0
    peak: float = -np.inf

    def absorb(self, other: "_Component") -> None:
        self.pieces += other.pieces
        self.total += other.total
        self.count += other.count
        self.peak = max(self.peak, other.peak)


class _UnionFind:
    """Disjoint sets over integer ids."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while x != root:
            self.parent[x], x = root, self.parent.get(x, x)
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class _StripMerger:
    """Turns successive strips of a boolean selection into finished components."""

    def __init__(self, width: int, by_value: bool = False) -> None:
        self.open: dict[int, _Component] = {}      # root id -> component touching the last boundary
        self.bottom = np.zeros(width, np.int64)    # root ids along the last strip's bottom row
        self.bottom_values: np.ndarray | None = None
        self.by_value = by_value                   # components of equal values only (class maps)
        self.next_id = 1

    def _label(self, values: np.ndarray, sel: np.ndarray) -> tuple[np.ndarray, int]:
        """4-connected components of ``sel``; with ``by_value``, of each value separately."""
        if not self.by_value:
            return ndimage.label(sel, structure=FOUR_CONNECTED)
        labels, n = np.zeros(sel.shape, np.int32), 0
        for v in np.unique(values[sel]).tolist():
            part, k = ndimage.label(sel & (values == v), structure=FOUR_CONNECTED)
            labels[part > 0] = part[part > 0] + n
            n += k
        return labels, n

    def add(self, row_off: int, values: np.ndarray, sel: np.ndarray, last: bool) -> list[_Component]:
        """Add the strip starting at scene row ``row_off``; return components now complete."""
        labels, n = self._label(values, sel)
        new = self._components(row_off, values, labels, n)
        ids = np.where(labels > 0, labels + (self.next_id - 1), 0)
        self.next_id += n
        uf = _UnionFind()
        touching = (self.bottom > 0) & (ids[0] > 0)
        if self.by_value and self.bottom_values is not None:
            touching &= self.bottom_values == values[0]
        self.bottom_values = values[-1].copy()
        for a, b in set(zip(self.bottom[touching].tolist(), ids[0][touching].tolist())):
            uf.union(a, b)
        groups: dict[int, _Component] = {}
        for cid, comp in list(self.open.items()) + list(new.items()):
            groups.setdefault(uf.find(cid), _Component()).absorb(comp)
        bottom_roots = set() if last else {uf.find(i) for i in np.unique(ids[-1][ids[-1] > 0]).tolist()}
        self.open = {r: c for r, c in groups.items() if r in bottom_roots}
        self.bottom = np.zeros_like(self.bottom) if last else np.array([uf.find(i) if i else 0 for i in ids[-1].tolist()])
        return [c for r, c in groups.items() if r not in bottom_roots]

    def _components(self, row_off: int, values: np.ndarray, labels: np.ndarray, n: int) -> dict[int, _Component]:
        """Polygons (pixel coordinates) and statistics of the ``n`` labelled components of a strip."""
        if n == 0:
            return {}
        flat = labels.ravel()
        counts = np.bincount(flat, minlength=n + 1)
        totals = np.bincount(flat, weights=values.ravel().astype(np.float64), minlength=n + 1)
        peaks = ndimage.maximum(values, labels, index=np.arange(1, n + 1))
        comps = {self.next_id + i - 1: _Component([], float(totals[i]), int(counts[i]), float(peaks[i - 1]))
                 for i in range(1, n + 1)}
        for geom, value in shapes(labels.astype(np.int32), mask=labels > 0, connectivity=4,
                                  transform=Affine.translation(0, row_off)):
            comps[self.next_id + int(value) - 1].pieces.append(shapely.geometry.shape(geom))
        return comps


class _Areas:
    """Areas of components: true m² of their polygons in ``crs``, via Lambert azimuthal equal-area
    at the scene centre; without a CRS, their pixel counts (column ``area_px``)."""

    def __init__(self, crs, transform: Affine, width: int, height: int) -> None:
        self.crs = crs
        self.column = area_column(crs)
        self.laea = None
        if crs is not None:
            cx, cy = transform @ (width / 2, height / 2)
            (lon,), (lat,) = warp_transform(crs, "EPSG:4326", [cx], [cy])
            self.laea = CRS.from_proj4(f"+proj=laea +lat_0={lat:.8f} +lon_0={lon:.8f} +datum=WGS84 +units=m")

    def __call__(self, geoms: np.ndarray, comps: list[_Component]) -> np.ndarray:
        """Areas of the components ``comps`` whose map polygons are ``geoms``."""
        if self.laea is None:
            return np.array([c.count for c in comps], np.float64)
        return gpd.GeoSeries(geoms, crs=self.crs).to_crs(self.laea).area.to_numpy()


def _height_columns(comps: list[_Component]) -> dict:
    """Attributes of canopy polygons: mean and max of the heights inside."""
    return {"mean_height_m": np.array([c.total / c.count for c in comps], np.float64),
            "max_height_m": np.array([c.peak for c in comps], np.float64)}


class _LayerWriter:
    """Appends finished components to a GeoPackage layer in batches."""

    def __init__(self, path, layer: str, crs, transform: Affine, areas: _Areas, batch: int = 5000, *,
                 columns: Callable[[list[_Component]], dict] | None = None) -> None:
        self.path, self.layer, self.crs, self.areas, self.batch = str(path), layer, crs, areas, batch
        self.columns = columns or _height_columns
        self.transform = transform
        self.buffer: list[_Component] = []
        self.count = 0
        self.started = False

    def _to_map(self, cols_rows: np.ndarray) -> np.ndarray:
        """Pixel (col, row) coordinates ``[N, 2]`` to map coordinates."""
        t = self.transform
        x = t.a * cols_rows[:, 0] + t.b * cols_rows[:, 1] + t.c
        y = t.d * cols_rows[:, 0] + t.e * cols_rows[:, 1] + t.f
        return np.column_stack([x, y])

    def add(self, comps: list[_Component]) -> None:
        self.buffer += comps
        if len(self.buffer) >= self.batch:
            self.flush()

    def flush(self, force: bool = False) -> None:
        """Write the buffered components (``force``: also when none, to create the layer)."""
        if not self.buffer and (self.started or not force):
            return
        pixel = [shapely.union_all(c.pieces) if len(c.pieces) > 1 else c.pieces[0] for c in self.buffer]
        geoms = shapely.transform(np.array(pixel, dtype=object), self._to_map)
        areas = self.areas(geoms, self.buffer) if pixel else np.zeros(0)
        frame = gpd.GeoDataFrame({self.areas.column: areas, **self.columns(self.buffer)},
                                 geometry=gpd.GeoSeries(list(geoms), crs=self.crs), crs=self.crs)
        write_gpkg_layer(frame, self.path, self.layer, append=self.started, geometry_type="Polygon",
                         promote_to_multi=False)
        self.started = True
        self.count += len(self.buffer)
        self.buffer = []


def georeference(ds) -> tuple:
    """``(crs, transform)`` of an open raster for its vectors; for one georeferenced by ground
    control points only, their CRS and the affine transform fitted to them
    (``rasterio.transform.from_gcps``); for one without any georeference, where GIS tools draw it
    (x = column, y = -row: :func:`~dinov3_geo.io.georef.vector_transform`)."""
    gcps, gcp_crs = ds.gcps
    if ds.crs is None and gcps and gcp_crs is not None:
        return gcp_crs, from_gcps(gcps)
    return ds.crs, vector_transform(ds.crs, ds.transform)


#: The GeoPackage version written: 1.2 (``PRAGMA user_version`` 10200, the R-tree triggers of
#: GeoPackage 1.2), what GDAL 3.6 writes itself. GDAL 3.7+ writes 1.4 by default, whose files GDAL
#: 3.6 and QGIS 3.22 open with a warning and GDAL 3.6's validate_gpkg.py rejects (Req 75).
def _in_units(ds, values: np.ndarray) -> np.ndarray:
    """Band 1's values in their unit: the band's scale and offset applied (uint16 decimetres ->
    metres), unchanged when there are none."""
    scale, offset = ds.scales[0], ds.offsets[0]
    if scale == 1 and offset == 0:
        return values
    return values.astype(np.float32) * np.float32(scale) + np.float32(offset)


def polygonize_threshold(raster_path, out_path, threshold: float, layer: str = "canopy",
                         overwrite: bool = False, strip_rows: int = 1024, batch: int = 5000) -> int:
    """Write polygons of pixels ``>= threshold`` (NaN and nodata excluded) of band 1 of
    ``raster_path`` as layer ``layer`` of the GeoPackage ``out_path``; return the polygon count.

    Values are taken in the band's unit (its scale and offset applied). Polygons are 4-connected
    pixel components in the raster's CRS, never split at strip borders, with attributes
    ``area_m2`` (true m², equal-area projection at the scene centre; ``area_px``, pixels, for a
    raster without CRS), ``mean_height_m`` and ``max_height_m`` (of the raster values). Written
    atomically: no file at ``out_path`` unless it succeeded. Reads ``strip_rows`` rows at a time
    and appends polygons to the file ``batch`` at a time; the layer gets its QGIS style.
    """
    def select(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
        return (values >= threshold) & np.isfinite(values) & valid

    return _polygonize(raster_path, out_path, layer, select, overwrite, strip_rows, batch)


def polygonize_classes(raster_path, out_path, class_names: Sequence[str], layer: str = "classes",
                       overwrite: bool = False, strip_rows: int = 1024, nodata: int = 255,
                       batch: int = 5000) -> int:
    """Write one polygon per 4-connected region of equal class of band 1 of the class raster
    ``raster_path`` (``nodata`` excluded) as layer ``layer`` of the GeoPackage ``out_path``, with
    ``class`` (value), ``class_name`` and ``area_m2`` (``area_px`` without CRS); regions are never
    split at strip (or chip) borders. Atomic like :func:`polygonize_threshold`; returns the
    polygon count."""
    names = list(class_names)

    def select(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
        return (values != nodata) & valid

    def columns(comps: list[_Component]) -> dict:
        values = [int(c.peak) for c in comps]       # every pixel of a region has its class value
        return {"class": np.array(values, np.int32),
                "class_name": [names[v] if v < len(names) else str(v) for v in values]}

    return _polygonize(raster_path, out_path, layer, select, overwrite, strip_rows, batch, columns=columns,
                       class_names=names)


def _polygonize(raster_path, out_path, layer: str, select, overwrite: bool, strip_rows: int, batch: int,
                columns: Callable[[list[_Component]], dict] | None = None,
                class_names: Sequence[str] | None = None) -> int:
    """Strips of band 1 -> ``select(values, valid)`` -> components (of equal values when
    ``columns`` is given, i.e. classes) merged across strips -> the GeoPackage layer, with its
    default QGIS style (graduated heights, or the raster's class colours and ``class_names``)."""
    try:
        ds = rasterio.open(raster_path)
    except RasterioError as exc:
        raise InputError(raster_path, f"not a readable raster ({short_message(exc)})") from None
    with ds, bounded_gdal_cache(), atomic_output(out_path, overwrite, inputs=[raster_path]) as tmp:
        os.unlink(tmp)  # the GPKG driver creates the file itself
        crs, transform = georeference(ds)
        areas = _Areas(crs, transform, ds.width, ds.height)
        writer = _LayerWriter(tmp, layer, crs, transform, areas, batch=batch, columns=columns)
        merger = _StripMerger(ds.width, by_value=columns is not None)
        for row_off in range(0, ds.height, strip_rows):
            rows = min(strip_rows, ds.height - row_off)
            window = Window(0, row_off, ds.width, rows)
            try:
                values = _in_units(ds, ds.read(1, window=window))
                sel = select(values, ds.read_masks(1, window=window) > 0)
            except RasterioError as exc:
                raise InputError(raster_path, f"cannot read rows {row_off}-{row_off + rows} "
                                              f"({short_message(exc)})") from None
            writer.add(merger.add(row_off, values, sel, last=row_off + rows >= ds.height))
        writer.flush(force=True)
        if columns is None:
            styles.write_layer_style(tmp, layer, "canopy")
        else:
            classes = styles.raster_classes(ds, class_names) or styles.class_table(class_names or [])
            styles.write_layer_style(tmp, layer, "classes", classes)
        return writer.count

"""Where pixels lie, and the grid the page shows them on.

A :class:`Placement` says where a raster's pixels lie (CRS and affine transform, or ground control
points; an ungeoreferenced raster lies in pixel coordinates with y = -row, where QGIS puts it).
The :class:`DisplayGrid` is the one north-up grid every raster layer of a page is drawn on: the
scene's own grid decimated to at most ``max_side`` pixels a side when the scene is north-up and no
basemap is asked (no resampling beyond the decimation), else the scene warped to a north-up grid
in its CRS, or in Web Mercator (EPSG:3857) for a basemap. :func:`read_onto` reads any raster onto
it through GDAL's decimated reads (overviews where the file has them) and rasterio's ``reproject``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np
from affine import Affine
from rasterio.control import GroundControlPoint
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.transform import array_bounds, from_gcps
from rasterio.warp import (
    calculate_default_transform,
    reproject,
    transform,
    transform_bounds,
)

from dinov3_geo.errors import InputError, UsageError

#: Where an ungeoreferenced raster lies: x = column, y = -row (QGIS's placement of such files).
PIXEL_GRID = Affine(1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
WEB_MERCATOR = CRS.from_epsg(3857)
WGS84 = CRS.from_epsg(4326)
#: The CRS GDAL's warper is given for pixel coordinates (scene and layer both ungeoreferenced).
STAND_IN = WEB_MERCATOR
#: Source pixels read per display pixel (at most) before warping: enough for an average.
OVERSAMPLE = 2


@dataclass(frozen=True)
class Placement:
    """Where a raster's ``width`` x ``height`` pixels lie: ``crs`` (``None``: pixel coordinates),
    ``transform`` (the affine fit for GCPs) and ``gcps`` (ground control points only, else ``None``)."""

    crs: Optional[CRS]
    transform: Affine
    width: int
    height: int
    gcps: Optional[tuple] = None

    @classmethod
    def of(cls, ds) -> "Placement":
        """The placement of an open rasterio dataset."""
        gcps, gcp_crs = ds.gcps
        if ds.crs is None and gcps and gcp_crs is not None:
            return cls(gcp_crs, from_gcps(gcps), ds.width, ds.height, tuple(gcps))
        transform = ds.transform
        if ds.crs is None and transform.is_identity:
            transform = PIXEL_GRID
        return cls(ds.crs, transform, ds.width, ds.height)

    @property
    def north_up(self) -> bool:
        t = self.transform
        return self.gcps is None and t.b == 0 and t.d == 0 and t.a > 0 and t.e < 0

    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in its CRS (of the corners, for rotated grids and GCPs)."""
        xs, ys = zip(*(self.transform @ (c, r) for c in (0, self.width) for r in (0, self.height)))
        return min(xs), min(ys), max(xs), max(ys)

    def decimated(self, width: int, height: int) -> "Placement":
        """The same extent in ``width`` x ``height`` pixels (what a decimated read returns)."""
        return self._scaled(self.width / width, self.height / height, width, height)

    def coarser(self, factor: int, width: int, height: int) -> "Placement":
        """Cells of ``factor`` x ``factor`` pixels from the top-left corner, ``width`` x
        ``height`` of them (the last may stick out): the grid of 16-px feature cells."""
        return self._scaled(float(factor), float(factor), width, height)

    def _scaled(self, fx: float, fy: float, width: int, height: int) -> "Placement":
        gcps = None
        if self.gcps is not None:
            gcps = tuple(GroundControlPoint(row=g.row / fy, col=g.col / fx, x=g.x, y=g.y, z=g.z, id=g.id)
                         for g in self.gcps)
        return replace(self, transform=self.transform @ Affine.scale(fx, fy), width=width, height=height,
                       gcps=gcps)

    def corners(self) -> list[tuple[float, float]]:
        """Map coordinates of the top-left, top-right and bottom-left corners."""
        return [self.transform @ (c, r) for c, r in ((0, 0), (self.width, 0), (0, self.height))]

    def same_place(self, other: "Placement") -> bool:
        """Same CRS and the same corners, to a thousandth of a pixel (pixel counts may differ)."""
        if self.gcps is not None or other.gcps is not None or self.crs != other.crs:
            return False
        tol = 1e-3 * min(abs(self.transform.a) + abs(self.transform.b), abs(other.transform.a) + abs(other.transform.b))
        return all(math.isclose(p, q, rel_tol=0, abs_tol=tol)
                   for a, b in zip(self.corners(), other.corners()) for p, q in zip(a, b))


@dataclass(frozen=True)
class DisplayGrid:
    """The north-up grid of a page: ``crs`` (``None``: pixel coordinates), ``transform``, size,
    whether it is Web Mercator for a ``basemap``, and the scene pixels per display pixel."""

    crs: Optional[CRS]
    transform: Affine
    width: int
    height: int
    basemap: bool
    factor: float

    @classmethod
    def for_scene(cls, scene: Placement, max_side: int, basemap: bool) -> "DisplayGrid":
        """The display grid of ``scene``: its own grid decimated when north-up and no ``basemap``,
        else a north-up warp of it (EPSG:3857 for a basemap), at most ``max_side`` px a side."""
        if int(max_side) < 16:
            raise UsageError("max_side", f"max_side must be at least 16 pixels, got {max_side!r}")
        if basemap and scene.crs is None:
            raise UsageError("basemap", "the scene has no georeference: it cannot be placed on a basemap")
        if not basemap and scene.north_up:
            width, height, transform = scene.width, scene.height, scene.transform
        else:
            target = WEB_MERCATOR if basemap else scene.crs
            transform, width, height = _north_up(scene, target)
        f = max(1.0, max(width, height) / int(max_side))
        w, h = max(1, round(width / f)), max(1, round(height / f))
        transform = transform @ Affine.scale(width / w, height / h)
        factor = width / w
        crs = WEB_MERCATOR if basemap else scene.crs
        return cls(crs, transform, w, h, basemap, factor)

    @property
    def placement(self) -> Placement:
        return Placement(self.crs, self.transform, self.width, self.height)

    def bounds(self) -> tuple[float, float, float, float]:
        return array_bounds(self.height, self.width, self.transform)[0:4]

    @property
    def resolution(self) -> tuple[float, float]:
        return self.transform.a, -self.transform.e

    def leaflet_bounds(self, bounds: Sequence[float] | None = None) -> list[list[float]]:
        """``[[south, west], [north, east]]`` of ``bounds`` (default: the grid's) as Leaflet takes
        them: latitude and longitude on a basemap, else y and x in the display CRS."""
        left, bottom, right, top = bounds if bounds is not None else self.bounds()
        if self.basemap:            # Mercator's axes are separable: the corners' longitudes and latitudes
            (left, right), (bottom, top) = transform(WEB_MERCATOR, WGS84, [left, right], [bottom, top])
        return [[bottom, left], [top, right]]

    def grid_for(self, placement: Placement, max_pixels: int) -> "DisplayGrid":
        """A grid on this page's CRS covering ``placement`` at about its own resolution, with at
        most ``max_pixels`` pixels a side (the similarity layer's lookup grid)."""
        transform, width, height = _north_up(placement, self.crs)
        f = max(1.0, max(width, height) / max_pixels)
        w, h = max(1, round(width / f)), max(1, round(height / f))
        return replace(self, transform=transform @ Affine.scale(width / w, height / h), width=w, height=h)


def _north_up(src: Placement, crs) -> tuple[Affine, int, int]:
    """The north-up grid GDAL would warp ``src`` onto in ``crs`` at about its resolution."""
    if src.crs is None:            # pixel coordinates: only rotations or flips of them
        left, bottom, right, top = src.bounds()
        t = src.transform
        res = min(math.hypot(t.a, t.d), math.hypot(t.b, t.e))
        width, height = max(1, round((right - left) / res)), max(1, round((top - bottom) / res))
        return Affine(res, 0, left, 0, -res, top), width, height
    if src.gcps is not None:
        transform, width, height = calculate_default_transform(src.crs, crs, src.width, src.height,
                                                               gcps=list(src.gcps))
    else:
        left, bottom, right, top = src.bounds()
        transform, width, height = calculate_default_transform(src.crs, crs, src.width, src.height, left=left,
                                                               bottom=bottom, right=right, top=top)
    return transform, int(width), int(height)


def check_placeable(where, placement: Placement, grid: DisplayGrid) -> None:
    """InputError unless rasters at ``placement`` can be drawn on ``grid`` (both georeferenced,
    or both not)."""
    if (placement.crs is None) != (grid.crs is None):
        if placement.crs is None:
            raise InputError(where, "no georeference (no CRS): cannot be placed over a georeferenced scene")
        raise InputError(where, "georeferenced, but the scene is not: cannot be placed over it")


def read_onto(ds, bands: Sequence[int], grid: DisplayGrid, resampling: Resampling,
              where=None) -> np.ndarray:
    """Bands of the open dataset ``ds`` on ``grid``: float32 ``[bands, h, w]``, NaN where invalid
    (GDAL's masks and nodata, NaN, or outside the raster). Read decimated (GDAL uses overviews),
    and warped only when the raster lies elsewhere than the grid."""
    placement = Placement.of(ds)
    check_placeable(where or ds.name, placement, grid)
    if placement.same_place(grid.placement):
        return _decimated(ds, bands, grid.width, grid.height, resampling)
    w, h = _read_size(placement, grid)
    source = _decimated(ds, bands, w, h, resampling)
    src = placement.decimated(w, h)
    out = np.full((len(bands), grid.height, grid.width), np.nan, np.float32)
    kw = dict(gcps=list(src.gcps)) if src.gcps is not None else dict(src_transform=src.transform)
    for i in range(len(bands)):
        reproject(source[i], out[i], src_crs=src.crs or STAND_IN, dst_crs=grid.crs or STAND_IN,
                  dst_transform=grid.transform, src_nodata=np.nan, dst_nodata=np.nan,
                  resampling=resampling, **kw)
    return out


def _read_size(src: Placement, grid: DisplayGrid) -> tuple[int, int]:
    """Pixels to read of ``src`` so that it is at least ``OVERSAMPLE`` times as fine as ``grid``
    where it lands (never more than the raster has)."""
    left, bottom, right, top = src.bounds()
    if src.crs is not None and grid.crs is not None and src.crs != grid.crs:
        left, bottom, right, top = transform_bounds(src.crs, grid.crs, left, bottom, right, top)
    rx, ry = grid.resolution
    across = max((right - left) / rx, (top - bottom) / ry, 1.0) * OVERSAMPLE
    f = max(1.0, max(src.width, src.height) / across)
    return max(1, round(src.width / f)), max(1, round(src.height / f))


def _decimated(ds, bands: Sequence[int], width: int, height: int, resampling: Resampling) -> np.ndarray:
    """``bands`` read at ``width`` x ``height`` (GDAL picks overviews), float32 with NaN where the
    dataset mask says nodata, or the value is NaN; scales and offsets of the file applied."""
    shape = (len(bands), height, width)
    data = ds.read(list(bands), out_shape=shape, resampling=resampling).astype(np.float32)
    masks = ds.read_masks(list(bands), out_shape=shape, resampling=Resampling.nearest)
    for i, b in enumerate(bands):
        scale, offset = ds.scales[b - 1], ds.offsets[b - 1]
        if scale not in (None, 1.0) or offset not in (None, 0.0):
            data[i] = data[i] * np.float32(scale or 1.0) + np.float32(offset or 0.0)
    data[masks == 0] = np.nan
    return data

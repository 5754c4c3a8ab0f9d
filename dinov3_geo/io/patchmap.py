"""Patch-token feature maps: one vector per 16 x 16 pixel cell, stitched across chips, streamed.

Cell ``(i, j)`` of a scene covers its pixels ``16i .. 16i+15`` (rows) by ``16j .. 16j+15``
(columns); the last row and column of cells may stick out of the scene. So that every chip's
tokens fall exactly on cells, chips are planned over the scene padded to whole cells
(:class:`CellPaddedScene`: the padding is a reflection, marked invalid) with an overlap that is a
multiple of 16; then every chip offset is a multiple of 16. :class:`PatchStitcher` turns each chip's
``[D, t, t]`` tokens into a cell window, blends overlapping chips with the dense outputs' cosine
weights averaged over each cell, and streams finished cell rows to a sink: :class:`ZarrFeatureSink`
(xarray/rioxarray conventions: ``features(band, y, x)``, ``spatial_ref`` with CRS and transform),
or a COG through :class:`~dinov3_geo.io.cog.COGSink` on a :class:`CellGrid`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from affine import Affine
from rasterio.windows import Window

from dinov3_geo.errors import InputError, OutputError, UsageError
from dinov3_geo.io.atomic import check_output
from dinov3_geo.io.features import PATCH, cell_valid
from dinov3_geo.io.shards import make_stitcher

#: Cell rows per Zarr chunk (all bands and columns of those rows in one chunk).
ZARR_CHUNK_ROWS = 64
FEATURES_VAR = "features"
ZARR_FORMAT = 2


def cells(pixels: int) -> int:
    """Cells needed to cover ``pixels`` pixels (the last one may stick out)."""
    return -(-int(pixels) // PATCH)


@dataclass(frozen=True)
class CellGrid:
    """The grid of 16-px cells of a scene: what a :class:`~dinov3_geo.io.cog.COGSink` needs."""

    crs: Any
    transform: Affine
    height: int
    width: int
    path: Optional[str] = None
    resampled: bool = False

    @classmethod
    def of(cls, scene) -> "CellGrid":
        """The cell grid of ``scene`` (its transform scaled by 16, sides rounded up)."""
        return cls(scene.crs, scene.transform @ Affine.scale(PATCH), cells(scene.height), cells(scene.width))

    @property
    def input_profile(self) -> dict:
        return {"crs": self.crs, "transform": self.transform, "width": self.width, "height": self.height}


class CellPaddedScene:
    """A scene seen padded at the bottom and right to whole 16-px cells.

    ``read(window)`` reads the part inside the scene and fills the rest by reflection (as chips are
    padded to the tile), with ``valid`` False there. Everything else is the scene's.
    """

    def __init__(self, scene):
        self.scene = scene
        self.height, self.width = cells(scene.height) * PATCH, cells(scene.width) * PATCH

    def __getattr__(self, name: str):
        return getattr(self.scene, name)

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        r, c, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
        inside = Window(c, r, min(w, self.scene.width - c), min(h, self.scene.height - r))
        chip, valid = self.scene.read(inside)
        ph, pw = h - int(inside.height), w - int(inside.width)
        if ph == 0 and pw == 0:
            return chip, valid
        mode = "reflect" if min(chip.shape[-2:]) > max(ph, pw) else "symmetric"
        chip = np.pad(chip, [(0, 0), (0, ph), (0, pw)], mode=mode)
        return chip, np.pad(valid, [(0, ph), (0, pw)], constant_values=False)


def check_patch_overlap(overlap: int) -> None:
    """Patch features need chip offsets on whole cells: ``overlap`` a multiple of 16."""
    if int(overlap) % PATCH:
        raise UsageError("overlap", f"patch features need an overlap that is a multiple of {PATCH}, got {overlap}")


def cell_window(window: Window) -> Window:
    """The cells of a pixel window whose offsets are multiples of 16."""
    r, c, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
    if r % PATCH or c % PATCH:
        raise UsageError("window", f"chip {window} does not start on a 16-px cell")
    return Window(c // PATCH, r // PATCH, cells(w), cells(h))


def cell_weights(pixel_weights: np.ndarray) -> np.ndarray:
    """Blend weights ``[h, w]`` (sides multiples of 16) averaged over each cell, float32."""
    h, w = pixel_weights.shape
    return pixel_weights.reshape(h // PATCH, PATCH, w // PATCH, PATCH).mean(axis=(1, 3), dtype=np.float64
                                                                          ).astype(np.float32)


class CellPlan:
    """A chip plan (:class:`~dinov3_geo.io.tiling.ChipPlan` over the cell-padded scene) seen at
    cell resolution, as the stitcher takes it: ``height``, ``width``, ``tile``, ``overlap`` and
    ``windows`` in cells, and ``weights(cell_window)`` the chip's pixel weights averaged over each cell."""

    def __init__(self, plan):
        self.height, self.width = cells(plan.height), cells(plan.width)
        self.tile, self.overlap = cells(plan.tile), int(plan.overlap) // PATCH
        windows, pixel_weights = plan.windows, plan.weights
        self._pixel = {}
        for w in windows:
            self._pixel[_key(cell_window(w))] = w
        self.windows = tuple(cell_window(w) for w in windows)
        self._pixel_weights = pixel_weights
        self._cache: dict[tuple, np.ndarray] = {}

    def pixel_window(self, cell_win: Window) -> Window:
        return self._pixel[_key(cell_win)]

    def weights(self, cell_win: Window) -> np.ndarray:
        key = _key(cell_win)
        if key not in self._cache:
            weights = cell_weights(np.asarray(self._pixel_weights(self._pixel[key])))
            weights.setflags(write=False)
            self._cache[key] = weights
        return self._cache[key]


def _key(window: Window) -> tuple[int, int, int, int]:
    return int(window.row_off), int(window.col_off), int(window.height), int(window.width)


class PatchStitcher:
    """Pipeline consumer of ``[D, t, t]`` patch tokens: blends them at cell resolution and streams
    finished cell rows to ``sink.write(row_off, [D, rows, width])``.

    ``plan`` is the chip plan over the cell-padded scene (:class:`CellPaddedScene`), whose offsets
    are all multiples of 16.
    """

    def __init__(self, sink, plan, channels: int):
        self.plan = CellPlan(plan)
        self.blender = make_stitcher(sink, self.plan, channels)     # many channels: over several threads

    def add(self, window: Window, tokens: np.ndarray, valid: np.ndarray) -> None:
        cw = cell_window(window)
        h, w = int(cw.height), int(cw.width)
        self.blender.add(cw, np.asarray(tokens, np.float32)[:, :h, :w], cell_valid(valid)[:h, :w])

    def skip(self, window: Window) -> None:
        self.blender.skip(cell_window(window))

    def close(self) -> None:
        self.blender.close()

    def abort(self) -> None:
        stop = getattr(self.blender, "abort", None)
        if stop is not None:
            stop()


class ZarrFeatureSink:
    """Streams cell rows into a Zarr store readable as a georeferenced xarray DataArray.

    The store holds ``features`` (band, y, x) float32 with NaN nodata, coordinates ``x``/``y`` (cell
    centres), ``spatial_ref`` (CRS and GeoTransform, rioxarray's convention), GDAL's ``_CRS``
    attribute on ``features`` (:func:`gdal_crs_attribute`) and the attributes given (backbone id,
    ...). Rows are buffered into whole chunks of ``ZARR_CHUNK_ROWS`` rows. It is written under a
    hidden temporary name and moved onto ``path`` by a clean ``__exit__``; an exception removes it.
    Open with :func:`open_features`.
    """

    def __init__(self, path, grid: CellGrid, channels: int, attrs: dict, overwrite: bool = False,
                 band_names: Optional[list[str]] = None, inputs=()):
        self.path = check_output(path, overwrite, inputs=list(inputs))
        self.grid, self.channels, self.attrs, self.overwrite = grid, int(channels), dict(attrs), overwrite
        self.band_names = band_names
        self._tmp: Optional[Path] = None
        self._array = None
        self._buffer: list[np.ndarray] = []
        self._buffer_row = 0        # first row of the buffer
        self._next_row = 0          # rows [0, _next_row) are in the store

    def __enter__(self) -> "ZarrFeatureSink":
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.partial-", dir=self.path.parent))
        try:
            self._create()
        except BaseException:
            self.abort()
            raise
        return self

    def _create(self) -> None:
        import dask.array as da
        import zarr

        template = features_dataarray(da.full((self.channels, self.grid.height, self.grid.width), np.nan,
                                              dtype="float32",
                                              chunks=(self.channels, ZARR_CHUNK_ROWS, self.grid.width)),
                                      self.grid, self.band_names)
        ds = template.to_dataset(name=FEATURES_VAR)
        ds.attrs.update(self.attrs)
        if self.grid.crs is not None:
            ds[FEATURES_VAR].attrs["_CRS"] = gdal_crs_attribute(self.grid.crs)
        # Zarr v2 with consolidated metadata: what GDAL, QGIS and older xarray read too
        ds.to_zarr(self._tmp, mode="w", compute=False, consolidated=True, zarr_format=ZARR_FORMAT)
        array = zarr.open_group(self._tmp, mode="r+", zarr_format=ZARR_FORMAT)[FEATURES_VAR]
        # every chunk stored, all-nodata ones too: a missing chunk then means a damaged store
        self._array = array.with_config({"write_empty_chunks": True})

    def write(self, row_off: int, array: np.ndarray) -> None:
        """Take cell rows ``[channels, rows, width]`` starting at ``row_off`` (in order)."""
        if row_off != self._buffer_row + sum(b.shape[1] for b in self._buffer):
            raise OutputError(self.path, f"rows must arrive in order: got {row_off}")
        self._buffer.append(np.asarray(array, np.float32))
        self._drain(final=False)

    def _drain(self, final: bool) -> None:
        have = sum(b.shape[1] for b in self._buffer)
        end = self._buffer_row + have
        take = have if final else (end // ZARR_CHUNK_ROWS) * ZARR_CHUNK_ROWS - self._buffer_row
        if take <= 0:
            return
        block = np.concatenate(self._buffer, axis=1)
        self._array[:, self._buffer_row:self._buffer_row + take, :] = block[:, :take]
        rest = block[:, take:]
        self._buffer = [rest] if rest.shape[1] else []
        self._buffer_row += take
        self._next_row = self._buffer_row

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self._drain(final=True)
            if self._next_row < self.grid.height:
                raise OutputError(self.path, f"only {self._next_row} of {self.grid.height} rows were written")
            if self.path.exists():
                if not self.overwrite:
                    raise OutputError(self.path, "appeared while writing (use `overwrite` to replace it)")
                _remove_tree(self.path)
            os.replace(self._tmp, self.path)
            self._tmp = None
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Remove the temporary store (the target is untouched)."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def gdal_crs_attribute(crs) -> dict:
    """GDAL's Zarr ``_CRS`` attribute of ``crs`` (WKT2, PROJJSON and, with an EPSG code, its OGC
    URL): GDAL and QGIS before 3.8 read the CRS of a Zarr array from it, not from the CF
    ``grid_mapping`` variable (``spatial_ref``) that xarray and rioxarray use."""
    from pyproj import CRS

    crs = CRS.from_user_input(crs)
    attribute = {"wkt": crs.to_wkt(), "projjson": crs.to_json_dict()}
    epsg = crs.to_epsg()
    if epsg is not None:
        attribute["url"] = f"http://www.opengis.net/def/crs/EPSG/0/{epsg}"
    return attribute


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def features_dataarray(data, grid: CellGrid, band_names: Optional[list[str]] = None):
    """``data`` ``[D, y, x]`` (numpy or dask) as a DataArray on ``grid``: cell-centre coordinates,
    CRS and transform written the rioxarray way, NaN nodata."""
    import rioxarray  # noqa: F401  (registers .rio)
    import xarray as xr

    t = grid.transform
    ys = t.f + t.e * (np.arange(grid.height) + 0.5)     # cell centres (north-up grids)
    xs = t.c + t.a * (np.arange(grid.width) + 0.5)
    out = xr.DataArray(data, dims=("band", "y", "x"), name=FEATURES_VAR,
                       coords={"band": np.arange(1, data.shape[0] + 1), "y": ys, "x": xs})
    if band_names:
        out.attrs["long_name"] = list(band_names)
    if grid.crs is not None:
        out = out.rio.write_crs(grid.crs)
    return out.rio.write_transform(t).rio.write_nodata(np.nan, encoded=False)


def open_features(path):
    """A features file (Zarr store from ``embed(patch=True)``, or a GeoTIFF) as a lazy DataArray
    ``(band, y, x)`` with its CRS and transform (``.attrs`` carry the backbone id)."""
    import rioxarray
    import xarray as xr

    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    try:
        if path.is_dir():
            ds = xr.open_zarr(path, decode_coords="all")
            da = ds[FEATURES_VAR]
            da.attrs.update(ds.attrs)
            return da
        return rioxarray.open_rasterio(path, masked=True, chunks={"band": -1, "y": 512, "x": 512})
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(path, f"not a features file ({exc})") from None

"""One way in for every kind of scene a route is given: a path, a rioxarray DataArray, or a
reader already open, each read through the pixel contract (:mod:`dinov3_geo.io.pixels`)."""
from __future__ import annotations

import contextlib
import sys
import warnings

from affine import Affine

from dinov3_geo.errors import DinoGeoWarning, InputError, UsageError
from dinov3_geo.io.dataarray import DataArrayScene
from dinov3_geo.io.scene import open_scene


def is_dataarray(scene) -> bool:
    """Whether ``scene`` is an xarray DataArray (without importing xarray)."""
    xr = sys.modules.get("xarray")
    return xr is not None and isinstance(scene, xr.DataArray)


@contextlib.contextmanager
def scene_reader(scene, reading=None, grid: dict | None = None):
    """An open scene reader for ``scene`` read as ``reading`` (a
    :class:`~dinov3_geo.options.ReadOptions`) says: a path is opened with :func:`open_scene`, a
    rioxarray DataArray is read through the same pixel contract
    (:class:`~dinov3_geo.io.dataarray.DataArrayScene`), and an object that reads already (a
    :class:`Scene`, or anything with ``read(window)``, ``height``, ``width``, ``crs`` and
    ``transform``) is used as it is. The reader's warnings (band choice, no georeference...) are
    issued once, here, as :class:`DinoGeoWarning`; what this opened is closed after. ``grid``:
    another scene's ``input_profile`` to read this one on (see :func:`open_scene`)."""
    options = reading.scene_options() if reading is not None else {}
    given = sorted(k for k, v in options.items() if v is not None and k != "max_upsample")
    if hasattr(scene, "read") and hasattr(scene, "height"):
        if given:
            raise UsageError(given[0], f"{', '.join(given)} are set when a scene is opened; pass a path")
        yield scene
        return
    if is_dataarray(scene):
        if options.get("gsd") is not None:
            raise UsageError("gsd", "resampling to a gsd needs a file; resample the DataArray first (rio.reproject)")
        opened = DataArrayScene(scene, options.get("bands"), options.get("scale"), options.get("nodata"))
        if grid is not None and not _same_grid(opened.input_profile, grid):
            opened.close()
            raise InputError(opened.path, "not on the first scene's grid: reproject it first (rio.reproject_match)")
    else:
        opened = open_scene(scene, grid=grid, **options)
    with contextlib.closing(opened):
        for text in opened.warnings:          # band choice, no georeference, ...: said once, here
            warnings.warn(text, DinoGeoWarning, stacklevel=3)
        yield opened


def _same_grid(a: dict, b: dict) -> bool:
    return a["crs"] == b["crs"] and (a["width"], a["height"]) == (b["width"], b["height"]) and \
        Affine(*tuple(a["transform"])[:6]).almost_equals(Affine(*tuple(b["transform"])[:6]))

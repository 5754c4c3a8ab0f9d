"""What an output says about where it lies: the input's georeference, or honestly none.

A raster with no CRS, no geotransform and no ground control points (a Chesapeake training chip, a
photo) is read by GDAL with the identity transform, pixel rows going *down*. Writing that identity
into an output would be a claim the input never made, and a wrong one in QGIS: QGIS (like GDAL's
warper) places a raster without a geotransform at x = column, y = -row, but one with an explicit
identity at y = +row, upside down against its input. So outputs of such inputs carry no
geotransform and no CRS either (:func:`georeference_profile`); their vectors use QGIS's placement of
the input (:func:`vector_transform`) and pixel units for areas (:data:`PIXEL_AREA`).
"""
from __future__ import annotations

from typing import Any, Optional

from affine import Affine

#: Column of polygon areas in true square metres (georeferenced outputs) ...
AREA_M2 = "area_m2"
#: ... and in pixels of the input (outputs of an input without CRS: no metres to speak of).
PIXEL_AREA = "area_px"

#: Where GIS tools draw a raster without a geotransform: x = column, y = -row.
UNGEOREFERENCED_PLACEMENT = Affine(1.0, 0.0, 0.0, 0.0, -1.0, 0.0)

#: GDAL drivers of picture formats: such a file without any georeference is most likely a photo.
PICTURE_DRIVERS = {"JPEG": "JPEG", "PNG": "PNG", "GIF": "GIF", "BMP": "BMP", "WEBP": "WebP", "HEIF": "HEIF",
                   "AVIF": "AVIF", "JPEGXL": "JPEG XL"}


def is_pixel_grid(crs: Any, transform: Affine) -> bool:
    """Whether a grid has no georeference: no CRS and a transform that only scales pixel indexes
    (GDAL's identity for a file without geotransform, or a coarser grid derived from it, such as
    16-px cells). A real geotransform has an origin or north-up rows (negative pixel height)."""
    t = Affine(*tuple(transform)[:6])
    return crs is None and t.b == 0 and t.d == 0 and t.c == 0 and t.f == 0 and t.a > 0 and t.e > 0


def georeference_profile(crs: Any, transform: Affine) -> dict:
    """The ``crs`` and ``transform`` entries of a rasterio profile for an output on this grid:
    both as they are, or none for a grid without georeference (see :func:`is_pixel_grid`), so the
    output has no geotransform, as its input had none."""
    if is_pixel_grid(crs, transform):
        return {}
    return {"crs": crs, "transform": transform}


def vector_transform(crs: Any, transform: Affine) -> Affine:
    """The pixel-to-map transform for vectors of a grid: ``transform``, or for a grid without
    georeference the placement GIS tools give its raster (x = column, y = -row, in input pixels;
    a coarser pixel grid keeps its scale), so polygons lie on the image in QGIS."""
    if not is_pixel_grid(crs, transform):
        return transform
    t = Affine(*tuple(transform)[:6])
    return Affine(t.a, 0.0, 0.0, 0.0, -t.e, 0.0)


def area_column(crs: Any) -> str:
    """The name of the polygon area column: ``area_m2``, or ``area_px`` without a CRS."""
    return AREA_M2 if crs is not None else PIXEL_AREA


def has_georeference(ds) -> bool:
    """Whether the open rasterio dataset ``ds`` has a CRS, a geotransform or ground control points."""
    gcps, _ = ds.gcps
    return ds.crs is not None or bool(gcps) or not is_pixel_grid(None, ds.transform)


def input_note(ds, path: str) -> Optional[str]:
    """The one line to tell about an input without a CRS, or None: what its outputs carry (no
    georeference, pixel units, ``area_px``) and, for a picture file (JPEG, PNG...) with no
    georeference at all, that it looks like a photo rather than a map."""
    gcps, gcp_crs = ds.gcps
    if ds.crs is not None or (gcps and gcp_crs is not None):
        return None
    if has_georeference(ds):
        return (f"{path}: no CRS: outputs keep its geotransform without a CRS; polygon areas are in "
                f"pixels ({PIXEL_AREA})")
    picture = PICTURE_DRIVERS.get(ds.driver)
    if picture is not None:
        return (f"{path}: a {picture} picture with no georeference (no CRS, world file or ground control "
                f"points): a photo rather than a map? It is run in pixel units (areas in {PIXEL_AREA}); "
                "give it a world file or run gdal_translate -a_srs/-a_ullr for map units")
    return (f"{path}: no georeference (no CRS, no geotransform): outputs carry none either (GIS tools "
            f"place them on the input); polygons are in pixel units, areas in pixels ({PIXEL_AREA})")

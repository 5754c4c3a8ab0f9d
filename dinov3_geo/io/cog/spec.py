"""What a COG holds, settled once by :class:`~dinov3_geo.io.cog.COGSink` and handed to either way of
writing it: the target, the scene's grid, bands, type, nodata, metadata and compression level."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from dinov3_geo.errors import OutputError
from dinov3_geo.io.cog.overviews import level_shapes
from dinov3_geo.io.georef import georeference_profile


@dataclass(frozen=True)
class COGSpec:
    """The result's ``count`` bands of ``dtype`` on ``scene``'s grid (working grid: rows arrive on
    it), to be published at ``path``. ``nbits`` 16 with float32: half floats in the file (GeoTIFF
    NBITS); ``zstd_level``: the final file's ZSTD level."""
    path: Path
    scene: Any
    count: int
    dtype: str
    nodata: float | None
    colormap: dict | None
    band_descriptions: list[str] | None
    tags: dict
    scales: tuple[float, ...] | None
    nbits: int | None
    zstd_level: int

    @property
    def height(self) -> int:
        return self.scene.height

    @property
    def width(self) -> int:
        return self.scene.width

    @property
    def resampled(self) -> bool:
        """Whether the rows are on a working grid other than the input's (written back at the end)."""
        return bool(getattr(self.scene, "resampled", False))

    @property
    def stored_dtype(self) -> str:
        """The type of the file's samples: float16 for float32 rows with ``nbits=16``."""
        return "float16" if self.dtype == "float32" and self.nbits == 16 else self.dtype

    @property
    def fill(self):
        """What pads partial blocks: the nodata number, else NaN (floats) or 0."""
        if self.nodata is not None and np.isfinite(self.nodata):
            return self.nodata
        return np.nan if np.dtype(self.dtype).kind == "f" else 0

    def levels(self) -> list[tuple[int, int]]:
        """(height, width) of the full resolution and of each overview on the working grid."""
        return level_shapes(self.height, self.width)

    def georeferenced_profile(self) -> dict:
        """Bands, type, nodata and georeferencing of the result: the scene's GCPs (unless it was
        resampled onto a working grid), else its CRS and transform (none when it has none)."""
        gcps = None if self.resampled else getattr(self.scene, "gcps", None)
        georef = georeference_profile(self.scene.crs, self.scene.transform) if gcps is None else dict(gcps=gcps)
        return dict(count=self.count, dtype=self.dtype, nodata=self.nodata, **georef)

    def describe(self, ds) -> None:
        """Colour table, tags, band scales and descriptions onto the open dataset ``ds``."""
        if self.colormap:
            ds.write_colormap(1, self.colormap)
        if self.tags:
            ds.update_tags(**self.tags)
        if self.scales:
            ds.scales = self.scales
            ds.offsets = (0.0,) * len(self.scales)
        for i, d in enumerate(self.band_descriptions or [], 1):
            ds.set_band_description(i, d)

    def check_metadata(self, cog: Path) -> None:
        """Fail if the colour table or band descriptions did not survive GDAL's COG driver."""
        if not (self.colormap or self.band_descriptions):
            return
        with rasterio.open(cog) as ds:
            lost = (self.colormap and not _has_colormap(ds)) or (
                self.band_descriptions and list(ds.descriptions) != self.band_descriptions)
        if lost:
            raise OutputError(self.path, "colour table or band descriptions were lost in the COG copy")


def _has_colormap(ds) -> bool:
    try:
        return bool(ds.colormap(1))
    except ValueError:
        return False

"""Cloud-Optimised GeoTIFFs written while the result streams in.

:class:`COGSink` is the one interface the pipeline and the stitchers write rows to; it picks one of
two write paths in :func:`write_path_for`: blocks encoded while streaming
(:mod:`~dinov3_geo.io.cog.streamed` over the block encoder :mod:`~dinov3_geo.io.cog.encoder`, bit
for bit what GDAL writes) or GDAL's COG copy of a temporary GeoTIFF
(:mod:`~dinov3_geo.io.cog.gdal_copy`). Overview arithmetic is in :mod:`~dinov3_geo.io.cog.overviews`,
GDAL's settings in :mod:`~dinov3_geo.io.cog.gdal`; publishing atomically in :mod:`dinov3_geo.io.atomic`.
"""
from dinov3_geo.io.cog.encoder import BLOCK
from dinov3_geo.io.cog.gdal import COG_ZSTD_LEVEL, GDAL_CACHE_MB, bounded_gdal_cache
from dinov3_geo.io.cog.gdal_copy import TEMP_RAW_MAX_BYTES, temp_creation_options
from dinov3_geo.io.cog.overviews import average_down, overview_count, overview_resampling
from dinov3_geo.io.cog.sink import COGSink, WritePath, write_path_for
from dinov3_geo.io.cog.streamed import STREAM_MAX_BANDS

__all__ = ["BLOCK", "COG_ZSTD_LEVEL", "COGSink", "GDAL_CACHE_MB", "STREAM_MAX_BANDS", "TEMP_RAW_MAX_BYTES",
           "WritePath", "average_down", "bounded_gdal_cache", "overview_count", "overview_resampling",
           "temp_creation_options", "write_path_for"]

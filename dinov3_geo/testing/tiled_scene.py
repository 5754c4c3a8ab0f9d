"""A large scene from a real sample: the sample repeated side by side in a GDAL VRT (no pixel copied,
its georeference extended), for trying and measuring things at scale without random pixels."""
from __future__ import annotations

import html
from pathlib import Path

import rasterio


def tiled_vrt(src, width: int, height: int, path) -> Path:
    """Write ``path``: a ``width`` x ``height`` VRT of ``src`` repeated from its top-left corner
    rightwards and downwards (cut at the edges), with ``src``'s CRS, pixel size and nodata."""
    src, path = Path(src).resolve(), Path(path)
    with rasterio.open(src) as ds:
        w, h, t, crs, nodata = ds.width, ds.height, ds.transform, ds.crs, ds.nodata
        types = ds.dtypes
    cols, rows = -(-width // w), -(-height // h)
    gdal_types = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32", "int32": "Int32",
                  "float32": "Float32", "float64": "Float64"}
    bands = []
    for b, dtype in enumerate(types, start=1):
        sources = "".join(
            f'<SimpleSource><SourceFilename relativeToVRT="0">{html.escape(str(src))}</SourceFilename>'
            f'<SourceBand>{b}</SourceBand><SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
            f'<DstRect xOff="{c * w}" yOff="{r * h}" xSize="{w}" ySize="{h}"/></SimpleSource>'
            for r in range(rows) for c in range(cols))
        nd = f"<NoDataValue>{nodata!r}</NoDataValue>" if nodata is not None else ""
        bands.append(f'<VRTRasterBand dataType="{gdal_types[dtype]}" band="{b}">{nd}{sources}</VRTRasterBand>')
    srs = f"<SRS>{html.escape(crs.to_wkt())}</SRS>" if crs is not None else ""
    geo = ", ".join(repr(v) for v in t.to_gdal())
    path.write_text(f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">{srs}<GeoTransform>{geo}'
                    f'</GeoTransform>{"".join(bands)}</VRTDataset>')
    return path

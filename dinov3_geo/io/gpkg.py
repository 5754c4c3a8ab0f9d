"""Writing GeoPackage layers as GDAL 3.6 and QGIS 3.22 read them without a warning: GeoPackage
1.2 (``PRAGMA user_version`` 10200 and the 1.2 R-tree triggers), whichever GDAL writes them."""
from __future__ import annotations

import pyogrio

#: The GeoPackage version every layer is written in (1.4, GDAL's default since 3.7, warns in 3.6).
GPKG_VERSION = "1.2"


def write_gpkg_layer(frame, path, layer: str, append: bool = False, **options) -> None:
    """Write ``frame`` (a GeoDataFrame, or a DataFrame for a table without geometry) as layer
    ``layer`` of the GeoPackage ``path`` (created as GeoPackage :data:`GPKG_VERSION` unless
    ``append``); ``options`` go to ``pyogrio.write_dataframe``."""
    dataset = {} if append else {"dataset_options": {"VERSION": GPKG_VERSION}}
    pyogrio.write_dataframe(frame, str(path), layer=layer, driver="GPKG", append=append, **dataset, **options)

"""What QGIS shows when each given output is dragged in: validity, CRS, extent, renderer and legend.

Run with the system Python that PyQGIS belongs to (not the project's virtual environment), e.g. on
Debian 12 after ``apt-get install qgis python3-qgis qgis-providers gdal-bin``::

    QT_QPA_PLATFORM=offscreen /usr/bin/python3 tools/look_in_qgis.py canopy.tif canopy.gpkg units.tif

Layers are created as QGIS creates them for a dropped file (default styles loaded: a raster's
``<name>.qml``, a GeoPackage layer's ``layer_styles`` row); each layer of a vector file is listed as
QGIS's sub-layer chooser lists it. A manual check, not a test: CI has no QGIS.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from qgis.core import QgsApplication, QgsRasterLayer, QgsVectorLayer  # noqa: E402

SEPARATOR = "!!::!!"        # of QgsVectorDataProvider.subLayers() entries: index, name, count, type...
VECTOR_SUFFIXES = (".gpkg", ".fgb", ".parquet", ".shp", ".geojson")


def crs_text(layer) -> str:
    crs = layer.crs()
    return crs.authid() or (crs.description() if crs.isValid() else "none")


def vector_uris(path: str) -> list[str]:
    """The layers QGIS offers for ``path`` (one URI per sub-layer when there are several)."""
    probe = QgsVectorLayer(path, "probe", "ogr")
    names = [entry.split(SEPARATOR)[1] for entry in probe.dataProvider().subLayers()] if probe.isValid() else []
    return [f"{path}|layername={name}" for name in names] if len(names) > 1 else [path]


def legend(items: list, most: int = 8) -> str:
    return f"{items[:most]}{' ...' if len(items) > most else ''}"


def show_vector(uri: str) -> None:
    layer = QgsVectorLayer(uri, os.path.basename(uri), "ogr")
    print(f"vector {uri}: valid={layer.isValid()} crs={crs_text(layer)} features={layer.featureCount()} "
          f"extent={layer.extent().toString(1)}")
    renderer = layer.renderer()
    if renderer is None:
        return
    if renderer.type() == "categorizedSymbol":
        items = [(c.label(), c.symbol().color().name()) for c in renderer.categories()]
        print(f"  categorised by {renderer.classAttribute()}: {legend(items)}")
    elif renderer.type() == "graduatedSymbol":
        items = [(r.label(), r.symbol().color().name()) for r in renderer.ranges()]
        print(f"  graduated by {renderer.classAttribute()}: {legend(items)}")
    else:
        print(f"  {renderer.type()} (QGIS's default: no style)")


def show_raster(path: str) -> None:
    layer = QgsRasterLayer(path, os.path.basename(path))
    print(f"raster {path}: valid={layer.isValid()} crs={crs_text(layer)} size={layer.width()}x{layer.height()} "
          f"bands={layer.bandCount()} extent={layer.extent().toString(1)}")
    if not layer.isValid():
        return
    items = [(name, colour.name()) for name, colour in layer.renderer().legendSymbologyItems()]
    provider = layer.dataProvider()
    value = provider.identify(layer.extent().center(), 1).results().get(1)      # 1: QgsRaster.IdentifyFormatValue
    print(f"  {layer.renderer().type()}: {legend(items)}; value at the centre {value!r} "
          f"(band scale {provider.bandScale(1)}, offset {provider.bandOffset(1)})")


def main(paths: list[str]) -> None:
    app = QgsApplication([], False)
    app.initQgis()
    for path in paths:
        if path.lower().endswith(VECTOR_SUFFIXES):
            for uri in vector_uris(path):
                show_vector(uri)
        else:
            show_raster(path)
    app.exitQgis()


if __name__ == "__main__":
    main(sys.argv[1:])

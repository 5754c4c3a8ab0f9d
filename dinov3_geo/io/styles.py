"""QGIS styles that travel with the outputs, so a dragged-in file draws as it is meant to.

QGIS loads a raster's default style from the QML file beside it, named after the raster without
its extension (``landcover.tif`` -> ``landcover.qml``), and a GeoPackage layer's from the
``layer_styles`` table of its file (the table QGIS itself writes with "Save as default"). Both are
written here from facts the outputs carry:

* class rasters (uint8 with a colour table; the names in ``CLASS_<value>`` tags) and cluster
  units: a paletted renderer whose legend shows every class's name in its colour
  (:func:`write_raster_style`);
* canopy heights (a band named ``*_height_m``): a pseudocolour ramp over 0-40 m;
* canopy polygons: graduated by ``mean_height_m`` over the same height classes; class polygons and
  cluster units: categorised by ``class`` with the class colours; chip classifications:
  categorised by ``class`` (:func:`write_layer_style`).

The QML is QGIS 3.22's (both the ``Option`` maps and the older ``prop`` lists of symbol layers, as
QGIS 3.16-3.26 write them), read by later versions as well. Files are plain XML: nothing here
needs QGIS.
"""
from __future__ import annotations

import colorsys
import datetime
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional, Sequence

import rasterio

from dinov3_geo.io.atomic import atomic_output
from dinov3_geo.io.gpkg import write_gpkg_layer

QGIS_VERSION = "3.22.16-Białowieża"
#: Marks the files written here: a QML without it is the user's own and is never replaced.
MARK = "dinov3-geo"
#: Height classes of canopy styles (m): fixed, so scenes and their mosaic share one legend.
HEIGHT_BREAKS = (0.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0)
#: Colours of the height classes, low to high (ColorBrewer YlGn, 7 classes).
HEIGHT_COLOURS = ((255, 255, 204), (217, 240, 163), (173, 221, 142), (120, 198, 121), (65, 171, 93),
                  (35, 132, 67), (0, 90, 50))
#: Above this (m) a height is drawn in the top class's colour (the last graduated range ends here).
HEIGHT_TOP = 1000.0
STYLES_TABLE = "layer_styles"


# -- colours and names of a class table --------------------------------------------------------

def class_table(names: Sequence[str], colours: Optional[dict] = None) -> list[tuple[int, str, tuple]]:
    """``[(value, name, (r, g, b, a))]`` for classes ``0..len(names)-1``: the colours given, else
    evenly spaced hues."""
    table = []
    for value, name in enumerate(names):
        colour = tuple(colours[value]) if colours and value in colours else _hue(value, len(names))
        table.append((value, str(name), (tuple(int(c) for c in colour) + (255,))[:4]))
    return table


def _hue(i: int, n: int) -> tuple[int, int, int, int]:
    r, g, b = colorsys.hls_to_rgb(i / max(n, 1), 0.5, 0.65)
    return int(r * 255), int(g * 255), int(b * 255), 255


def raster_classes(ds, names: Optional[Sequence[str]] = None) -> Optional[list[tuple[int, str, tuple]]]:
    """The class table of an open class raster (uint8, one band, a colour table): values with a
    ``CLASS_<value>`` tag, or without any the colour table's opaque entries, with their names
    (the tags, else ``names`` by value, else the value) and colours. None for any other raster."""
    if ds.count != 1 or ds.dtypes[0] != "uint8":
        return None
    try:
        colours = ds.colormap(1)
    except ValueError:          # no colour table
        return None
    tagged = {int(k[6:]): v for k, v in ds.tags().items() if k.startswith("CLASS_") and k[6:].isdigit()}
    values = sorted(tagged) or [v for v, c in colours.items() if v != ds.nodata and (len(c) < 4 or c[3])]
    names = list(names or [])
    return [(v, tagged.get(v, names[v] if v < len(names) else str(v)), tuple(colours.get(v, _hue(v, len(values)))))
            for v in values]


def height_band(ds) -> bool:
    """Whether an open raster is a single band of heights in metres (named ``*_height_m``)."""
    return ds.count == 1 and (ds.descriptions[0] or "").endswith("_height_m")


# -- QML documents ------------------------------------------------------------------------------

def _document(layer_kind: str) -> ET.Element:
    """The root ``<qgis>`` element of a style for a layer of ``layer_kind`` (raster, vector)."""
    attrs = {"version": QGIS_VERSION, "styleCategories": "Symbology", "hasScaleBasedVisibilityFlag": "0",
             "minScale": "1e+08", "maxScale": "0"}
    root = ET.Element("qgis", attrs)
    ET.SubElement(root, "customproperties").append(_option_map({"dinov3geo/style": MARK}))
    if layer_kind == "vector":
        root.set("simplifyDrawingHints", "1")
    return root


def _text(root: ET.Element) -> str:
    ET.indent(root)
    return "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + ET.tostring(root, encoding="unicode") + "\n"


def hex_colour(colour: Sequence[int]) -> str:
    """``#rrggbb`` of an RGB(A) colour."""
    return "#{:02x}{:02x}{:02x}".format(*[int(c) for c in colour[:3]])


def _rgba(colour: Sequence[int], alpha: Optional[int] = None) -> str:
    r, g, b = (int(c) for c in colour[:3])
    a = alpha if alpha is not None else (int(colour[3]) if len(colour) > 3 else 255)
    return f"{r},{g},{b},{a}"


def _raster_pipe(root: ET.Element, renderer: ET.Element) -> None:
    pipe = ET.SubElement(root, "pipe")
    pipe.append(renderer)
    ET.SubElement(pipe, "brightnesscontrast", brightness="0", contrast="0", gamma="1")
    ET.SubElement(pipe, "huesaturation", saturation="0", grayscaleMode="0", colorizeOn="0",
                  colorizeRed="255", colorizeGreen="128", colorizeBlue="128", colorizeStrength="100")
    ET.SubElement(pipe, "rasterresampler", maxOversampling="2")
    ET.SubElement(root, "blendMode").text = "0"


def paletted_qml(classes: Sequence[tuple[int, str, tuple]]) -> str:
    """A raster style: band 1 paletted, one legend entry per ``(value, name, colour)``."""
    root = _document("raster")
    renderer = ET.Element("rasterrenderer", type="paletted", band="1", opacity="1", alphaBand="-1",
                          nodataColor="")
    ET.SubElement(renderer, "rasterTransparency")
    palette = ET.SubElement(renderer, "colorPalette")
    for value, name, colour in classes:
        alpha = str(int(colour[3])) if len(colour) > 3 else "255"
        ET.SubElement(palette, "paletteEntry", value=str(value), color=hex_colour(colour), alpha=alpha, label=name)
    _raster_pipe(root, renderer)
    return _text(root)


def height_ramp_qml(unit: str = "m") -> str:
    """A raster style: band 1 as a pseudocolour ramp over :data:`HEIGHT_BREAKS` (higher values in
    the top colour), labelled in ``unit``."""
    root = _document("raster")
    low, high = HEIGHT_BREAKS[0], HEIGHT_BREAKS[-1]
    renderer = ET.Element("rasterrenderer", type="singlebandpseudocolor", band="1", opacity="1", alphaBand="-1",
                          classificationMin=repr(low), classificationMax=repr(high), nodataColor="")
    ET.SubElement(renderer, "rasterTransparency")
    limits = ET.SubElement(renderer, "minMaxOrigin")
    for tag, text in (("limits", "None"), ("extent", "WholeRaster"), ("statAccuracy", "Estimated"),
                      ("cumulativeCutLower", "0.02"), ("cumulativeCutUpper", "0.98"), ("stdDevFactor", "2")):
        ET.SubElement(limits, tag).text = text
    shader = ET.SubElement(ET.SubElement(renderer, "rastershader"), "colorrampshader", colorRampType="INTERPOLATED",
                           classificationMode="1", clip="0", minimumValue=repr(low), maximumValue=repr(high),
                           labelPrecision="0")
    for value, colour in zip(HEIGHT_BREAKS, HEIGHT_COLOURS):
        ET.SubElement(shader, "item", value=repr(value), color=hex_colour(colour), alpha="255",
                      label=f"{value:g} {unit}" if value < high else f"{value:g} {unit} and more")
    _raster_pipe(root, renderer)
    return _text(root)


def _option_map(values: dict) -> ET.Element:
    """QGIS's ``<Option type="Map">`` of string values."""
    node = ET.Element("Option", type="Map")
    for key, value in values.items():
        ET.SubElement(node, "Option", name=key, value=str(value), type="QString")
    return node


def _fill_symbol(name: str, colour: Sequence[int], outline: Sequence[int], outline_style: str = "solid",
                 alpha: Optional[int] = None) -> ET.Element:
    """A fill symbol of one SimpleFill layer (``Option`` map and ``prop`` list, as QGIS 3.22 writes)."""
    symbol = ET.Element("symbol", type="fill", name=name, alpha="1", clip_to_extent="1", force_rhr="0")
    layer = ET.SubElement(symbol, "layer", {"class": "SimpleFill", "enabled": "1", "locked": "0", "pass": "0"})
    props = {"border_width_map_unit_scale": "3x:0,0,0,0,0,0", "color": _rgba(colour, alpha), "joinstyle": "bevel",
             "offset": "0,0", "offset_map_unit_scale": "3x:0,0,0,0,0,0", "offset_unit": "MM",
             "outline_color": _rgba(outline), "outline_style": outline_style, "outline_width": "0.1",
             "outline_width_unit": "MM", "style": "solid"}
    layer.append(_option_map(props))
    for key, value in props.items():
        ET.SubElement(layer, "prop", k=key, v=value)
    return symbol


def _darker(colour: Sequence[int]) -> tuple[int, int, int, int]:
    return tuple(int(c * 0.6) for c in colour[:3]) + (255,)


def categorised_qml(attribute: str, categories: Sequence[tuple[object, str, tuple]], outline: bool = False,
                    alpha: Optional[int] = None) -> str:
    """A polygon style categorised by ``attribute``: one symbol per ``(value, label, colour)``
    (fill ``alpha`` 0-255, default opaque; with ``outline``, a darker border of each colour)."""
    root = _document("vector")
    renderer = ET.SubElement(root, "renderer-v2", type="categorizedSymbol", attr=attribute, symbollevels="0",
                             enableorderby="0", forceraster="0", referencescale="-1")
    cats, symbols = ET.SubElement(renderer, "categories"), ET.SubElement(renderer, "symbols")
    for i, (value, label, colour) in enumerate(categories):
        ET.SubElement(cats, "category", value=str(value), label=str(label), symbol=str(i), render="true")
        symbols.append(_fill_symbol(str(i), colour, _darker(colour), "solid" if outline else "no", alpha))
    return _text(root)


def graduated_heights_qml(attribute: str = "mean_height_m", unit: str = "m") -> str:
    """A polygon style graduated by ``attribute`` over the height classes of :data:`HEIGHT_BREAKS`."""
    root = _document("vector")
    renderer = ET.SubElement(root, "renderer-v2", type="graduatedSymbol", attr=attribute,
                             graduatedMethod="GraduatedColor", symbollevels="0", enableorderby="0",
                             forceraster="0", referencescale="-1")
    ranges, symbols = ET.SubElement(renderer, "ranges"), ET.SubElement(renderer, "symbols")
    uppers = HEIGHT_BREAKS[1:] + (HEIGHT_TOP,)
    for i, (lower, upper, colour) in enumerate(zip(HEIGHT_BREAKS, uppers, HEIGHT_COLOURS)):
        label = f"{lower:g} - {upper:g} {unit}" if upper < HEIGHT_TOP else f"{lower:g} {unit} and more"
        ET.SubElement(ranges, "range", lower=f"{lower:.6f}", upper=f"{upper:.6f}", label=label, symbol=str(i),
                      render="true")
        symbols.append(_fill_symbol(str(i), colour, _darker(colour)))
    ET.SubElement(renderer, "mode", name="fixed")
    return _text(root)


# -- writing ------------------------------------------------------------------------------------

def qml_path(output) -> Path:
    """Where QGIS looks for a raster's default style: beside it, its name without the extension."""
    output = Path(output)
    return output.with_name(output.stem + ".qml")


def is_ours(path: Path) -> bool:
    """Whether the style file ``path`` was written here (it carries :data:`MARK`)."""
    try:
        with open(path, encoding="utf-8") as f:
            return MARK in f.read(4096)
    except OSError:
        return False


def write_raster_style(output, class_names: Optional[Sequence[str]] = None) -> Optional[Path]:
    """Write the QML style beside the raster ``output`` (a COG or VRT) when it is a class raster
    (paletted: :func:`raster_classes`; ``class_names`` name values without a ``CLASS_`` tag) or a
    height band (a ramp); returns its path, or None (another raster, or a style of the user's
    own there: never replaced)."""
    with rasterio.open(output) as ds:
        classes = raster_classes(ds, class_names)
        heights = classes is None and height_band(ds)
    if classes is None and not heights:
        return None
    target = qml_path(output)
    if target.exists() and not is_ours(target):
        return None
    with atomic_output(target, overwrite=True) as tmp:
        tmp.write_text(paletted_qml(classes) if classes is not None else height_ramp_qml(), encoding="utf-8")
    return target


def layer_style(kind: str, classes: Optional[Sequence[tuple[int, str, tuple]]] = None) -> tuple[str, str]:
    """``(attribute, QML)`` of a layer of ``kind``: ``canopy`` (graduated by mean height),
    ``classes`` (polygons categorised by class value, ``classes`` giving names and colours) or
    ``chips`` (chip classifications categorised by class name, half transparent)."""
    if kind == "canopy":
        return "mean_height_m", graduated_heights_qml()
    if kind == "classes":
        return "class", categorised_qml("class", classes or [])
    if kind == "chips":
        return "class", categorised_qml("class", [(name, name, colour) for _, name, colour in classes or []],
                                        outline=True, alpha=150)
    raise ValueError(f"no style for layers of kind {kind!r}")


def write_layer_style(gpkg, layer: str, kind: str, classes: Optional[Sequence[tuple[int, str, tuple]]] = None,
                      geometry_column: str = "geom") -> None:
    """Make the style of ``kind`` (:func:`layer_style`) the default of ``layer`` in the GeoPackage
    ``gpkg``: a row of its ``layer_styles`` table (created as QGIS creates it: an attributes table
    of the GeoPackage), where QGIS finds it when the layer is opened."""
    _add_style_row(gpkg, layer, layer_style(kind, classes)[1], f"{MARK}: {kind}", geometry_column)


def _add_style_row(gpkg, layer: str, qml: str, description: str, geometry_column: str = "geom") -> None:
    """Append the default style ``qml`` of ``layer`` to the ``layer_styles`` table of ``gpkg``."""
    import pandas as pd


    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    row = {"f_table_catalog": "", "f_table_schema": "", "f_table_name": layer, "f_geometry_column": geometry_column,
           "styleName": layer, "styleQML": qml, "styleSLD": "", "useAsDefault": True, "description": description,
           "owner": "", "ui": "", "update_time": pd.Timestamp(now)}
    write_gpkg_layer(pd.DataFrame([row]), gpkg, STYLES_TABLE, append=os.path.exists(gpkg))


def layer_styles(gpkg) -> dict[str, str]:
    """``{layer: QML}`` of the default styles in the GeoPackage ``gpkg`` (empty without any)."""
    import pyogrio

    if STYLES_TABLE not in {name for name, _ in pyogrio.list_layers(gpkg)}:
        return {}
    rows = pyogrio.read_dataframe(gpkg, layer=STYLES_TABLE, read_geometry=False)
    rows = rows[rows["useAsDefault"].astype(bool)]
    return dict(zip(rows["f_table_name"], rows["styleQML"]))


def copy_layer_style(source, source_layer: str, target, target_layer: str) -> bool:
    """Give ``target_layer`` of the GeoPackage ``target`` the default style of ``source_layer`` in
    ``source`` (the same QML); False when the source has none."""
    qml = layer_styles(source).get(source_layer)
    if qml is None:
        return False
    _add_style_row(target, target_layer, qml, MARK)
    return True

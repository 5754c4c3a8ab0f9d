"""STAC Items beside the outputs and a Collection of a batch (pystac), read from the files.

Every output gets ``<output>.stac.json`` (a name no other file of a job takes: the resume sidecar
is ``<output>.json``), a STAC 1.1 Item whose facts come from the written file itself:

* rasters (COG, VRT): the projection extension (``proj:code`` EPSG or the WKT2, transform, shape,
  native bbox), the raster extension per band (nodata, data type, unit, scale and offset, pixel
  size), classes with names and colours (classification extension) for class rasters, the
  footprint in WGS 84;
* vector files (GeoPackage, FlatGeobuf, GeoParquet): the layers' CRS, bounds and feature counts;
* Zarr feature maps: their CRS, transform and shape;
* every file: the file extension (size; SHA-256 as a multihash for files), the input as a
  ``derived_from`` link, what made it (``dinov3:*`` properties: the backbone id, the weights'
  fingerprint or hash where known), and the QGIS style beside it as a ``style`` asset.

Outputs without georeference get an Item with no geometry (as STAC allows) and ``proj:code``
null. A batch adds a Collection (:func:`write_collection`) linking its Items.
"""
from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Iterable, Optional

import pystac
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.file import FileExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension

from dinov3_geo.io.atomic import atomic_output
from dinov3_geo.io.georef import is_pixel_grid
from dinov3_geo.io.patchmap import open_features
from dinov3_geo.io.scene import pixel_size_m
from dinov3_geo.io.styles import (
    STYLES_TABLE,
    hex_colour,
    raster_classes,
    write_raster_style,
)
from dinov3_geo.models.backbone import Backbone
from dinov3_geo.models.identity import backbone_id, file_sha256, weights_fingerprint

ITEM_SUFFIX = ".stac.json"
#: Media types of the outputs, by suffix.
MEDIA_TYPES = {".tif": pystac.MediaType.COG, ".tiff": pystac.MediaType.COG, ".vrt": "application/x-ogc-vrt+xml",
               ".gpkg": pystac.MediaType.GEOPACKAGE, ".fgb": pystac.MediaType.FLATGEOBUF,
               ".parquet": pystac.MediaType.PARQUET, ".zarr": pystac.MediaType.ZARR}
#: Extra properties are namespaced so that no STAC extension's names are taken.
PREFIX = "dinov3:"


def item_path(output) -> Path:
    """Where the Item of ``output`` lies: ``<output>.stac.json`` beside it."""
    output = Path(output)
    return output.with_name(output.name + ITEM_SUFFIX)


# -- facts of the files -------------------------------------------------------------------------

def _footprint(crs, bounds: tuple[float, float, float, float]) -> tuple[Optional[dict], Optional[list]]:
    """GeoJSON polygon and bbox in WGS 84 of ``bounds`` (left, bottom, right, top) in ``crs``
    (densified edges, so a UTM box stays true); ``(None, None)`` without a CRS."""
    if crs is None:
        return None, None
    from rasterio.warp import transform_geom
    from shapely.geometry import box, shape

    geometry = transform_geom(crs, "EPSG:4326", box(*bounds).__geo_interface__, precision=-1,
                              antimeridian_cutting=True)
    return geometry, [float(v) for v in shape(geometry).bounds]


def _projection(crs) -> dict:
    """``proj:code`` (``EPSG:n``) or, for a CRS without one, ``proj:wkt2``; null code without a CRS."""
    if crs is None:
        return {"code": None}
    epsg = crs.to_epsg()
    return {"code": f"EPSG:{epsg}"} if epsg else {"code": None, "wkt2": crs.to_wkt()}


def _unit(ds, band: int) -> Optional[str]:
    """A band's unit: the file's, else ``m`` for a band named ``*_m`` (``canopy_height_m``)."""
    unit = (ds.units[band] or "").strip()
    if unit:
        return unit
    return "m" if (ds.descriptions[band] or "").endswith("_m") else None


def raster_facts(path) -> dict:
    """What the Item of a raster says, read from the file: footprint, projection, bands, classes."""
    import rasterio
    from rasterio.transform import from_gcps


    with rasterio.open(path) as ds:
        gcps, gcp_crs = ds.gcps
        by_gcps = ds.crs is None and bool(gcps)     # placed by ground control points: no geotransform
        crs, transform = (gcp_crs, from_gcps(gcps)) if by_gcps else (ds.crs, ds.transform)
        placed = not is_pixel_grid(crs, transform)
        proj = {**_projection(crs), "shape": [ds.height, ds.width]}
        if placed and not by_gcps:
            proj.update(transform=[float(v) for v in tuple(transform)[:6]], bbox=[float(v) for v in ds.bounds])
        geometry, bbox = _footprint(crs, _grid_bounds(transform, ds.width, ds.height)) if placed else (None, None)
        size = pixel_size_m(crs, transform, ds.width, ds.height) if placed else None
        bands = [RasterBand.create(nodata=_nodata(ds.nodata), data_type=DataType(ds.dtypes[i]), unit=_unit(ds, i),
                                   scale=ds.scales[i], offset=ds.offsets[i],
                                   spatial_resolution=float(size[0]) if size else None)
                 for i in range(ds.count)]
        names = [d for d in ds.descriptions if d]
        classes = raster_classes(ds)
    return {"geometry": geometry, "bbox": bbox, "proj": proj, "bands": bands, "band_names": names,
            "classes": classes}


def _grid_bounds(transform, width: int, height: int) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of a grid, rotated ones included."""
    xs, ys = zip(*(transform @ (c, r) for c, r in ((0, 0), (width, 0), (width, height), (0, height))))
    return min(xs), min(ys), max(xs), max(ys)


def _nodata(value):
    """A nodata value as STAC writes it (NaN as the string ``nan``)."""
    if value is None:
        return None
    return "nan" if value != value else float(value)


def vector_facts(path) -> dict:
    """What the Item of a vector file says: per layer its CRS, bounds and feature count, and the
    footprint of them all in WGS 84 (the style table of a GeoPackage left out)."""
    import pyogrio
    import shapely
    from rasterio.crs import CRS


    layers, shapes, codes = [], [], set()
    infos = [_parquet_info(path)] if Path(path).suffix.lower() == ".parquet" else \
        [dict(pyogrio.read_info(path, layer=name, force_total_bounds=True), name=name)
         for name, geometry_type in pyogrio.list_layers(path) if name != STYLES_TABLE and geometry_type is not None]
    for info in infos:
        name = info["name"]
        crs = CRS.from_user_input(info["crs"]) if info.get("crs") else None
        bounds = info.get("total_bounds")
        layer = {"name": name, "features": int(info["features"]), "geometry_type": info.get("geometry_type"),
                 **{f"proj:{k}": v for k, v in _projection(crs).items()}}
        if bounds is not None and info["features"] and all(v == v for v in bounds):
            layer["bbox"] = [float(v) for v in bounds]
            geometry, _ = _footprint(crs, tuple(bounds))
            if geometry is not None:
                shapes.append(shapely.geometry.shape(geometry))
        codes.add(json.dumps(_projection(crs), sort_keys=True))
        layers.append(layer)
    geometry = shapely.union_all(shapes) if shapes else None
    return {"geometry": shapely.geometry.mapping(geometry) if geometry is not None else None,
            "bbox": [float(v) for v in geometry.bounds] if geometry is not None else None,
            "proj": json.loads(codes.pop()) if len(codes) == 1 else None, "layers": layers}


def _parquet_info(path) -> dict:
    """A GeoParquet file's layer as ``pyogrio.read_info`` describes one, from its ``geo`` metadata
    (read with pyarrow: GDAL's Parquet driver is not in every build)."""
    import pyarrow.parquet as pq

    meta = pq.read_metadata(path)
    geo = json.loads((meta.metadata or {}).get(b"geo", b"{}"))
    column = geo.get("columns", {}).get(geo.get("primary_column", "geometry"), {})
    crs = column.get("crs", "OGC:CRS84")          # GeoParquet: absent means OGC:CRS84, null none
    types = column.get("geometry_types") or [None]
    return {"name": Path(path).stem, "features": meta.num_rows, "geometry_type": types[0],
            "crs": json.dumps(crs) if isinstance(crs, dict) else crs, "total_bounds": column.get("bbox")}


def zarr_facts(path) -> dict:
    """What the Item of a Zarr feature map says: its CRS, transform, shape and bands."""
    feats = open_features(path)
    crs, transform = feats.rio.crs, feats.rio.transform()
    bands, height, width = (int(n) for n in feats.shape)
    proj = {**_projection(crs), "shape": [height, width]}
    if crs is not None:
        proj["transform"] = [float(v) for v in tuple(transform)[:6]]
    geometry, bbox = _footprint(crs, _grid_bounds(transform, width, height))
    raster = [RasterBand.create(nodata="nan", data_type=DataType.FLOAT32) for _ in range(bands)]
    return {"geometry": geometry, "bbox": bbox, "proj": proj, "bands": raster,
            "attrs": {k: v for k, v in feats.attrs.items() if isinstance(v, (str, int, float))}}


def _checksum(path: Path) -> Optional[str]:
    """SHA-256 of a file as a multihash (``1220`` + hex digest), None for a folder (Zarr)."""
    if path.is_dir():
        return None
    return "1220" + file_sha256(path)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _mtime(path: Path) -> dt.datetime:
    return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc)


def _acquired(source) -> Optional[dt.datetime]:
    """The acquisition time an input raster records (``TIFFTAG_DATETIME``, ``ACQUISITIONDATETIME``)."""
    if source is None or not os.path.isfile(source):
        return None
    import rasterio
    from rasterio.errors import RasterioError

    try:
        with rasterio.open(source) as ds:
            tags = ds.tags()
    except RasterioError:
        return None
    for key in ("ACQUISITIONDATETIME", "TIFFTAG_DATETIME"):
        text = tags.get(key)
        for fmt in ("%Y:%m:%d %H:%M:%S", "%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"):
            try:
                return dt.datetime.strptime(text or "", fmt).replace(tzinfo=dt.timezone.utc)
            except ValueError:
                continue
    return None


# -- the Item -----------------------------------------------------------------------------------

def build_item(output, source=None, properties: Optional[dict] = None) -> pystac.Item:
    """The STAC Item of the finished output ``output`` (see the module text); ``source`` is the
    input it was made from, or a list of them (each a ``derived_from`` link; the first one's
    acquisition time when it records one, else the output's time, is the Item's), ``properties``
    what made it (``dinov3:`` added to names without a prefix)."""
    sources = [s for s in (source if isinstance(source, (list, tuple)) else [source]) if s is not None]
    output = Path(output)
    kind = "zarr" if output.is_dir() else ("vector" if output.suffix.lower() in (".gpkg", ".fgb", ".parquet")
                                           else "raster")
    facts = {"raster": raster_facts, "vector": vector_facts, "zarr": zarr_facts}[kind](output)
    made = _mtime(output)
    props = {"created": made.isoformat().replace("+00:00", "Z")}
    props.update({(k if ":" in k else PREFIX + k): v for k, v in (properties or {}).items() if v is not None})
    item = pystac.Item(id=output.name, geometry=facts["geometry"], bbox=facts["bbox"],
                       datetime=(_acquired(sources[0]) if sources else None) or made, properties=props)
    asset = pystac.Asset(href=f"./{output.name}", media_type=MEDIA_TYPES.get(output.suffix.lower()),
                         roles=["data"], title=output.name)
    item.add_asset("data", asset)
    _describe_asset(item, asset, facts, output)
    style = output.with_name(output.stem + ".qml")
    if kind == "raster" and style.exists():
        item.add_asset("style", pystac.Asset(href=f"./{style.name}", media_type="application/xml",
                                             roles=["style"], title="QGIS style (QML)"))
    for src in sources:
        item.add_link(pystac.Link("derived_from", _href(src, output.parent), title=Path(str(src)).name))
    return item


def _describe_asset(item: pystac.Item, asset: pystac.Asset, facts: dict, output: Path) -> None:
    """The projection, raster, classification and file extensions of the data asset."""
    if facts.get("proj") is not None:
        ProjectionExtension.add_to(item)
        proj = ProjectionExtension.ext(asset)
        proj.apply(**{k: v for k, v in facts["proj"].items() if v is not None})
        asset.extra_fields.setdefault("proj:code", facts["proj"]["code"])
    if facts.get("bands"):
        RasterExtension.ext(asset, add_if_missing=True).apply(facts["bands"])
    if facts.get("band_names"):
        asset.extra_fields[PREFIX + "band_names"] = facts["band_names"]
    if facts.get("classes"):
        classes = [Classification.create(value=int(v), name=_class_name(n, v), title=n,
                                         color_hint=hex_colour(c)[1:].upper()) for v, n, c in facts["classes"]]
        ClassificationExtension.ext(asset, add_if_missing=True).classes = classes
    if facts.get("layers"):
        asset.extra_fields[PREFIX + "layers"] = facts["layers"]
    if facts.get("attrs"):
        asset.extra_fields[PREFIX + "attributes"] = facts["attrs"]
    file = FileExtension.ext(asset, add_if_missing=True)
    file.size = _size(output)
    checksum = _checksum(output)
    if checksum:
        file.checksum = checksum


def _class_name(name: str, value: int) -> str:
    """A class name as the classification extension allows it (letters, digits, ``_-``)."""
    clean = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in str(name)).strip("_")
    return clean or f"class_{value}"


def _href(path, folder: Path) -> str:
    """A link to ``path`` relative to ``folder`` when both are local, else as given."""
    text = str(path)
    if "://" in text or text.startswith("/vsi"):
        return text
    try:
        relative = os.path.relpath(os.path.abspath(text), os.path.abspath(folder))
    except ValueError:          # another drive (Windows)
        return os.path.abspath(text)
    return os.path.abspath(text) if relative.startswith("..") else relative


def write_item(output, source=None, properties: Optional[dict] = None,
               collection: Optional[pystac.Collection] = None) -> Path:
    """Write the Item of ``output`` (:func:`build_item`) to ``<output>.stac.json`` atomically;
    with ``collection``, the Item says it belongs to it. Returns the Item's path."""
    item = build_item(output, source, properties)
    path = item_path(output)
    if collection is not None:          # its self href says where it is written
        item.collection_id = collection.id
        item.add_link(pystac.Link("collection", _href(collection.get_self_href(), path.parent),
                                  media_type=pystac.MediaType.JSON))
    _write_json(item.to_dict(include_self_link=False, transform_hrefs=False), path)
    return path


def _write_json(record: dict, path: Path) -> None:
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")


def model_properties(model) -> dict:
    """What made an output, as Item properties: the backbone id and the weights' fingerprint of
    the model's DINOv3 backbone (cheap: a hash of a sample of every tensor)."""
    backbone = model if isinstance(model, Backbone) else getattr(model, "backbone", None)
    if not isinstance(backbone, Backbone):
        return {}
    return {"backbone": backbone_id(backbone), "weights_fingerprint": weights_fingerprint(backbone)}


# -- a batch's Collection -----------------------------------------------------------------------

COLLECTION_NAME = "collection_{task}.json"


def collection_path(out_dir, task: str) -> Path:
    """Where a batch job's Collection lies: ``out_dir/collection_<task>.json``."""
    return Path(out_dir) / COLLECTION_NAME.format(task=task)


def collection_for(out_dir, task: str) -> pystac.Collection:
    """The (empty) Collection of a batch job's outputs in ``out_dir``, its self href set to
    :func:`collection_path`."""
    out_dir = Path(out_dir)
    collection = pystac.Collection(
        id=f"dinov3geo-{out_dir.name or 'batch'}-{task}",
        description=f"dinov3-geo {task} outputs in {out_dir}", license="other",
        extent=pystac.Extent(pystac.SpatialExtent([[-180.0, -90.0, 180.0, 90.0]]),
                             pystac.TemporalExtent([[None, None]])),
        title=f"dinov3-geo {task}")
    collection.set_self_href(str(collection_path(out_dir, task)))
    return collection


def write_collection(collection: pystac.Collection, items: Iterable[Path]) -> Path:
    """Write ``collection`` (from :func:`collection_for`) with a link to every Item file of
    ``items`` and the extent they cover; returns its path."""
    path = Path(collection.get_self_href())
    boxes, times = [], []
    for item in items:
        record = json.loads(Path(item).read_text())
        collection.add_link(pystac.Link("item", _href(item, path.parent), media_type=pystac.MediaType.GEOJSON,
                                        title=record.get("id")))
        if record.get("bbox"):
            boxes.append(record["bbox"])
        when = record["properties"].get("datetime")
        if when:
            times.append(dt.datetime.fromisoformat(when.replace("Z", "+00:00")))
    if boxes:
        box = [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
        collection.extent.spatial = pystac.SpatialExtent([box])
    if times:
        collection.extent.temporal = pystac.TemporalExtent([[min(times), max(times)]])
    collection.remove_links(pystac.RelType.ROOT)       # itself, by a relative link: the folder may move
    collection.add_link(pystac.Link(pystac.RelType.ROOT, f"./{path.name}", media_type=pystac.MediaType.JSON))
    _write_json(collection.to_dict(include_self_link=False, transform_hrefs=False), path)
    return path


def describe_output(output, source=None, model=None, vector=None,
                    properties: Optional[dict] = None) -> list[Path]:
    """The GIS sidecars of a finished output: its QGIS style when it is a raster with one
    (:func:`~dinov3_geo.io.styles.write_raster_style`) and its STAC Item, with ``model``'s
    backbone (:func:`model_properties`) and ``properties``; with ``vector`` (the polygons made
    from it), that file's Item too, derived from the output. Returns the files written."""
    output = Path(output)
    written = []
    if output.is_file() and output.suffix.lower() in (".tif", ".tiff", ".vrt"):
        style = write_raster_style(output)
        written += [style] if style else []
    props = {**(model_properties(model) if model is not None else {}), **(properties or {})}
    written.append(write_item(output, source, props))
    if vector is not None:
        written.append(write_item(vector, output, props))
    return written

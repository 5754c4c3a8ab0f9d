"""Outputs as GIS clients meet them: georeference (or its honest absence), QGIS styles, GeoPackage
version and triggers, GDAL's Zarr CRS, chip embeddings without Parquet, STAC Items."""
from __future__ import annotations

import hashlib
import json
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyogrio
import pystac
import pytest
import rasterio
import rasterio.shutil
import rasterio.warp
import shapely
import tifffile
import torch
from rasterio.crs import CRS
from rasterio.windows import Window

import dinov3_geo
from dinov3_geo import analysis
from dinov3_geo.errors import UsageError
from dinov3_geo.io.cog import COGSink
from dinov3_geo.io.features import read_chip_embeddings
from dinov3_geo.io.patchmap import open_features
from dinov3_geo.io.scene import open_scene
from dinov3_geo.io.stac import item_path
from dinov3_geo.io.styles import layer_styles, qml_path
from dinov3_geo.io.vector import polygonize_classes, polygonize_threshold
from helpers import assert_geopackage_12, categories, write_crop

CHESAPEAKE = "chesapeake/id_000051_image.tif"      # no CRS, no geotransform, no GCPs
NAIP = "opengeos_naip_m_4709963_se_14_1_20200831.tif"
RGB = "rasterio_RGB.byte.tif"
CLASSES = ["water", "trees", "road"]
COLOURS = {0: (30, 90, 200), 1: (20, 140, 40), 2: (128, 128, 128)}
#: GeoTIFF tags that place a raster: pixel scale, tie points, transformation, GeoKeys.
GEO_TAGS = {33550, 33922, 34264, 34735}
#: GeoPackage 1.2's R-tree triggers (1.4 replaced update1 and update3 by update5-7).
pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


@pytest.fixture(scope="module")
def naip(tmp_path_factory) -> Path:
    """A 256 x 256 crop of the NAIP sample (EPSG:26914, 5 m): small enough for quick runs."""
    return write_crop(NAIP, Window(300, 200, 256, 256), tmp_path_factory.mktemp("naip") / "naip.tif")


def geo_tags(path) -> set[int]:
    """The georeferencing tags of a GeoTIFF's first IFD (empty: GIS tools see no georeference)."""
    with tifffile.TiffFile(path) as tif:
        return {code for code in tif.pages[0].tags.keys() if code in GEO_TAGS}


def model(channels: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Conv2d(3, channels, kernel_size=1)


def run_quietly(fn, *args, **kwargs):
    """``fn(...)`` and the texts of the DinoGeoWarnings it issued."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    return result, [str(w.message) for w in seen if issubclass(w.category, dinov3_geo.DinoGeoWarning)]


# -- 1. georeference honesty --------------------------------------------------------------------

@pytest.mark.parametrize("options", [dict(), dict(dtype="uint16"), dict(dtype="float16"),
                                     dict(kind="classes", class_names=CLASSES)])
def test_ungeoreferenced_input_gives_outputs_without_georeference(sample, tmp_path, options):
    """Streamed COGs (float32, uint16, half floats, classes) of an input without CRS, geotransform
    or GCPs have none either: QGIS places them where it places the input (an identity transform
    would draw them upside down)."""
    scene = sample(CHESAPEAKE)
    assert geo_tags(scene) == set()
    out = tmp_path / "out.tif"
    dinov3_geo.predict(scene, model(len(CLASSES)), out, tile=128, overlap=32, device="cpu", **options)
    assert geo_tags(out) == geo_tags(scene) == set()
    with rasterio.open(out) as ds:
        assert ds.crs is None and ds.gcps == ([], None) and (ds.width, ds.height) == (256, 256)
    assert not Path(f"{out}.aux.xml").exists()


def test_gdal_cog_copy_and_cell_maps_keep_the_absent_georeference(sample, tmp_path):
    """GDAL's COG copy (the way not streamed) and a feature map at 16-px cells (COG and Zarr)."""
    scene = sample(CHESAPEAKE)
    with open_scene(scene) as sc, COGSink(tmp_path / "copy.tif", sc, stream_blocks=False) as sink:
        sink.write(0, np.ones((1, sc.height, sc.width), np.float32))
    assert not sink.streams_blocks and geo_tags(tmp_path / "copy.tif") == set()
    analysis.embed(scene, tmp_path / "cells.tif", backbone="demo", patch=True, tile=128, overlap=32,
                   device="cpu")
    assert geo_tags(tmp_path / "cells.tif") == set()
    analysis.embed(scene, tmp_path / "cells.zarr", backbone="demo", patch=True, tile=128, overlap=32, device="cpu")
    attrs = json.loads((tmp_path / "cells.zarr" / "features" / ".zattrs").read_text())
    assert "_CRS" not in attrs and open_features(tmp_path / "cells.zarr").rio.crs is None


def test_polygons_of_an_ungeoreferenced_input_are_in_pixels_where_qgis_draws_it(sample, tmp_path):
    """Canopy polygons: ``area_px`` (pixel counts) instead of ``area_m2``, x = column and y = -row
    (where QGIS draws the input); one warning says so; no "0.000 km²" in the summary."""
    scene = sample(CHESAPEAKE)
    result, said = run_quietly(dinov3_geo.segment, scene, output=tmp_path / "h.tif", weights="demo",
                               vector=tmp_path / "h.gpkg", min_height=0.001, tile=128, overlap=32, device="cpu")
    ours = [s for s in said if "georeference" in s]
    assert len(ours) == 1 and "area_px" in ours[0], said
    assert result.area_km2 is None and "km²" not in result.summary()
    polygons = pyogrio.read_dataframe(tmp_path / "h.gpkg", layer="canopy")
    assert polygons.crs is None and "area_m2" not in polygons.columns
    assert polygons["area_px"].sum() == 256 * 256                    # every pixel is canopy here
    np.testing.assert_allclose(polygons["area_px"], polygons.geometry.area)    # one unit per pixel
    assert tuple(polygons.total_bounds) == (0, -256, 256, 0)
    assert_geopackage_12(tmp_path / "h.gpkg")


def test_class_polygons_of_an_ungeoreferenced_input_lie_on_their_pixels(sample, tmp_path):
    """Each class polygon covers exactly its class's pixels at (column, -row)."""
    out = tmp_path / "classes.tif"
    dinov3_geo.predict(sample(CHESAPEAKE), model(3), out, kind="classes", class_names=CLASSES, tile=128,
                       overlap=32, device="cpu")
    polygonize_classes(out, tmp_path / "classes.gpkg", CLASSES)
    polygons = pyogrio.read_dataframe(tmp_path / "classes.gpkg", layer="classes")
    with rasterio.open(out) as ds:
        values = ds.read(1)
    for value in np.unique(values):
        mine = polygons[polygons["class"] == value]
        assert mine["area_px"].sum() == (values == value).sum()
        rows, cols = np.nonzero(values == value)
        r, c = rows[len(rows) // 2], cols[len(cols) // 2]
        assert mine.contains(shapely.Point(c + 0.5, -(r + 0.5))).any()


def test_chip_footprints_of_an_ungeoreferenced_input_lie_where_qgis_draws_it(sample, tmp_path):
    analysis.embed(sample(CHESAPEAKE), tmp_path / "chips.gpkg", backbone="demo", tile=128, overlap=0, device="cpu")
    chips = read_chip_embeddings(tmp_path / "chips.gpkg")
    assert chips.crs is None and tuple(chips.total_bounds) == (0, -256, 256, 0)


def test_a_photo_is_run_with_one_line_saying_so(sample, tmp_path):
    """A JPEG without georeference is warned about as a probable photo, in one line; the same JPEG
    with a world file is a georeferenced scene like any other."""
    with rasterio.open(sample(RGB)) as src:
        data, transform, crs = src.read(window=Window(200, 200, 128, 128)), src.window_transform(
            Window(200, 200, 128, 128)), src.crs
    plain = tmp_path / "mem.tif"
    with rasterio.open(plain, "w", driver="GTiff", width=128, height=128, count=3, dtype="uint8") as ds:
        ds.write(data)
    rasterio.shutil.copy(plain, tmp_path / "photo.jpg", driver="JPEG")
    _, said = run_quietly(dinov3_geo.predict, tmp_path / "photo.jpg", model(1), tmp_path / "p.tif", tile=64,
                          overlap=16, device="cpu")
    photo = [s for s in said if "photo" in s]
    assert len(photo) == 1 and "JPEG" in photo[0] and "\n" not in photo[0], said
    with rasterio.open(tmp_path / "geo.tif", "w", driver="GTiff", width=128, height=128, count=3, dtype="uint8",
                       crs=crs, transform=transform) as ds:
        ds.write(data)
    rasterio.shutil.copy(tmp_path / "geo.tif", tmp_path / "map.jpg", driver="JPEG", worldfile="YES")
    _, said = run_quietly(dinov3_geo.predict, tmp_path / "map.jpg", model(1), tmp_path / "m.tif", tile=64,
                          overlap=16, device="cpu")
    assert not [s for s in said if "photo" in s or "georeference" in s], said
    with rasterio.open(tmp_path / "m.tif") as ds:
        assert ds.transform.almost_equals(transform)


# -- 3. styles ----------------------------------------------------------------------------------

def palette(qml: str) -> list[tuple[int, str, str]]:
    root = ET.fromstring(qml.split("\n", 1)[1])       # after the DOCTYPE line
    assert root.tag == "qgis"
    renderer = root.find("pipe/rasterrenderer")
    assert renderer.get("type") == "paletted" and renderer.get("band") == "1"
    return [(int(e.get("value")), e.get("label"), e.get("color")) for e in renderer.iter("paletteEntry")]


def hex_colour(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb[:3])


def test_class_raster_and_polygons_carry_their_names_and_colours_for_qgis(naip, tmp_path):
    out, vec = tmp_path / "landcover.tif", tmp_path / "landcover.gpkg"
    dinov3_geo.predict(naip, model(3, seed=1), out, kind="classes", class_names=CLASSES, colormap=COLOURS,
                       tile=128, overlap=32, device="cpu")
    assert qml_path(out) == tmp_path / "landcover.qml"           # where QGIS looks for it
    assert palette(qml_path(out).read_text()) == [(v, n, hex_colour(COLOURS[v])) for v, n in enumerate(CLASSES)]
    polygonize_classes(out, vec, CLASSES)
    attribute, cats = categories(layer_styles(vec)["classes"])
    assert attribute == "class" and cats == [(str(v), n, COLOURS[v]) for v, n in enumerate(CLASSES)]
    assert_geopackage_12(vec)


def test_cluster_units_carry_unit_names_and_the_colour_table(naip, tmp_path):
    out = tmp_path / "units.tif"
    analysis.cluster(naip, out, k=4, vector=tmp_path / "units.gpkg", backbone="demo", tile=256,
                     overlap=32, device="cpu")
    with rasterio.open(out) as ds:
        table = ds.colormap(1)
    expected = [(i, f"unit {i}", hex_colour(table[i])) for i in range(4)]
    assert palette(qml_path(out).read_text()) == expected
    _, cats = categories(layer_styles(tmp_path / "units.gpkg")["clusters"])
    assert [(int(v), n, hex_colour(c)) for v, n, c in cats] == expected
    assert_geopackage_12(tmp_path / "units.gpkg")


def test_canopy_raster_and_polygons_are_styled_by_height(naip, tmp_path):
    out, vec = tmp_path / "canopy.tif", tmp_path / "canopy.gpkg"
    dinov3_geo.segment(naip, output=out, weights="demo", tile=128, overlap=32, device="cpu")
    root = ET.fromstring(qml_path(out).read_text().split("\n", 1)[1])
    shader = root.find("pipe/rasterrenderer/rastershader/colorrampshader")
    values = [float(i.get("value")) for i in shader.iter("item")]
    assert values == sorted(values) and values[0] == 0 and all(i.get("label").endswith(("m", "more"))
                                                                for i in shader.iter("item"))
    with rasterio.open(out) as ds:
        threshold = float(np.nanmedian(ds.read(1)))
    polygonize_threshold(out, vec, threshold)
    renderer = ET.fromstring(layer_styles(vec)["canopy"].split("\n", 1)[1]).find("renderer-v2")
    assert renderer.get("type") == "graduatedSymbol" and renderer.get("attr") == "mean_height_m"
    ranges = [(float(r.get("lower")), float(r.get("upper"))) for r in renderer.find("ranges")]
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])) and len(ranges) == len(renderer.find("symbols"))
    assert_geopackage_12(vec)


def test_a_style_of_the_users_own_is_never_replaced(naip, tmp_path):
    out = tmp_path / "c.tif"
    mine = "<qgis><!-- my colours --></qgis>\n"
    qml_path(out).write_text(mine)
    dinov3_geo.predict(naip, model(3), out, kind="classes", class_names=CLASSES, tile=128, overlap=32,
                       device="cpu")
    assert qml_path(out).read_text() == mine


# -- 4. older clients ---------------------------------------------------------------------------

def test_zarr_feature_map_has_gdals_crs_beside_the_cf_one(naip, tmp_path):
    store = tmp_path / "feats.zarr"
    analysis.embed(naip, store, backbone="demo", patch=True, tile=128, overlap=32, device="cpu")
    attrs = json.loads((store / "features" / ".zattrs").read_text())
    consolidated = json.loads((store / ".zmetadata").read_text())["metadata"]["features/.zattrs"]
    assert consolidated["_CRS"] == attrs["_CRS"]
    with rasterio.open(naip) as ds:
        crs = ds.crs
    assert CRS.from_wkt(attrs["_CRS"]["wkt"]) == crs
    assert attrs["_CRS"]["url"] == f"http://www.opengis.net/def/crs/EPSG/0/{crs.to_epsg()}"
    assert CRS.from_user_input(json.dumps(attrs["_CRS"]["projjson"])) == crs
    assert attrs["grid_mapping"] == "spatial_ref"                 # rioxarray's, as before


@pytest.mark.parametrize("suffix", [".gpkg", ".fgb"])
def test_chip_embeddings_without_parquet(naip, tmp_path, suffix):
    """GeoPackage and FlatGeobuf hold the same chips and vectors as GeoParquet."""
    common = dict(backbone="demo", tile=128, overlap=32, device="cpu")
    analysis.embed(naip, tmp_path / "chips.parquet", **common)
    analysis.embed(naip, tmp_path / f"chips{suffix}", **common)
    def read(path):         # (FlatGeobuf orders features along its spatial index)
        return read_chip_embeddings(path).sort_values(["chip_row", "chip_col"]).reset_index(drop=True)

    ref, got = read(tmp_path / "chips.parquet"), read(tmp_path / f"chips{suffix}")
    assert len(got) == len(ref) > 4 and got.crs == ref.crs
    assert got.attrs["dinov3_geo"] == ref.attrs["dinov3_geo"]
    for column in ("cls", "mean_patch"):
        np.testing.assert_array_equal(np.stack(got[column]), np.stack(ref[column]))
    assert got.geometry.geom_equals(ref.geometry).all()
    if suffix == ".gpkg":
        assert_geopackage_12(tmp_path / "chips.gpkg")


def test_embed_refuses_other_suffixes_in_one_line(naip, tmp_path):
    with pytest.raises(UsageError, match=r"\.parquet.*\.gpkg.*\.fgb"):
        analysis.embed(naip, tmp_path / "chips.csv", backbone="demo", device="cpu")


# -- 5. STAC ------------------------------------------------------------------------------------

def test_stac_item_of_a_class_cog_round_trips_with_its_values(naip, tmp_path):
    scene, out = naip, tmp_path / "classes.tif"
    dinov3_geo.predict(scene, model(3), out, kind="classes", class_names=CLASSES, colormap=COLOURS, tile=256,
                       overlap=32, device="cpu")
    item = pystac.Item.from_file(str(item_path(out)))
    assert item_path(out).name == "classes.tif.stac.json"
    asset = item.assets["data"]
    assert asset.media_type == pystac.MediaType.COG and asset.get_absolute_href() == str(out)
    with rasterio.open(out) as ds:
        assert asset.extra_fields["proj:code"] == f"EPSG:{ds.crs.to_epsg()}"
        assert asset.extra_fields["proj:shape"] == [ds.height, ds.width]
        assert asset.extra_fields["proj:transform"] == list(ds.transform)[:6]
        assert asset.extra_fields["proj:bbox"] == list(ds.bounds)
        band = asset.extra_fields["raster:bands"][0]
        assert band["data_type"] == ds.dtypes[0] and band["nodata"] == ds.nodata == 255
        assert band["spatial_resolution"] == pytest.approx(ds.res[0])
        left, bottom, right, top = rasterio.warp.transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
    assert item.bbox == pytest.approx([left, bottom, right, top], abs=1e-6)
    classes = asset.extra_fields["classification:classes"]
    assert [(c["value"], c["title"], c["color_hint"]) for c in classes] == [
        (v, n, hex_colour(COLOURS[v])[1:].upper()) for v, n in enumerate(CLASSES)]
    assert asset.extra_fields["file:size"] == out.stat().st_size
    assert asset.extra_fields["file:checksum"] == "1220" + hashlib.sha256(out.read_bytes()).hexdigest()
    source = [link for link in item.links if link.rel == "derived_from"]
    assert len(source) == 1 and Path(source[0].get_absolute_href()).resolve() == scene.resolve()
    assert "dinov3:backbone" not in item.properties          # a plain torch model: no DINOv3 backbone
    assert item.assets["style"].get_absolute_href() == str(qml_path(out))


def test_stac_items_of_canopy_and_its_polygons(naip, tmp_path):
    out, vec = tmp_path / "canopy.tif", tmp_path / "canopy.gpkg"
    dinov3_geo.segment(naip, output=out, weights="demo", vector=vec, tile=128, overlap=32, device="cpu")
    item = pystac.Item.from_file(str(item_path(out)))
    band = item.assets["data"].extra_fields["raster:bands"][0]
    assert band["unit"] == "m" and band["nodata"] == "nan" and band["data_type"] == "float32"
    assert item.properties["dinov3:backbone"].startswith("demo:") and item.properties["dinov3:task"] == "canopy"
    assert len(item.properties["dinov3:weights_fingerprint"]) == 16
    polygons = pystac.Item.from_file(str(item_path(vec)))
    layers = polygons.assets["data"].extra_fields["dinov3:layers"]
    assert [(l["name"], l["features"]) for l in layers] == [("canopy", len(pyogrio.read_dataframe(vec)))]
    assert polygons.assets["data"].extra_fields["proj:code"] == "EPSG:26914"
    assert [Path(l.get_absolute_href()) for l in polygons.links if l.rel == "derived_from"] == [out]


def test_uint16_canopy_item_has_the_scale_gis_tools_apply(naip, tmp_path):
    out = tmp_path / "canopy.tif"
    dinov3_geo.segment(naip, output=out, weights="demo", dtype="uint16", tile=128, overlap=32, device="cpu")
    band = pystac.Item.from_file(str(item_path(out))).assets["data"].extra_fields["raster:bands"][0]
    with rasterio.open(out) as ds:
        assert (band["scale"], band["nodata"], band["data_type"]) == (ds.scales[0], ds.nodata, "uint16")


def test_stac_item_of_an_ungeoreferenced_output_has_no_geometry(sample, tmp_path):
    out = tmp_path / "out.tif"
    dinov3_geo.predict(sample(CHESAPEAKE), model(1), out, tile=128, overlap=32, device="cpu")
    item = pystac.Item.from_file(str(item_path(out)))
    assert item.geometry is None and item.bbox is None
    fields = item.assets["data"].extra_fields
    assert fields["proj:code"] is None and "proj:transform" not in fields and fields["proj:shape"] == [256, 256]


@pytest.mark.parametrize("suffix", [".parquet", ".zarr"])
def test_stac_items_of_embeddings(naip, tmp_path, suffix):
    out = tmp_path / f"e{suffix}"
    analysis.embed(naip, out, backbone="demo", patch=suffix == ".zarr", tile=128, overlap=32, device="cpu")
    item = pystac.Item.from_file(str(item_path(out)))
    assert item.assets["data"].extra_fields["proj:code"] == "EPSG:26914"
    with rasterio.open(naip) as ds:
        left, bottom, right, top = rasterio.warp.transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
    assert item.bbox == pytest.approx([left, bottom, right, top], abs=1e-3)   # cells may stick out 15 px
    assert item.properties["dinov3:backbone"].startswith("demo:")

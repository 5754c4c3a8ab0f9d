"""The explorer's page (``dinov3_geo.explore``, ``dinov3geo view``): what the product writes, drawn in
a real headless browser (Debian's Chromium through Playwright) with the network off.

The browser tests record every request the page makes and every console message: the page must
load from its own file alone, with no error, list every layer with its legend, and compute on a
click the similarity ``dinov3_geo.similar`` computes over the page's own features. They are
skipped only where no Chromium is installed (``.ci/run`` installs Debian's).
"""
from __future__ import annotations

import base64
import html
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.control import GroundControlPoint

import dinov3_geo
from dinov3_geo.cli import main
from dinov3_geo.explorer.render import ramp_colours, ramp_index
from dinov3_geo.explorer.similarity import reduce_features
from dinov3_geo.io.patchmap import open_features
from dinov3_geo.testing.tiled_scene import tiled_vrt
from helpers import SAMPLES

SCENE = SAMPLES / "opengeos_naip_m_4709963_se_14_1_20200831.tif"
BEFORE = SAMPLES / "naip_m_4709963_se_14_1_20190904.tif"
CHIP = SAMPLES / "chesapeake" / "id_000367_image.tif"
RUN = dict(tile=256, overlap=32, progress=False)
CLASS_NAMES = ["water", "crops", "grass", "town"]
#: float32 rounding of a dot product of 8 unit components (the page sums in double, numpy in float32)
FLOAT32_TOL = 1e-6

CHROMIUM = os.environ.get("DINOV3GEO_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install "
                                   "chromium; .ci/run installs it); set DINOV3GEO_CHROMIUM to another binary")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]
TILE_SERVER = "https://tile.openstreetmap.org/"
TILE_PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==")


# -- what the product writes for the NAIP sample ---------------------------------------------------
@pytest.fixture(scope="module")
def backbone():
    return dinov3_geo.load_backbone("demo")


@pytest.fixture(scope="module")
def results(tmp_path_factory, backbone):
    """The README's land-analysis outputs of the NAIP sample (demo models), and a class raster."""
    out = tmp_path_factory.mktemp("results")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dinov3_geo.segment(SCENE, task="canopy", output=out / "canopy.tif", weights="demo",
                           vector=out / "canopy.gpkg", **RUN)
        dinov3_geo.embed(SCENE, out / "feats.zarr", patch=True, backbone=backbone, **RUN)
        dinov3_geo.similar(SCENE, out / "similar.tif", at=(490250, 5207450), features=out / "feats.zarr",
                           backbone=backbone, **RUN)
        dinov3_geo.cluster(SCENE, out / "units.tif", k=6, vector=out / "units.gpkg", features=out / "feats.zarr",
                           backbone=backbone, **RUN)
        dinov3_geo.change(BEFORE, SCENE, out / "change.tif", backbone=backbone, **RUN)
        torch.manual_seed(0)
        dinov3_geo.predict(SCENE, torch.nn.Conv2d(3, 4, 1), out / "classes.tif", kind="classes",
                           class_names=CLASS_NAMES, device="cpu", **RUN)
    return out


def outputs(results: Path) -> list[Path]:
    return [results / n for n in ("canopy.tif", "canopy.gpkg", "classes.tif", "units.tif", "units.gpkg",
                                  "similar.tif", "change.tif", "feats.zarr")] + [BEFORE]


@pytest.fixture(scope="module")
def page(results):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dinov3_geo.explore(SCENE, *outputs(results), output=results / "explore.html")


# -- the browser ----------------------------------------------------------------------------------
class Opened:
    """A page open in Chromium: ``page`` (Playwright), every ``requests`` URL, console ``errors``."""

    def __init__(self, page, requests, errors):
        self.page, self.requests, self.errors = page, requests, errors

    def js(self, expression: str, *arg):
        return self.page.evaluate(expression, *arg)

    def click_at(self, x: float, y: float) -> None:
        """A real mouse click where the map shows the display-CRS point (x, y)."""
        at = self.js("([x, y]) => window.dinov3geo.toPage(x, y)", [x, y])
        self.page.mouse.click(at["x"], at["y"])


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def open_browser_file(browser):
    """``open_browser_file(path, tiles=False)``: ``(tab, requests, console errors)`` of ``path`` in
    a fresh context with the network off (every request but the file's own is aborted; with
    ``tiles`` the tile server's are answered here with a blank tile)."""
    contexts = []

    def open_(path: Path, tiles: bool = False):
        context = browser.new_context(viewport={"width": 1280, "height": 900}, offline=not tiles)
        contexts.append(context)
        requests, errors = [], []

        def answer(route):
            url = route.request.url
            if tiles and url.startswith(TILE_SERVER):
                route.fulfill(body=TILE_PNG, content_type="image/png")
            elif url == Path(path).resolve().as_uri():
                route.continue_()
            else:
                route.abort()

        context.route("**/*", answer)
        tab = context.new_page()
        tab.on("request", lambda r: requests.append(r.url))
        tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.goto(Path(path).resolve().as_uri())
        return tab, requests, errors

    yield open_
    for context in contexts:
        context.close()


@pytest.fixture
def open_page(open_browser_file):
    """``open_page(path, tiles=False)``: the explorer's page open and drawn (:class:`Opened`)."""
    def open_(path: Path, tiles: bool = False) -> Opened:
        tab, requests, errors = open_browser_file(path, tiles)
        tab.wait_for_function("window.dinov3geo && window.dinov3geo.ready", timeout=30_000)
        return Opened(tab, requests, errors)

    return open_


def python_similarity(page, results: Path, at, points, backbone, scene=SCENE, name="reference") -> list[float]:
    """``dinov3_geo.similar`` at ``at`` over the page's own features (written as a store), read at
    ``points`` (x, y in the scene's CRS; ``pixels=True``: column, row)."""
    store = page.write_features(results / f"{name}.zarr", overwrite=True)
    out = results / f"{name}.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = dinov3_geo.similar(scene, out, at=at, features=store, backbone=backbone, overwrite=True, **RUN)
    assert "PCA components" in result.summary()
    with rasterio.open(out) as ds:
        band = ds.read(1)
        return [float(band[ds.index(x, y)]) for x, y in points]


# -- the page in a browser ------------------------------------------------------------------------
@pytest.mark.slow
@needs_browser
def test_page_loads_offline_with_every_layer_and_its_legend(page, results, open_page):
    opened = open_page(results / "explore.html")
    tab = opened.page
    assert opened.errors == []
    assert opened.requests == [(results / "explore.html").resolve().as_uri()]     # nothing but its file
    listed = tab.locator(".leaflet-control-layers-overlays label").all_inner_texts()
    assert [t.strip() for t in listed] == page.layers
    assert len(page.layers) == 1 + len(outputs(results))        # the scene, one per file (feats: the similarity)
    tab.hover(".leaflet-control-layers")          # the switcher opens under the mouse
    for checkbox in tab.locator(".leaflet-control-layers-overlays input").all():
        checkbox.check()
    images = opened.js("""() => Array.from(document.querySelectorAll('img.leaflet-image-layer'))
                                 .map(i => i.complete && i.naturalWidth > 0)""")
    assert len(images) == 8 and all(images)        # the scene, 6 rasters, the similarity layer
    legends = {t.get_attribute("data-layer"): t for t in tab.locator(".dg-legend").all()}
    assert sorted(legends) == sorted(page.layers)
    assert all(box.is_visible() and box.inner_text().strip() for box in legends.values())
    assert " m" in legends["canopy.tif"].locator(".dg-ramp-labels").inner_text()
    with rasterio.open(results / "units.tif") as ds:
        table = ds.colormap(1)
    unit_items = legends["units.tif"].locator(".dg-item")
    assert unit_items.all_inner_texts() == [f"unit {i}" for i in range(6)]
    assert [_rgb(s) for s in unit_items.locator(".dg-swatch").evaluate_all(
        "els => els.map(e => getComputedStyle(e).backgroundColor)")] == [table[i][:3] for i in range(6)]
    assert legends["classes.tif"].locator(".dg-item").all_inner_texts() == CLASS_NAMES
    assert "cosine distance" in legends["change.tif"].inner_text()
    assert "cosine similarity" in legends["similar.tif"].inner_text()
    assert opened.errors == []


def _rgb(css: str) -> tuple[int, int, int]:
    return tuple(int(v) for v in re.findall(r"\d+", css)[:3])


@pytest.mark.slow
@needs_browser
def test_a_click_draws_the_similarity_python_computes(page, results, open_page, backbone):
    opened = open_page(results / "explore.html")
    reference = (488000.0, 5207000.0)
    points = [(486500.0, 5208500.0), (489000.0, 5206000.0), (490000.0, 5205800.0)]
    opened.click_at(*reference)
    drawn = [opened.js("([x, y]) => window.dinov3geo.similarity.valueAt(x, y)", list(p)) for p in points]
    expected = python_similarity(page, results, reference, points, backbone)
    np.testing.assert_allclose(drawn, expected, rtol=0, atol=FLOAT32_TOL)
    assert opened.js("([x, y]) => window.dinov3geo.similarity.valueAt(x, y)", list(reference)) == pytest.approx(1.0)
    # the colours drawn at those cells are the ramp's colours of the values
    colours = ramp_colours("magma")
    for (x, y), value in zip(points, expected):
        rgba = opened.js("""([x, y]) => new Promise(done => {
            const s = window.dinov3geo.similarity, c = s.cellAt(x, y), img = new Image();
            img.onload = () => { const cv = document.createElement('canvas'); cv.width = img.width; cv.height = img.height;
              const g = cv.getContext('2d'); g.drawImage(img, 0, 0);
              done(Array.from(g.getImageData(c % img.width, Math.floor(c / img.width), 1, 1).data)); };
            img.src = s.layer.getElement().src; })""", [x, y])
        index = int(ramp_index(np.float32([value]), -1.0, 1.0)[0])
        assert any(list(colours[i]) == rgba for i in (index - 1, index, index + 1))
    # the threshold hides the cells under it
    opened.page.locator(".dg-threshold input").fill("0.9")
    assert opened.js("() => window.dinov3geo.similarity.threshold") == pytest.approx(0.9)
    low = min(range(3), key=lambda i: expected[i])
    alpha = opened.js("""([x, y]) => new Promise(done => {
        const s = window.dinov3geo.similarity, c = s.cellAt(x, y), img = new Image();
        img.onload = () => { const cv = document.createElement('canvas'); cv.width = img.width; cv.height = img.height;
          const g = cv.getContext('2d'); g.drawImage(img, 0, 0);
          done(g.getImageData(c % img.width, Math.floor(c / img.width), 1, 1).data[3]); };
        img.src = s.layer.getElement().src; })""", list(points[low]))
    assert expected[low] < 0.9 and alpha == 0
    # the readout under the cursor says the value
    at = opened.js("([x, y]) => window.dinov3geo.toPage(x, y)", list(points[0]))
    opened.page.mouse.move(at["x"], at["y"])
    assert f"similarity {expected[0]:.4f}" in opened.page.locator(".dg-coords").inner_text()
    assert opened.errors == []


@pytest.mark.slow
@needs_browser
def test_a_polygon_shows_its_attributes_on_click(page, results, open_page):
    import geopandas as gpd

    opened = open_page(results / "explore.html")
    opened.page.hover(".leaflet-control-layers")
    opened.page.locator(".leaflet-control-layers-overlays label", has_text="units.gpkg").locator("input").check()
    opened.page.mouse.move(5, 400)                  # the switcher closes
    units = gpd.read_file(results / "units.gpkg")
    largest = units.iloc[int(units.area.argmax())]
    point = largest.geometry.representative_point()
    opened.click_at(point.x, point.y)
    popup = opened.page.locator(".leaflet-popup-content")
    popup.wait_for()
    title, *rows = popup.inner_text().splitlines()
    shown = dict(row.split("\t") for row in rows)
    assert title == "units.gpkg" and shown["class_name"] == largest["class_name"]
    assert int(shown["class"]) == largest["class"] and float(shown["area_m2"]) == pytest.approx(largest["area_m2"], rel=1e-5)
    assert opened.errors == []


@pytest.mark.slow
@needs_browser
def test_basemap_is_the_only_thing_loaded_and_only_when_asked(page, results, open_page, backbone, tmp_path):
    assert "img-src data: ;" in (results / "explore.html").read_text()     # no basemap: data: images only
    path = tmp_path / "basemap.html"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        page = dinov3_geo.explore(SCENE, results / "units.tif", results / "feats.zarr", basemap=True, output=path)
    assert f"img-src data: {TILE_SERVER.rstrip('/')};" in path.read_text()
    opened = open_page(path, tiles=True)
    others = [u for u in opened.requests if not u.startswith(TILE_SERVER)]
    assert others == [path.resolve().as_uri()] and len(opened.requests) > 1
    # Web Mercator: the similarity layer finds cells through its lookup; at cell centres it is exact
    centres = [(485899.0 + 80 * (c + 0.5), 5209246.0 - 80 * (r + 0.5)) for c, r in ((20, 20), (3, 5), (50, 40), (33, 8))]
    mercator = [opened.js("""([x, y]) => { const p = L.CRS.EPSG3857.project(L.latLng(
        proj4(window.dinov3geo.data.scene.proj4, 'WGS84', [x, y]).reverse())); return [p.x, p.y]; }""", list(c))
        for c in centres]
    assert opened.js("([x, y]) => window.dinov3geo.similarity.select(x, y)", mercator[0])
    drawn = [opened.js("([x, y]) => window.dinov3geo.similarity.valueAt(x, y)", m) for m in mercator[1:]]
    expected = python_similarity(page, tmp_path, centres[0], centres[1:], backbone)
    np.testing.assert_allclose(drawn, expected, rtol=0, atol=FLOAT32_TOL)
    assert opened.errors == []


@pytest.mark.slow
@needs_browser
def test_ungeoreferenced_scene_in_pixel_coordinates(tmp_path, open_page, backbone):
    """A benchmark chip with no georeference: pixel coordinates (y = -row, where QGIS puts it); a
    click on pixel (col, row) is `similar --at col,-row` on the chip, as QGIS shows it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dinov3_geo.embed(CHIP, tmp_path / "f.zarr", patch=True, backbone=backbone, tile=128, overlap=32, progress=False)
        torch.manual_seed(0)
        dinov3_geo.predict(CHIP, torch.nn.Conv2d(3, 4, 1), tmp_path / "classes.tif", kind="classes",
                           class_names=CLASS_NAMES, device="cpu", tile=128, overlap=32, progress=False)
        page = dinov3_geo.explore(CHIP, tmp_path / "classes.tif", tmp_path / "f.zarr", output=tmp_path / "p.html")
    assert any("pixel coordinates" in n for n in page.notes)
    opened = open_page(tmp_path / "p.html")
    opened.click_at(104.0, -120.0)             # the centre of the cell of row 7, column 6
    pixels = [(20.0, 30.0), (200.0, 40.0), (130.0, 250.0)]
    drawn = [opened.js("([x, y]) => window.dinov3geo.similarity.valueAt(x, y)", [c, -r]) for c, r in pixels]
    store = page.write_features(tmp_path / "r.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dinov3_geo.similar(CHIP, tmp_path / "s.tif", at=(104.0, -120.0), features=store, backbone=backbone,
                           tile=128, overlap=32, progress=False)
        with rasterio.open(tmp_path / "s.tif") as ds:
            expected = [float(ds.read(1)[int(r), int(c)]) for c, r in pixels]
    np.testing.assert_allclose(drawn, expected, rtol=0, atol=FLOAT32_TOL)
    status = opened.page.locator(".dg-legend .dg-status").first.inner_text()
    assert status.startswith("reference: cell row 7, column 6 (pixel column 10") and "row 1" in status
    assert opened.errors == []


def _regridded(tmp_path: Path, how: str) -> Path:
    """The Landsat sample rotated by 20 degrees, or georeferenced by four GCPs only."""
    with rasterio.open(SAMPLES / "stars_L7_ETMs.tif") as ds:
        data, profile, t = ds.read(), ds.profile, ds.transform
    path = tmp_path / f"{how}.tif"
    if how == "rotated":
        profile["transform"] = t @ Affine.rotation(20)
        with rasterio.open(path, "w", **profile) as out:
            out.write(data)
        return path
    crs, (h, w) = profile.pop("crs"), data.shape[1:]
    profile.pop("transform")
    gcps = [GroundControlPoint(row=r, col=c, x=(t @ (c, r))[0], y=(t @ (c, r))[1]) for r in (0, h) for c in (0, w)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path, "w", **profile) as out:
            out.write(data)
            out.gcps = (gcps, crs)
    return path


@pytest.mark.slow
@needs_browser
@pytest.mark.parametrize("how", ["rotated", "gcps"])
def test_rotated_and_gcp_scenes_are_warped_north_up(how, tmp_path, open_page, backbone):
    scene = _regridded(tmp_path, how)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dinov3_geo.embed(scene, tmp_path / "f.zarr", patch=True, backbone=backbone, bands=[3, 2, 1], **RUN)
        page = dinov3_geo.explore(scene, tmp_path / "f.zarr", bands=[3, 2, 1], output=tmp_path / "p.html")
    assert any("not north-up" in n for n in page.notes)
    with rasterio.open(scene) as ds:
        fit = ds.transform if how == "rotated" else rasterio.transform.from_gcps(ds.gcps[0])
    centres = [fit @ (16 * (c + 0.5), 16 * (r + 0.5)) for c, r in ((10, 10), (2, 3), (18, 15), (5, 19))]
    opened = open_page(tmp_path / "p.html")
    assert opened.js("([x, y]) => window.dinov3geo.similarity.select(x, y)", list(centres[0]))
    drawn = [opened.js("([x, y]) => window.dinov3geo.similarity.valueAt(x, y)", list(c)) for c in centres[1:]]
    store = page.write_features(tmp_path / "r.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dinov3_geo.similar(scene, tmp_path / "s.tif", at=centres[0], features=store, backbone=backbone,
                           bands=[3, 2, 1], **RUN)
    with rasterio.open(tmp_path / "s.tif") as ds:
        band = ds.read(1)
        inverse = ~fit
        expected = [float(band[int((inverse @ c)[1]), int((inverse @ c)[0])]) for c in centres[1:]]
    np.testing.assert_allclose(drawn, expected, rtol=0, atol=FLOAT32_TOL)
    assert opened.errors == []


# -- the page without a browser ---------------------------------------------------------------------
def test_large_scene_is_downsampled_and_says_so(tmp_path):
    """A 3 x 3 mosaic of the NAIP sample (a VRT, 2802 x 2169 px) shown at most 512 px a side."""
    with rasterio.open(SCENE) as ds:
        mosaic = tiled_vrt(SCENE, 3 * ds.width, 3 * ds.height, tmp_path / "mosaic.vrt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = dinov3_geo.explore(mosaic, max_side=512)
        full = dinov3_geo.explore(SCENE)
    assert small.headline.startswith("downsampled") and any(n.startswith("downsampled") for n in small.notes)
    assert full.headline == "full resolution"
    widths = _image_sizes(small.html)
    assert max(max(s) for s in widths) == 512
    assert small.size < full.size


def _image_sizes(page_html: str) -> list[tuple[int, int]]:
    from io import BytesIO

    from PIL import Image

    return [Image.open(BytesIO(base64.b64decode(b))).size
            for b in re.findall(r'"url":"data:image/(?:png|webp);base64,([A-Za-z0-9+/=]+)"', page_html)]


@pytest.mark.slow
def test_a_vector_layer_over_the_cap_keeps_its_largest_features(tmp_path):
    """Squares of many sizes over the scene: the page keeps the largest within the vertex cap;
    points: the first ones within the feature cap; and says so."""
    import geopandas as gpd
    import shapely

    from dinov3_geo.explorer.vectors import MAX_FEATURES, MAX_VERTICES

    rng = np.random.default_rng(0)
    n = MAX_VERTICES // 5 + 2000                      # a square has 5 vertices
    x, y = rng.uniform(486000, 490000, n), rng.uniform(5206000, 5209000, n)
    sides = rng.permutation(np.linspace(5.0, 60.0, n))
    gpd.GeoDataFrame({"side": sides}, geometry=shapely.box(x, y, x + sides, y + sides), crs="EPSG:26914").to_file(
        tmp_path / "squares.gpkg")
    m = MAX_FEATURES + 100
    gpd.GeoDataFrame({"i": np.arange(m)}, geometry=shapely.points(rng.uniform(486000, 490000, (m, 2))),
                     crs="EPSG:26914").to_file(tmp_path / "points.gpkg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        page = dinov3_geo.explore(SCENE, tmp_path / "squares.gpkg", tmp_path / "points.gpkg", bands=[1, 2, 3])
    notes = " ".join(page.notes)
    assert f"squares.gpkg: {MAX_VERTICES // 5} of its {n} features shown (the largest" in notes
    assert f"points.gpkg: {MAX_FEATURES} of its {m} features shown" in notes
    squares, points = (layer["geojson"]["features"] for layer in _page_data(page)["layers"][1:])
    kept = [f["properties"]["side"] for f in squares]
    assert len(kept) == MAX_VERTICES // 5 and min(kept) == pytest.approx(np.sort(sides)[-(MAX_VERTICES // 5)])
    assert [f["properties"]["i"] for f in points] == list(range(MAX_FEATURES))


def _page_data(page) -> dict:
    import json

    return json.loads(re.search(r'<script type="application/json" id="explore-data">(.*?)</script>', page.html,
                                re.S).group(1))


@pytest.mark.slow
def test_features_over_the_size_cap_get_fewer_components_then_pooled_cells(results):
    feats = open_features(results / "feats.zarr")
    cells = feats.shape[1] * feats.shape[2]
    fewer = reduce_features(feats, 8, max_bytes=cells * 2 * 4)
    assert fewer.components == 4 and fewer.pool == 1
    pooled = reduce_features(feats, 8, max_bytes=cells * 2)         # 3 components of 2 x 2 cells fit
    three = reduce_features(feats, 3, max_bytes=cells * 2 * 3)
    assert pooled.components == 3 and pooled.pool == 2 and "averaged over 2 x 2" in pooled.describe()
    # PCA is linear: a pooled cell is the mean of the reduced cells under it
    values = three.values.astype(np.float64)
    expected = values[:, :2, :2].mean(axis=(1, 2))
    np.testing.assert_allclose(pooled.values[:, 0, 0].astype(np.float64), expected, rtol=2e-3, atol=2e-3)


@pytest.fixture(scope="module")
def scene_page():
    """The page of the scene alone (fast)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dinov3_geo.explore(SCENE)


def test_reduced_values_beyond_half_floats_are_scaled_and_keep_their_cosines():
    """Features whose principal components exceed 65504 are scaled by a power of two (the cosines,
    what the page computes, are unchanged), and the page says so."""
    from dinov3_geo.io.patchmap import CellGrid, features_dataarray

    rng = np.random.default_rng(1)
    data = (rng.normal(size=(12, 20, 30)) * 1e6).astype(np.float32)
    feats = features_dataarray(data, CellGrid("EPSG:32633", Affine(160, 0, 500000, 0, -160, 4000000), 20, 30))
    reduced = reduce_features(feats, 12)            # as wide as the map: no PCA, the values as they are
    shift = reduced.reduction["scaled"]
    assert reduced.reduction["method"] == "none" and f"scaled by 2^-{shift}" in reduced.describe()
    np.testing.assert_allclose(reduced.values.astype(np.float64) * 2.0**shift, data, rtol=1e-3)
    assert np.isfinite(reduced.values).all()


def test_notebook_display_is_the_page_in_an_iframe(scene_page):
    page = scene_page
    shown = page._repr_html_()
    assert shown.startswith("<iframe srcdoc=")
    srcdoc = re.search(r'srcdoc="([^"]*)"', shown).group(1)
    assert html.unescape(srcdoc) == page.html


@needs_browser
def test_notebook_display_runs_in_its_sandboxed_iframe(scene_page, open_browser_file, tmp_path):
    """What Jupyter shows (the page in a sandboxed srcdoc iframe) draws the map, offline."""
    notebook = tmp_path / "notebook.html"
    notebook.write_text(f"<!DOCTYPE html><html><body>{scene_page._repr_html_()}</body></html>")
    tab, requests, errors = open_browser_file(notebook)
    frame = next(f for f in tab.frames if f != tab.main_frame)
    frame.wait_for_function("window.dinov3geo && window.dinov3geo.ready", timeout=30_000)
    assert frame.locator(".leaflet-control-layers-overlays label").all_inner_texts()[0].strip() == SCENE.name
    assert frame.evaluate("document.querySelector('img.leaflet-image-layer').naturalWidth") > 0
    assert requests == [notebook.resolve().as_uri()] and errors == []


def test_the_page_holds_its_libraries_and_their_licences(scene_page):
    page = scene_page
    from importlib import resources

    vendor = resources.files("dinov3_geo.explorer") / "vendor"
    assert "Leaflet 1.9.4" in page.html and "sourceMappingURL" not in page.html
    assert "BSD 2-Clause License" in (vendor / "leaflet" / "LICENSE").read_text()
    assert "Permission is hereby granted" in (vendor / "proj4" / "LICENSE.md").read_text()
    assert not re.search(r"""src=["']?https?://|url\(["']?https?://|@import""", page.html)   # links only


# -- the command --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_view_command_writes_the_page(results, tmp_path, capsys):
    out = tmp_path / "page.html"
    code = main(["view", str(SCENE), str(results / "canopy.tif"), str(results / "units.gpkg"), "-o", str(out)])
    assert code == 0 and out.exists()
    err = capsys.readouterr().err
    assert "page of 3 layers" in err and f"wrote {out}" in err
    before = out.read_bytes()
    assert main(["view", str(SCENE), "-o", str(out)]) == 1
    assert "exists (use --overwrite" in capsys.readouterr().err and out.read_bytes() == before


@pytest.mark.parametrize("args, code, message", [
    (["{tmp}/missing.tif"], 1, "missing.tif: file not found"),
    ([str(CHIP)], 1, "no georeference (no CRS): cannot be placed over a georeferenced scene"),
    ([str(SAMPLES / "README.md")], 1, "README.md: neither a raster nor a vector file GDAL opens"),
    (["--components", "0"], 2, "--components: components must be a whole number >= 1"),
    (["--basemap", "--max-side", "8"], 2, "--max-side: max_side must be at least 16"),
])
def test_view_command_errors_in_one_line(tmp_path, capsys, args, code, message):
    assert_one_line_error(tmp_path, capsys, args, code, message)


@pytest.mark.slow
def test_view_command_takes_one_feature_map(results, tmp_path, capsys):
    feats = str(results / "feats.zarr")
    assert_one_line_error(tmp_path, capsys, [feats, feats], 2, "outputs: one feature map per page")


def assert_one_line_error(tmp_path: Path, capsys, args: list, code: int, message: str) -> None:
    """``view`` fails with ``code`` and one line ``error: ...message...``, and writes nothing."""
    out = tmp_path / "page.html"
    argv = ["view", str(SCENE), *[a.format(tmp=tmp_path) for a in args], "-o", str(out)]
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1] and "Traceback" not in "".join(err)
    assert not list(tmp_path.iterdir())

"""``explore(scene, *outputs)``: the scene and its results as one self-contained web page."""
from __future__ import annotations

import html
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from rasterio.errors import NotGeoreferencedWarning

from dinov3_geo.errors import UsageError
from dinov3_geo.explorer import page as pages
from dinov3_geo.explorer.grid import DisplayGrid, Placement
from dinov3_geo.explorer.layers import (
    Layer,
    colour_layer,
    is_feature_raster,
    kind_of,
    open_raster,
    raster_layer,
    unique_names,
)
from dinov3_geo.explorer.similarity import (
    PageFeatures,
    check_components,
    open_on_scene,
    reduce_features,
    similarity_page,
)
from dinov3_geo.explorer.vectors import vector_layers
from dinov3_geo.io.atomic import atomic_output, check_output
from dinov3_geo.io.patchmap import CellGrid
from dinov3_geo.io.scene import open_scene

PathLike = Union[str, os.PathLike]
#: Longest side of the rasters the page holds, in pixels: about what a screen shows at once.
MAX_SIDE = 2048
#: Components the feature map is reduced to for similarity in the page.
COMPONENTS = 8
#: Height of the page when it is shown in a notebook.
NOTEBOOK_HEIGHT = 560


@dataclass
class Explorer:
    """A page made by :func:`explore`: ``html`` (the whole file), the names of its ``layers``, the
    ``notes`` it shows (what was downsampled, reduced or left out), and the reduced feature map
    behind its similarity layer (``features``, or ``None``). Shows itself in Jupyter; ``save``
    writes it."""

    html: str = field(repr=False)
    layers: list[str]
    notes: list[str]
    headline: str
    features: Optional[PageFeatures] = field(default=None, repr=False)
    seconds: float = 0.0
    output: Optional[Path] = field(default=None)

    @property
    def size(self) -> int:
        """Bytes of the page."""
        return len(self.html.encode("utf-8"))

    def save(self, path: PathLike, overwrite: bool = False) -> Path:
        """Write the page to ``path`` (atomically; an existing file only with ``overwrite``)."""
        with atomic_output(path, overwrite) as tmp:
            Path(tmp).write_text(self.html, encoding="utf-8")
        self.output = Path(path)
        return self.output

    def write_features(self, path: PathLike, overwrite: bool = False) -> Path:
        """The page's reduced feature map as a Zarr store: ``dinov3_geo.similar(scene, out,
        at=..., features=path)`` computes what the page draws for a click there."""
        if self.features is None:
            raise UsageError("features", "this page has no feature map (give it the patch features of the scene)")
        return self.features.write_store(path, overwrite)

    def summary(self) -> str:
        """What the command prints: size, resolution, the similarity's features, the file written."""
        lines = [f"page of {len(self.layers)} layers, {self.size / 2**20:.1f} MB, made in {self.seconds:.1f} s: "
                 f"{self.headline}"]
        if self.features is not None:
            lines.append(self.features.describe())
        if self.output is not None:
            lines.append(f"wrote {self.output}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return (f'<iframe srcdoc="{html.escape(self.html, quote=True)}" sandbox="allow-scripts allow-popups" '
                f'style="width: 100%; height: {NOTEBOOK_HEIGHT}px; border: 0"></iframe>')


def explore(scene: PathLike, *outputs: PathLike, basemap: bool = False, components: int = COMPONENTS,
            max_side: int = MAX_SIDE, bands: Optional[Sequence[int]] = None, scale=None,
            title: Optional[str] = None, output: Optional[PathLike] = None, overwrite: bool = False) -> Explorer:
    """An interactive map of ``scene`` and its ``outputs`` as one self-contained HTML page (no
    server; no network unless ``basemap``): the scene in colour (bands and scaling as every command
    chooses them, or ``bands``/``scale``, which other images with those bands take too), each
    output as a layer with its legend (canopy heights, classes and land units with their names and
    colours, similarity, change, vector layers with their attributes), a layer switcher, opacity,
    a scale bar and the coordinates under the cursor. A patch feature map (``embed --patch``)
    becomes a similarity layer computed in the page on click, over its PCA reduction to
    ``components`` values per cell. Rasters are read decimated to at most ``max_side`` pixels a
    side. With ``output`` the page is also written there.
    """
    t0 = time.perf_counter()
    scene, paths = Path(scene), [Path(p) for p in outputs]
    check_components(components)
    if output is not None:
        check_output(output, overwrite, inputs=[scene, *paths])
    with open_raster(scene) as ds:
        placement = Placement.of(ds)
    grid = DisplayGrid.for_scene(placement, max_side, basemap)
    names = unique_names([scene, *paths])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)     # the page says it, once
        with open_scene(scene, bands=bands, scale=scale) as sc:
            layers = [colour_layer(sc, grid, names[0])]
            features, source = _gather(layers, sc, placement, grid, zip(paths, names[1:]), components, bands, scale)
    similarity = None if features is None else similarity_page(features, placement, grid,
                                                               f"similarity to a click ({source})")
    _set_visibility(layers)
    notes = _page_notes(names[0], placement, grid, basemap, layers, features)
    title = title or f"{names[0]}: dinov3-geo explorer"
    data = {"title": title, "headline": _headline(grid), "display": _display(grid), "scene": _scene(placement),
            "basemap": pages.BASEMAP if basemap else None, "layers": [layer.page for layer in layers],
            "similarity": similarity, "notes": notes}
    page = Explorer(pages.build(title, data, basemap), [layer.name for layer in layers] +
                    ([similarity["name"]] if similarity else []), notes, data["headline"], features)
    page.seconds = time.perf_counter() - t0
    if output is not None:
        page.save(output, overwrite)
    return page


def _gather(layers: list[Layer], scene, placement: Placement, grid: DisplayGrid, named, components: int, bands,
            scale) -> tuple[Optional[PageFeatures], Optional[str]]:
    """Append the layers of each ``(path, name)`` to ``layers``; return the feature map reduced for
    the page (at most one) and its name."""
    features, source = None, None
    for path, name in named:
        if kind_of(path) == "vector":
            layers += vector_layers(path, grid, placement, name, first_colour=len(layers))
        elif kind_of(path) == "features" or is_feature_raster(path, CellGrid.of(scene)):
            if features is not None:
                raise UsageError("outputs", f"one feature map per page: {path} is a second one")
            features, source = reduce_features(open_on_scene(path, scene), components), name
        else:
            layers.append(raster_layer(path, grid, name, bands, scale))
    return features, source


def _set_visibility(layers: list[Layer]) -> None:
    """The scene and the first result are shown at first (and the similarity layer, empty until a
    click); the layer list turns the others on."""
    for i, layer in enumerate(layers):
        layer.page["visible"] = i < 2


def _page_notes(name: str, scene: Placement, grid: DisplayGrid, basemap: bool, layers: list[Layer],
                features: Optional[PageFeatures]) -> list[str]:
    notes = []
    if grid.factor > 1.0001:
        notes.append(f"downsampled: {name} ({scene.width} x {scene.height} px) and every raster are shown at "
                     f"1/{grid.factor:.3g} of the scene's resolution ({grid.width} x {grid.height} px) to keep the "
                     "page small; the files hold every pixel")
    else:
        notes.append(f"{name}: {scene.width} x {scene.height} px, shown at full resolution")
    if basemap:
        notes.append("basemap: OpenStreetMap tiles, loaded from the internet; rasters warped to Web Mercator")
    else:
        notes.append("no basemap: the page loads nothing from the internet")
        if not scene.north_up:
            notes.append("the scene's grid is not north-up: rasters warped to a north-up grid in its CRS")
    if scene.crs is None:
        notes.append("no georeference: pixel coordinates (x = column, y = -row)")
    for layer in layers:
        notes += layer.notes
    if features is not None:
        notes.append(features.describe())
    return notes


def _headline(grid: DisplayGrid) -> str:
    """One line the page always shows: at what resolution it shows the scene."""
    if grid.factor > 1.0001:
        return f"downsampled: shown at 1/{grid.factor:.3g} of full resolution ({grid.width} x {grid.height} px)"
    return "full resolution"


def _display(grid: DisplayGrid) -> dict:
    left, bottom, right, top = grid.bounds()
    crs = grid.crs
    factor = 1.0
    if crs is not None and crs.is_projected and crs.linear_units_factor:
        factor = float(crs.linear_units_factor[1])
    max_zoom = 22 if grid.basemap else int(math.ceil(math.log2(max(grid.factor, 1.0)))) + 4
    return {"basemap": grid.basemap, "bounds": grid.leaflet_bounds(), "pixel": min(grid.resolution),
            "origin": [left, top], "geographic": bool(crs is not None and crs.is_geographic),
            "metres_per_unit": factor, "min_zoom": 0 if grid.basemap else -8, "max_zoom": max_zoom,
            "scale_bar": crs is not None}


def _scene(placement: Placement) -> dict:
    crs = placement.crs
    return {"proj4": _proj4(crs), "crs_name": _crs_name(crs), "geographic": bool(crs is not None and crs.is_geographic),
            "pixel_transform": list(placement.transform)[:6] if placement.gcps is None else None}


def _proj4(crs) -> Optional[str]:
    """The CRS as a PROJ string for proj4js (lon/lat under the cursor); ``None`` if it has none."""
    if crs is None:
        return None
    import pyproj

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # "may lose projection information": fine for a readout
        try:
            return pyproj.CRS.from_wkt(crs.to_wkt()).to_proj4()
        except pyproj.exceptions.CRSError:
            return None


def _crs_name(crs) -> Optional[str]:
    if crs is None:
        return None
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else (crs.to_dict().get("proj") or "scene CRS")

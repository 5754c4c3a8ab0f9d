"""``view``: a scene and its results as one self-contained web page."""
from __future__ import annotations

import argparse
import sys

from ..explorer import explore
from .options import command


def add_commands(sub) -> list:
    view = command(sub, "view", run_view, "one self-contained web page of a scene and its results (interactive map, "
                   "similarity on click; no server, no network)",
                   "An interactive map of a scene and its results in one HTML file: layers with legends, opacity, "
                   "scale bar, coordinates, similarity search on click from a feature map (embed --patch). Nothing "
                   "is loaded from the internet unless --basemap.")
    view.add_argument("scene", help="the scene (drawn in colour under the results)")
    view.add_argument("outputs", nargs="*", help="results: COGs (canopy, classes, units, similarity, change, another "
                      "date), one feature map (embed --patch: .zarr or .tif) and vector files (GeoPackage layers, ...)")
    view.options("output", output="the page to write (.html)")
    view.own("--basemap", action="store_true", help="add OpenStreetMap under the layers (the page then loads its "
             "tiles from the internet)")
    view.own("--components", type=int, default=8, help="PCA components per cell the feature map is reduced to for "
             "similarity in the page (8)")
    view.own("--max-side", type=int, default=2048, help="longest side of the rasters in the page, pixels (2048); "
             "larger scenes are shown downsampled")
    view.own("--title", help="title of the page (default: the scene's file name)")
    view.options("bands", "scale", "overwrite")
    return [view]


def run_view(args: argparse.Namespace) -> int:
    page = explore(args.scene, *args.outputs, basemap=args.basemap, components=args.components,
                   max_side=args.max_side, bands=args.bands, scale=args.scale, title=args.title, output=args.output,
                   overwrite=args.overwrite)
    print(page.summary(), file=sys.stderr)
    return 0

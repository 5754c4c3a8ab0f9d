"""``embed``, ``similar``, ``cluster`` and ``change``: frozen DINOv3 features over scenes."""
from __future__ import annotations

import argparse
import sys

from ..analysis import change, cluster, embed, similar
from ..batch import is_batch
from ..errors import UsageError
from .options import RUN, SCENES_HELP, command, point
from .scenes import run_as_batch


def add_commands(sub) -> list:
    emb = command(sub, "embed", run_embed, "DINOv3 embeddings: one row per chip, or a patch-feature map",
                  "Embeddings of a scene: one row per non-empty chip (CLS and mean patch embedding: GeoParquet, "
                  "GeoPackage or FlatGeobuf), or with --patch the patch features at 16-px cells (Zarr or COG).")
    emb.add_argument("scene", nargs="+", help=SCENES_HELP)
    emb.options("output", output="the file to write: .parquet, .gpkg or .fgb (chips), .zarr or .tif (--patch), or a "
                "folder OUT_DIR/ for a batch (one <scene>_embed.parquet or <scene>_features.zarr each, resumable)")
    emb.own("--patch", action="store_true", help="patch features stitched at 16-px cells")
    emb.own("--pca", type=int, help="keep this many principal components of the patch features")
    sim = command(sub, "similar", run_similar, "cosine similarity to a point or polygons, on the scene's grid",
                  "Cosine similarity of every 16-px cell to the mean feature of a reference.")
    sim.add_argument("scene", help="input raster")
    sim.options("output", output="the COG to write (float32, -1..1)")
    sim.own("--at", type=point, metavar="X,Y", help="reference point X,Y in the scene's CRS (for a scene without "
            "georeference: x = column, y = -row, where GIS tools draw it); negative values may follow a space")
    sim.own("--like", help="reference polygons (any vector file; reprojected to the scene's CRS)")
    sim.options("features")
    clu = command(sub, "cluster", run_cluster, "k-means land units over patch features, on the scene's grid",
                  "k-means (MiniBatchKMeans) land units of the scene's 16-px cells.")
    clu.add_argument("scene", help="input raster")
    clu.options("output", output="the COG to write (uint8 units, 255 nodata)")
    clu.own("-k", dest="k", type=int, default=8, help="number of units (8)")
    clu.options("vector", "features", "seed")
    chg = command(sub, "change", run_change, "per-cell feature change between two dates, on the first one's grid",
                  "Cosine distance between the patch features of two dates; the second is warped onto the first "
                  "one's grid when needed; areas only one date covers are nodata.")
    chg.add_argument("before", help="first date (its grid is the output's)")
    chg.add_argument("after", help="second date")
    chg.options("output", output="the COG to write (float32, 0..2)")
    for parser in (emb, sim, clu, chg):
        parser.options("backbone", *RUN, "verify")
    emb.options("dask")
    return [emb, sim, clu, chg]


def _common(args: argparse.Namespace) -> dict:
    return dict(backbone=args.backbone, device=args.device, batch_size=args.batch_size, precision=args.precision,
                tile=args.tile, overlap=args.overlap, bands=args.bands, scale=args.scale, nodata=args.nodata,
                overwrite=args.overwrite, progress=args.progress, verify=args.verify)


def run_embed(args: argparse.Namespace) -> int:
    if is_batch(args.scene, args.output, args.dask):
        if args.pca is not None:
            raise UsageError("pca", "a batch writes full patch features (one Zarr store per scene); reduce them "
                                    "one scene at a time")
        options = _common(args)
        return run_as_batch(args, task="features" if args.patch else "embed", **options)
    result = embed(args.scene[0], args.output, patch=args.patch, pca=args.pca, **_common(args))
    print(result.summary(), file=sys.stderr)
    return 0


def run_similar(args: argparse.Namespace) -> int:
    result = similar(args.scene, args.output, at=args.at, like=args.like, features=args.features, **_common(args))
    print(result.summary(), file=sys.stderr)
    return 0


def run_cluster(args: argparse.Namespace) -> int:
    result = cluster(args.scene, args.output, k=args.k, vector=args.vector, features=args.features, seed=args.seed,
                     **_common(args))
    print(result.summary(), file=sys.stderr)
    return 0


def run_change(args: argparse.Namespace) -> int:
    print(change(args.before, args.after, args.output, **_common(args)).summary(), file=sys.stderr)
    return 0

"""``segment`` and ``classify``: a task over one scene, or over many as a batch (several scenes, a
glob, ``@list.txt``, an output folder, ``--dask``: the library decides, :func:`dinov3_geo.batch.is_batch`)."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback

from ..api import classify, segment
from ..batch import is_batch, run_batch
from ..engine import StopToken
from ..errors import UsageError
from .messages import text_in_flags
from .options import RUN, SCENES_HELP, command
from .stop import Terminated, stop_at_the_next_chip


def add_commands(sub) -> list:
    seg = command(sub, "segment", run_segment, "dense prediction over a scene (canopy height, a trained head's "
                  "classes) into a COG", "Run a dense task over a raster; write a COG on the same grid.")
    seg.add_argument("scene", nargs="+", help=SCENES_HELP)
    seg.options("output", output="the COG to write, or a folder OUT_DIR/ for a batch (one <scene>_<task>.tif "
                "each, resumable)")
    seg.own("--task", default="canopy", choices=("canopy", "segment"),
            help="canopy (CHMv2 heights in metres) or segment (a trained head's classes; --head alone says so)")
    seg.options("weights", "backbone_weights", "head", "backbone", "vector", "min_height", *RUN, "gsd",
                "max_upsample", "compile", "dtype", "verify", "dask", "split_above")
    clf = command(sub, "classify", run_classify, "classify every chip of a scene with a probe into a GeoPackage",
                  "One polygon per chip with the class, its probability and every class's.")
    clf.add_argument("scene", nargs="+", help=SCENES_HELP)
    clf.options("output", output="the GeoPackage to write (layer 'chips'), or a folder OUT_DIR/ for a batch (one "
                "<scene>_chips.gpkg each, all in mosaic_classify.gpkg; resumable)")
    clf.options("head", "backbone", *(o for o in RUN if o != "overlap"), "verify", "dask")
    return [seg, clf]


def _common(args: argparse.Namespace) -> dict:
    """The options every scene task takes, as library keywords."""
    return dict(device=args.device, batch_size=args.batch_size, precision=args.precision, tile=args.tile,
                bands=args.bands, scale=args.scale, nodata=args.nodata, overwrite=args.overwrite,
                progress=args.progress, verify=args.verify)


def _segment_options(args: argparse.Namespace) -> dict:
    return dict(head=args.head, backbone=args.backbone, weights=args.weights, backbone_weights=args.backbone_weights,
                vector=args.vector, min_height=args.min_height, gsd=args.gsd, max_upsample=args.max_upsample,
                compile=args.compile, dtype=args.dtype, overlap=args.overlap, **_common(args))


def run_segment(args: argparse.Namespace) -> int:
    if is_batch(args.scene, args.output, args.dask, args.split_above):
        return run_as_batch(args, task=args.task, split_above=args.split_above, **_segment_options(args))
    print(segment(args.scene[0], args.task, args.output, **_segment_options(args)).summary(), file=sys.stderr)
    return 0


def run_classify(args: argparse.Namespace) -> int:
    if args.head is None:
        raise UsageError("head", "give the probe to classify with (a head file from 'dinov3geo train classify')")
    options = dict(backbone=args.backbone, **_common(args))
    if is_batch(args.scene, args.output, args.dask):
        return run_as_batch(args, task="classify", head=args.head, **options)
    print(classify(args.scene[0], args.head, args.output, **options).summary(), file=sys.stderr)
    return 0


def run_as_batch(args: argparse.Namespace, **options) -> int:
    """Many scenes into the folder ``-o``: one library call; in this process the first stop signal
    is requested on the run's stop token and taken at the next chip or scene; exit 1 if any scene
    failed, 130/143 when stopped."""
    in_process = args.dask is None and not os.environ.get("DASK_SCHEDULER_ADDRESS")
    try:
        with stop_at_the_next_chip(StopToken()) if in_process else contextlib.nullcontext() as stop:
            result = run_batch(args.scene, args.output, dask=args.dask, stop=stop, **options)
    except KeyboardInterrupt as exc:
        if args.debug:
            traceback.print_exc()
        print("error: interrupted; finished scenes are kept and no partial file is left: rerun the same "
              "command to resume", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    print(text_in_flags(result.summary_text(), args.params), file=sys.stderr)
    return 0 if result.ok else 1

"""The ``dinov3geo`` command: a thin layer over :mod:`dinov3_geo.api`.

Every expected failure prints one line ``error: <file>: <problem>`` and exits 2 (usage) or 1 (a
failed run); a traceback appears only with ``--debug``. Ctrl-C and SIGTERM stop the run and leave
no file at the output paths. The library names parameters (``tile``, `` `overwrite` ``); this
layer alone speaks in flags (:func:`in_flags`).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import traceback
import warnings
from typing import Iterator, Optional, Sequence

from . import __version__
from .errors import DinoGeoError, DinoGeoWarning, UsageError
from .io.scene import MAX_UPSAMPLE


class _Parser(argparse.ArgumentParser):
    """argparse with our one-line error format and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(None, message)


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated band numbers, got '{text}'")


def _scale(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX, got '{text}'")
    if not hi > lo:
        raise argparse.ArgumentTypeError(f"MAX must be above MIN, got '{text}'")
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dinov3geo", description="DINOv3 satellite models over georeferenced rasters.")
    parser.add_argument("--version", action="version", version=f"dinov3geo {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    seg = sub.add_parser("segment", help="dense prediction over a scene (canopy height) into a COG",
                         description="Run a dense task over a raster; write a COG on the same grid.")
    seg.add_argument("scene", nargs="+", help="input raster (GeoTIFF, COG, VRT, JP2, /vsicurl/...); several "
                     "paths, a quoted glob ('scenes/*.tif') or @list.txt run a batch into the folder -o OUT_DIR/")
    seg.add_argument("--task", default="canopy", help="task to run (canopy)")
    seg.add_argument("-o", "--output", help="output COG (default: <scene>_<task>.tif beside the scene), or a "
                     "folder OUT_DIR/ for a batch (one <scene>_<task>.tif each, resumable)")
    seg.add_argument("--weights", help="task weights: CHMv2 HF folder or Meta head .pth; 'demo': a small random "
                     "model built in memory (meaningless heights, to try the tool)")
    seg.add_argument("--backbone-weights", help="backbone checkpoint for a Meta head .pth")
    seg.add_argument("--vector", help="also write polygons to this GeoPackage (canopy, or one per class region "
                     "with --head)")
    seg.add_argument("--head", help="a segmentation head file from 'dinov3geo train segment': write its classes "
                     "(uint8 COG, colour table, 255 nodata) instead of a task")
    seg.add_argument("--backbone", help="backbone for --head (default: the one the head file names)")
    seg.add_argument("--min-height", type=float, default=2.0, help="canopy threshold for --vector, metres (2)")
    _add_run_options(seg)
    seg.add_argument("--gsd", type=float, help="run at this pixel size in metres; output stays on the input grid")
    seg.add_argument("--allow-large", dest="max_upsample", action="store_const", const=None, default=MAX_UPSAMPLE,
                     help=f"allow a --gsd that upsamples more than {MAX_UPSAMPLE:g}x per axis (hours of work)")
    seg.add_argument("--compile", action="store_true",
                     help="torch.compile the model by regions: a warm-up first (shorter once the inductor "
                     "cache is warm), then faster chips; worth it on long runs, GPU or CPU")
    seg.add_argument("--dtype", default="float32", choices=("float32", "float16", "uint16"),
                     help="output type: float32 (default), float16 (half the size), uint16 (decimetres, "
                     "scale 0.1 in the file so GIS tools show metres; 65535 nodata)")
    seg.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of official files")
    seg.add_argument("--config", help="YAML file of option values (see configs/); options given on the "
                     "command line win")
    add_batch_options(seg)
    for p in (parser, seg, *_add_land_parsers(sub), *add_head_commands(sub), _add_view_parser(sub)):
        p.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """The options every pipeline run takes: device, batches, precision, chips, bands, scaling, output."""
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto)")
    p.add_argument("--batch-size", type=int, default=8, help="chips per batch (8)")
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp8 (auto: bf16 on a GPU, fp32 "
                   "on the CPU); fp8: float8 products in the backbone, fast on GPUs of compute capability "
                   "8.9+, emulated (slow, for checking) on the CPU")
    p.add_argument("--tile", type=int, help="chip size in pixels, a multiple of 16 (512; a head's training chip)")
    p.add_argument("--overlap", type=int, help="overlap between chips in pixels (64; a quarter of a head's chip)")
    p.add_argument("--bands", type=_int_list, help="three 1-based bands as R,G,B, e.g. 3,2,1")
    p.add_argument("--scale", type=_scale, help="MIN,MAX of input values mapped to 0..1 (default: "
                   "/255 for bytes, else a 2-98%% per-band stretch of the whole scene)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: only on a terminal)")


def _point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y in the scene's CRS, got '{text}'")
    return x, y


def _add_land_parsers(sub) -> list[argparse.ArgumentParser]:
    """``embed``, ``similar``, ``cluster`` and ``change``: frozen DINOv3 features over scenes."""
    emb = sub.add_parser("embed", help="DINOv3 embeddings: one GeoParquet row per chip, or a patch-feature map",
                         description="Embeddings of a scene: one GeoParquet row per non-empty chip (CLS and mean "
                         "patch embedding), or with --patch the patch features at 16-px cells (Zarr or COG).")
    emb.add_argument("scene", nargs="+", help="input raster; several paths, a quoted glob ('scenes/*.tif') or "
                     "@list.txt run a batch into the folder -o OUT_DIR/ (chip embeddings)")
    emb.add_argument("-o", "--output", required=True, help="output: .parquet, .gpkg or .fgb (chips), .zarr or .tif "
                     "(--patch), or a folder OUT_DIR/ for a batch (one <scene>_embed.parquet each, resumable)")
    emb.add_argument("--patch", action="store_true", help="patch features stitched at 16-px cells")
    emb.add_argument("--pca", type=int, help="keep this many principal components of the patch features")
    sim = sub.add_parser("similar", help="cosine similarity to a point or polygons, on the scene's grid",
                         description="Cosine similarity of every 16-px cell to the mean feature of a reference.")
    sim.add_argument("scene", help="input raster")
    sim.add_argument("-o", "--output", required=True, help="output COG (float32, -1..1)")
    sim.add_argument("--at", type=_point, help="reference point X,Y in the scene's CRS")
    sim.add_argument("--like", help="reference polygons (any vector file; reprojected to the scene's CRS)")
    sim.add_argument("--features", help="patch features of this scene (embed --patch, .zarr) instead of a run")
    clu = sub.add_parser("cluster", help="k-means land units over patch features, on the scene's grid",
                         description="k-means (MiniBatchKMeans) land units of the scene's 16-px cells.")
    clu.add_argument("scene", help="input raster")
    clu.add_argument("-o", "--output", required=True, help="output COG (uint8 units, 255 nodata)")
    clu.add_argument("-k", dest="k", type=int, default=8, help="number of units (8)")
    clu.add_argument("--vector", help="also write the units as polygons to this GeoPackage")
    clu.add_argument("--features", help="patch features of this scene (embed --patch, .zarr) instead of a run")
    chg = sub.add_parser("change", help="per-cell feature change between two dates, on the first one's grid",
                         description="Cosine distance between the patch features of two dates; the second is "
                         "warped onto the first one's grid when needed; areas only one date covers are nodata.")
    chg.add_argument("before", help="first date (its grid is the output's)")
    chg.add_argument("after", help="second date")
    chg.add_argument("-o", "--output", required=True, help="output COG (float32, 0..2)")
    for p in (emb, sim, clu, chg):
        p.add_argument("--backbone", help="backbone weights: a path or a name such as dinov3-vitl16-sat493m "
                       "(the default; with --features, the one the store names)")
        _add_run_options(p)
    add_batch_options(emb, split=False)
    return [emb, sim, clu, chg]


def _add_view_parser(sub) -> argparse.ArgumentParser:
    """``view``: the scene and its results as one self-contained web page."""
    view = sub.add_parser("view", help="one self-contained web page of a scene and its results (interactive map, "
                          "similarity on click; no server, no network)",
                          description="An interactive map of a scene and its results in one HTML file: layers "
                          "with legends, opacity, scale bar, coordinates, similarity search on click from a "
                          "feature map (embed --patch). Nothing is loaded from the internet unless --basemap.")
    view.add_argument("scene", help="the scene (drawn in colour under the results)")
    view.add_argument("outputs", nargs="*", help="results: COGs (canopy, classes, units, similarity, change, another "
                      "date), one feature map (embed --patch: .zarr or .tif) and vector files (GeoPackage layers, ...)")
    view.add_argument("-o", "--output", required=True, help="the page to write (.html)")
    view.add_argument("--basemap", action="store_true", help="add OpenStreetMap under the layers (the page then "
                      "loads its tiles from the internet)")
    view.add_argument("--components", type=int, default=8, help="PCA components per cell the feature map is "
                      "reduced to for similarity in the page (8)")
    view.add_argument("--max-side", type=int, default=2048, help="longest side of the rasters in the page, pixels "
                      "(2048); larger scenes are shown downsampled")
    view.add_argument("--title", help="title of the page (default: the scene's file name)")
    view.add_argument("--bands", type=_int_list, help="three 1-based bands of the scene as R,G,B, e.g. 3,2,1")
    view.add_argument("--scale", type=_scale, help="MIN,MAX of the scene's values mapped to dark..bright")
    view.add_argument("--overwrite", action="store_true", help="replace an existing page")
    return view


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'")


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",")]


def _geobench_tasks() -> list[str]:
    from .train.model_card import MODEL_CARD

    return list(MODEL_CARD)


def _add_training_options(p: argparse.ArgumentParser) -> None:
    """Options every ``train`` command shares."""
    p.add_argument("-o", "--output", required=True, help="head file to write (.safetensors)")
    _add_backbone_options(p)
    p.add_argument("--chip", type=int, help="chip size in px, a multiple of 16 (default: 224 for chips folders, "
                   "256 for rasters, the native size for GEO-Bench)")
    p.add_argument("--normalisation", default="auto", choices=("auto", "dataset", "backbone", "imagenet"),
                   help="chip statistics: the dataset's band statistics (GEO-Bench), the backbone's (SAT), "
                   "ImageNet's; auto: the dataset's when it has them")
    p.add_argument("--bands", type=_int_list, help="three 1-based bands as R,G,B of raster inputs")
    p.add_argument("--scale", type=_scale, help="MIN,MAX of raster values mapped to 0..1")
    p.add_argument("--seed", type=int, default=0, help="random seed (0): same data and seed, same head")
    p.add_argument("--overwrite", action="store_true", help="replace an existing head file")


def _add_backbone_options(p: argparse.ArgumentParser) -> None:
    """The backbone and where its features are computed and cached (training and evaluation)."""
    p.add_argument("--backbone", default="dinov3-vitl16-sat493m", help="backbone: dinov3-vitl16-sat493m (default), "
                   "dinov3-vit7b16-sat493m, or a path (Meta .pth, HF folder, our safetensors); 'standin': a "
                   "stand-in built in memory whose features are colour and texture statistics (not DINOv3), "
                   "'demo': random features")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto)")
    p.add_argument("--batch-size", type=int, default=8, help="chips per batch (8)")
    p.add_argument("--cache", help="feature cache folder (default: the dinov3-geo cache)")
    p.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of official files")


def add_head_commands(sub) -> list[argparse.ArgumentParser]:
    """``train classify``, ``train segment``, ``eval geobench``; returns the parsers (for --debug)."""
    train = sub.add_parser("train", help="train a head on frozen backbone features",
                           description="Train a classification probe or a segmentation head.")
    tsub = train.add_subparsers(dest="train_task", parser_class=_Parser, metavar="TASK")
    tsub.required = True
    cls = tsub.add_parser("classify", help="logistic-regression probe on CLS features (C swept on val)")
    src = cls.add_mutually_exclusive_group(required=True)
    src.add_argument("--chips", help="folder of chips per class: DIR/<class>/<image>")
    src.add_argument("--geobench", help="GEO-Bench classification task folder")
    src.add_argument("--torchgeo", help="torchgeo classification dataset class name (e.g. EuroSAT)")
    cls.add_argument("--root", help="root folder of the torchgeo dataset")
    cls.add_argument("--pooling", default="cls", choices=("cls", "cls+mean"), help="chip vector (cls)")
    cls.add_argument("--c-grid", type=_floats, help="C values to sweep (default dinov3's 45 from 1e-6 to 1e5)")
    _add_training_options(cls)
    seg = tsub.add_parser("segment", help="linear or DPT segmentation head (learning rate swept on val)")
    seg.add_argument("--image", dest="images", action="append", default=[], help="image raster (repeat per pair)")
    seg.add_argument("--labels", action="append", default=[],
                     help="label raster per --image, or one GeoPackage of polygons/points with --label-column")
    seg.add_argument("--label-column", help="attribute of the GeoPackage features holding the class")
    seg.add_argument("--classes", type=_names, dest="class_names",
                     help="class names of the label codes 0,1,2,... in order, or CODE:NAME pairs (raster labels "
                     "and numeric --label-column alike; a text column: the class order); default class_<code>")
    seg.add_argument("--geobench", help="GEO-Bench segmentation task folder")
    seg.add_argument("--torchgeo", help="torchgeo segmentation dataset class name")
    seg.add_argument("--root", help="root folder of the torchgeo dataset")
    seg.add_argument("--head", default="dpt", choices=("dpt", "linear"), help="head kind (dpt)")
    seg.add_argument("--lrs", type=_floats, help="learning rates to sweep (3e-5,1e-4,3e-4,1e-3)")
    seg.add_argument("--epochs", type=int, default=20, help="epochs per learning rate (20)")
    _add_training_options(seg)
    clf = sub.add_parser("classify", help="classify every chip of a scene with a probe into a GeoPackage",
                         description="One polygon per chip with the class, its probability and every class's.")
    clf.add_argument("scene", nargs="+", help="input raster; several paths, a quoted glob ('scenes/*.tif') or "
                     "@list.txt run a batch into the folder -o OUT_DIR/")
    clf.add_argument("--head", required=True, help="a probe head file from 'dinov3geo train classify'")
    clf.add_argument("-o", "--output", required=True, help="GeoPackage to write (layer 'chips'), or a folder "
                     "OUT_DIR/ for a batch (one <scene>_chips.gpkg each, all in mosaic_classify.gpkg; resumable)")
    clf.add_argument("--backbone", help="backbone (default: the one the head file names)")
    clf.add_argument("--tile", type=int, help="chip size in px (default: the probe's training chip size)")
    clf.add_argument("--batch-size", type=int, default=8, help="chips per batch (8)")
    clf.add_argument("--device", default="auto", help="auto, cpu or cuda (auto)")
    clf.add_argument("--precision", default="auto", help="auto, fp32 or bf16 (auto)")
    clf.add_argument("--bands", type=_int_list, help="three 1-based bands as R,G,B")
    clf.add_argument("--scale", type=_scale, help="MIN,MAX of input values mapped to 0..1")
    clf.add_argument("--overwrite", action="store_true", help="replace an existing output")
    clf.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of official files")
    clf.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar (default: only on a terminal)")
    add_batch_options(clf, split=False)
    ev = sub.add_parser("eval", help="evaluate on a benchmark", description="Evaluate frozen-backbone heads.")
    esub = ev.add_subparsers(dest="eval_suite", parser_class=_Parser, metavar="SUITE")
    esub.required = True
    gb = esub.add_parser("geobench", help="GEO-Bench protocol beside the DINOv3 model card's figures")
    gb.add_argument("--root", required=True, help="GEO-Bench root (classification_v1.0/, segmentation_v1.0/)")
    gb.add_argument("--tasks", type=_names, help="task names, comma-separated (default: every task of the model card "
                    "found): " + ", ".join(_geobench_tasks()))
    gb.add_argument("--epochs", type=int, default=20, help="segmentation epochs per learning rate (20)")
    gb.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_backbone_options(gb)
    return [train, cls, seg, clf, ev, gb]


def with_config(argv: list[str], config: str, parser: argparse.ArgumentParser) -> list[str]:
    """``argv`` with the options of a YAML file inserted after the command, so that the command
    line's own options (later in the list) win; unknown keys are a UsageError naming the file."""
    from .config import load_options

    options = load_options(config)
    command = argv.index(next(a for a in argv if a in COMMANDS))
    sub = next(a for a in parser._subparsers._group_actions[0].choices.values()
               if a.prog.endswith(argv[command]))
    known = {a.dest: a for a in sub._actions if a.option_strings}
    tokens: list[str] = []
    for key, value in options.items():
        dest = key.replace("-", "_")
        action = known.get(dest)
        if action is None or dest in ("config", "help", "debug"):
            raise UsageError(config, f"unknown option '{key}'")
        flag = action.option_strings[-1]
        if isinstance(action, argparse.BooleanOptionalAction):      # ["--progress", "--no-progress"]
            tokens.append(action.option_strings[0 if value else 1])
        elif action.nargs == 0:
            if value is not True and value is not False:
                raise UsageError(config, f"option '{key}' takes true or false, got {value!r}")
            tokens += [flag] if value else []
        else:
            text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            tokens += [flag, text]
    return argv[:command + 1] + tokens + argv[command + 1:]


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C so every cleanup path runs."""


def _stop_once(signum, frame):
    """The first Ctrl-C or SIGTERM stops the run; later ones are ignored, so that an impatient
    second Ctrl-C cannot cut the clean-up of temporary files short."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise _Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _catch_stop_signals() -> dict:
    """Route SIGINT (unless ignored, as under nohup) and SIGTERM to :func:`_stop_once`; returns
    the previous handlers."""
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _stop_once)}
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _stop_once)
    return previous


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {text_in_flags(str(message), option_names(build_parser()))}", file=sys.stderr)


#: Parameters whose flag is not ``--`` + the name with dashes.
FLAG_OF = {"verify=False": "--no-verify", "verify": "--no-verify", "images": "--image", "class_names": "--classes",
           "max_upsample": "--allow-large", "k": "-k"}
_QUOTED = re.compile(r"`([a-z_][a-z0-9_]*(?:=[A-Za-z]+)?)`")


def flag_for(param: str) -> str:
    """The command-line flag of a library parameter name (``batch_size`` -> ``--batch-size``)."""
    return FLAG_OF.get(param, "--" + param.replace("_", "-"))


def in_flags(exc: DinoGeoError, params: set[str]) -> str:
    """The error's one line with parameter names (``where``, and `` `name` `` in the text) as flags."""
    where = flag_for(exc.where) if exc.where in params else exc.where
    problem = text_in_flags(exc.problem, params)
    return f"{where}: {problem}" if where else problem


def text_in_flags(text: str, params: set[str]) -> str:
    """``text`` with every `` `name` `` of a known parameter written as its flag."""
    return _QUOTED.sub(lambda m: flag_for(m.group(1)) if m.group(1).split("=")[0] in params else m.group(1), text)


def option_names(parser: argparse.ArgumentParser) -> set[str]:
    """Every option's destination (= the library parameter) across the commands."""
    names = {a.dest for a in parser._actions if a.option_strings}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                names |= option_names(sub)
    return names | {"verify", "verify=False"}


def add_batch_options(seg: argparse.ArgumentParser, split: bool = True) -> None:
    """Options of the batch path (many scenes into a folder, optionally on a Dask cluster); ``split``:
    the command's outputs are rasters that can be cut into row bands."""
    seg.add_argument("--dask", help="batch on Dask: local[:N] (a local cluster of N worker processes) or a "
                     "scheduler address such as tcp://host:8786 (default: $DASK_SCHEDULER_ADDRESS, else in-process)")
    if split:
        seg.add_argument("--split-above", type=int, metavar="PIXELS",
                         help="batch: split scenes of more pixels into row bands run by different workers")


def is_batch(args: argparse.Namespace) -> bool:
    """Many scenes, a glob or @list, an output folder, or a Dask option: the batch path."""
    from .batch.plan import GLOB_CHARS

    out = args.output
    folder = out is not None and (out.endswith(("/", os.sep)) or (os.path.isdir(out) and not
                                                                  out.lower().endswith(".zarr")))   # a feature store
    named = any(s.startswith("@") or GLOB_CHARS & set(s) for s in args.scene)
    return len(args.scene) > 1 or named or folder or bool(args.dask or getattr(args, "split_above", None))


def batch_options(args: argparse.Namespace) -> dict:
    """The batch's task and options from ``segment`` (``--task``, or ``--head``: the segment task),
    ``classify`` or ``embed`` (``--patch``: the features task) arguments."""
    if args.command == "classify":
        return dict(task="classify", head=args.head, backbone=args.backbone, tile=args.tile)
    if args.command == "embed":
        if args.pca is not None:
            raise UsageError("pca", "a batch writes full patch features (one Zarr store per scene); "
                                    "reduce them one scene at a time")
        return dict(task="features" if args.patch else "embed", backbone=args.backbone, tile=args.tile,
                    overlap=args.overlap)
    task = "segment" if args.head is not None else args.task
    return dict(task=task, head=args.head, backbone=args.backbone, weights=args.weights,
                backbone_weights=args.backbone_weights, vector=args.vector, min_height=args.min_height,
                tile=args.tile, overlap=args.overlap, gsd=args.gsd, compile=args.compile, dtype=args.dtype,
                max_upsample=args.max_upsample, split_above=args.split_above)


def run_batch_command(args: argparse.Namespace) -> int:
    """``segment``, ``classify`` or ``embed`` over many scenes into the folder ``-o``: one library
    call; exit 1 if any failed."""
    from .batch import run_batch
    from .engine import STOP

    if args.output is None or (not args.output.endswith(("/", os.sep)) and not os.path.isdir(args.output)
                               and os.path.splitext(args.output)[1]):
        raise UsageError("--output", "many scenes (or --dask, --split-above) need an output folder: -o OUT_DIR/")
    in_process = args.dask is None and not os.environ.get("DASK_SCHEDULER_ADDRESS")
    previous = _stop_at_the_next_chip() if in_process else {}
    try:
        result = run_batch(args.scene, args.output, device=args.device, batch_size=args.batch_size,
                           precision=args.precision, bands=args.bands, scale=args.scale, overwrite=args.overwrite,
                           verify=not getattr(args, "no_verify", False), dask=args.dask, progress=args.progress,
                           **batch_options(args))
    except KeyboardInterrupt as exc:
        if args.debug:
            traceback.print_exc()
        print("error: interrupted; finished scenes are kept and no partial file is left: rerun the same "
              "command to resume", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        STOP.clear()
    print(text_in_flags(result.summary_text(), option_names(build_parser())), file=sys.stderr)
    return 0 if result.ok else 1


def _stop_at_the_next_chip() -> dict:
    """In-process batches: the first Ctrl-C or SIGTERM is recorded and raised by the run at its
    next chip or scene (a signal raised wherever it lands could cut a GDAL dataset's set-up or
    teardown short, and a batch opens and closes many); later signals are ignored. Returns the
    handlers to put back."""
    from .engine import STOP

    def record(signum, frame):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        STOP.request(_Terminated() if signum == signal.SIGTERM else KeyboardInterrupt())

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, record)}
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, record)
    return previous


@contextlib.contextmanager
def _own_warnings_only() -> Iterator[None]:
    """Inside the command: our warnings as ``warning: ...`` lines, the libraries' warnings (torch's
    pickle notes, rasterio's 'crs was not provided') hidden; all restored after."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", DinoGeoWarning)
        warnings.showwarning = _show_warning          # catch_warnings puts the previous one back
        yield


def run_classify(args: argparse.Namespace) -> int:
    from .api import classify

    if is_batch(args):
        return run_batch_command(args)
    result = classify(args.scene[0], args.head, args.output, backbone=args.backbone, tile=args.tile,
                      batch_size=args.batch_size, device=args.device, precision=args.precision,
                      bands=args.bands, scale=args.scale, overwrite=args.overwrite, progress=args.progress,
                      verify=not args.no_verify)
    print(result.summary(), file=sys.stderr)
    return 0


def run_segment(args: argparse.Namespace) -> int:
    from .api import segment

    if is_batch(args):
        return run_batch_command(args)
    if args.head is not None and args.output is None:
        raise UsageError("output", "give the class raster to write")
    result = segment(args.scene[0], task=args.task, output=args.output, head=args.head, backbone=args.backbone,
                     weights=args.weights, backbone_weights=args.backbone_weights, vector=args.vector,
                     min_height=args.min_height, device=args.device, batch_size=args.batch_size,
                     precision=args.precision, tile=args.tile, overlap=args.overlap, bands=args.bands,
                     gsd=args.gsd, scale=args.scale, overwrite=args.overwrite, compile=args.compile,
                     progress=args.progress, verify=not args.no_verify, dtype=args.dtype,
                     max_upsample=args.max_upsample)
    print(result.summary(), file=sys.stderr)
    return 0


def _run_options(args: argparse.Namespace) -> dict:
    """The options of :func:`_add_run_options` (and ``--backbone``) as library keywords."""
    return dict(backbone=args.backbone, device=args.device, batch_size=args.batch_size, precision=args.precision,
                tile=args.tile, overlap=args.overlap, bands=args.bands, scale=args.scale, overwrite=args.overwrite,
                progress=args.progress)


def run_embed(args: argparse.Namespace) -> int:
    from .analysis import embed

    if is_batch(args):
        return run_batch_command(args)
    print(embed(args.scene[0], args.output, patch=args.patch, pca=args.pca, **_run_options(args)).summary(),
          file=sys.stderr)
    return 0


def run_similar(args: argparse.Namespace) -> int:
    from .analysis import similar

    print(similar(args.scene, args.output, at=args.at, like=args.like, features=args.features,
                  **_run_options(args)).summary(), file=sys.stderr)
    return 0


def run_cluster(args: argparse.Namespace) -> int:
    from .analysis import cluster

    print(cluster(args.scene, args.output, k=args.k, vector=args.vector, features=args.features,
                  **_run_options(args)).summary(), file=sys.stderr)
    return 0


def run_change(args: argparse.Namespace) -> int:
    from .analysis import change

    print(change(args.before, args.after, args.output, **_run_options(args)).summary(), file=sys.stderr)
    return 0




def run_view(args: argparse.Namespace) -> int:
    from .explorer import explore

    print(explore(args.scene, *args.outputs, basemap=args.basemap, components=args.components,
                  max_side=args.max_side, bands=args.bands, scale=args.scale, title=args.title, output=args.output,
                  overwrite=args.overwrite).summary(), file=sys.stderr)
    return 0


def _training_kwargs(args: argparse.Namespace) -> dict:
    from .train.run import print_progress

    return dict(backbone=args.backbone, chip=args.chip, normalisation=args.normalisation, seed=args.seed,
                device=args.device, batch_size=args.batch_size, cache=args.cache, bands=args.bands,
                scale=args.scale, overwrite=args.overwrite, verify=not args.no_verify, progress=print_progress)


def run_train_classify(args: argparse.Namespace) -> int:
    from .train.fit import C_GRID
    from .train.run import train_classifier

    result = train_classifier(args.output, chips=args.chips, geobench=args.geobench, torchgeo=args.torchgeo,
                              root=args.root, pooling=args.pooling, c_grid=args.c_grid or C_GRID,
                              **_training_kwargs(args))
    print(result.summary(), file=sys.stderr)
    return 0


def run_train_segment(args: argparse.Namespace) -> int:
    from .train.fit import LR_GRID
    from .train.run import train_segmenter

    result = train_segmenter(args.output, images=args.images, labels=args.labels, label_column=args.label_column,
                             geobench=args.geobench, torchgeo=args.torchgeo, root=args.root,
                             class_names=args.class_names, head=args.head, lrs=args.lrs or LR_GRID,
                             epochs=args.epochs, **_training_kwargs(args))
    print(result.summary(), file=sys.stderr)
    return 0


def run_train(args: argparse.Namespace) -> int:
    return {"classify": run_train_classify, "segment": run_train_segment}[args.train_task](args)


def run_eval(args: argparse.Namespace) -> int:
    from .train.geobench import evaluate_geobench
    from .train.run import print_progress

    report = evaluate_geobench(args.root, tasks=args.tasks, backbone=args.backbone, epochs=args.epochs,
                               device=args.device, batch_size=args.batch_size, cache=args.cache,
                               verify=not args.no_verify, progress=print_progress)
    print(report.to_json() if args.json else report.table())
    return 0


COMMANDS = {"segment": run_segment, "train": run_train, "classify": run_classify, "eval": run_eval,
            "embed": run_embed, "similar": run_similar, "cluster": run_cluster, "change": run_change,
            "view": run_view}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns the exit code. Warning filters, the warning printer and the signal
    handlers are set for the call and restored after it (after a stop the process is ending: later
    signals stay ignored)."""
    # Idle OpenMP threads must sleep, not spin: spinning starves the reader, writer and GDAL threads
    # on small CPUs (3-4x the CPU per chip on 2 cores). Takes effect if torch is not yet imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    previous = _catch_stop_signals()
    with _own_warnings_only():
        code = _main(list(sys.argv[1:] if argv is None else argv))
    if code not in (130, 143):
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


def _main(argv: list[str]) -> int:
    """Parse and run one command; every failure becomes one ``error:`` line and an exit code."""
    debug = "--debug" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "config", None):
            args = parser.parse_args(with_config(argv, args.config, parser))
        if args.command is None:
            raise UsageError(None, "a command is required (segment); see dinov3geo --help")
        return COMMANDS[args.command](args)
    except DinoGeoError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {in_flags(exc, option_names(parser))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        if debug:
            traceback.print_exc()
        print("error: interrupted; no output was written", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    except Exception as exc:  # a bug: still one line, the traceback with --debug
        if debug:
            traceback.print_exc()
        print(f"error: internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""``train classify``, ``train segment`` and ``eval geobench``: heads on frozen backbone features."""
from __future__ import annotations

import argparse
import sys

from ..train.fit import C_GRID, LR_GRID
from ..train.geobench import evaluate_geobench
from ..train.model_card import MODEL_CARD
from ..train.run import print_progress, train_classifier, train_segmenter
from .options import Parser, command, names, numbers


def add_commands(sub) -> list:
    train = sub.add_parser("train", help="train a head on frozen backbone features",
                           description="Train a classification probe or a segmentation head.")
    tasks = train.add_subparsers(dest="train_task", parser_class=Parser, metavar="TASK")
    tasks.required = True
    cls = command(tasks, "classify", run_train_classify, "logistic-regression probe on CLS features (C swept on val)")
    cls.own("--chips", help="folder of chips per class: DIR/<class>/<image>")
    cls.options("geobench", "torchgeo", "root")
    cls.own("--pooling", default="cls", choices=("cls", "cls+mean"), help="chip vector (cls)")
    cls.own("--c-grid", type=numbers, help="C values to sweep (default dinov3's 45 from 1e-6 to 1e5)")
    _training_options(cls)
    seg = command(tasks, "segment", run_train_segment, "linear or DPT segmentation head (learning rate swept on val)")
    seg.own("--image", dest="images", action="append", default=[], help="image raster (repeat per pair)")
    seg.own("--labels", action="append", default=[],
            help="label raster per --image, or one GeoPackage of polygons/points with --label-column")
    seg.own("--label-column", help="attribute of the GeoPackage features holding the class")
    seg.own("--classes", type=names, dest="class_names",
            help="class names of the label codes 0,1,2,... in order, or CODE:NAME pairs (raster labels and numeric "
            "--label-column alike; a text column: the class order); default class_<code>")
    seg.options("geobench", "torchgeo", "root")
    seg.own("--decoder", default="dpt", choices=("dpt", "linear"), help="the head's decoder: dpt (the canopy head's, "
            "on four blocks) or linear (on the last block) (dpt)")
    seg.own("--lrs", type=numbers, help="learning rates to sweep (3e-5,1e-4,3e-4,1e-3)")
    seg.options("epochs")
    _training_options(seg)
    ev = sub.add_parser("eval", help="evaluate on a benchmark", description="Evaluate frozen-backbone heads.")
    suites = ev.add_subparsers(dest="eval_suite", parser_class=Parser, metavar="SUITE")
    suites.required = True
    gb = command(suites, "geobench", run_eval, "GEO-Bench protocol beside the DINOv3 model card's figures")
    gb.options("root")
    gb.own("--tasks", type=names, help="task names, comma-separated (default: every task of the model card found): "
           + ", ".join(MODEL_CARD))
    gb.options("epochs")
    gb.own("--json", action="store_true", help="print the results as JSON")
    gb.options("backbone", "device", "batch_size", "cache", "verify")
    return [cls, seg, gb]


def _training_options(parser: Parser) -> None:
    parser.options("output", output="the head file to write (.safetensors)")
    parser.options("backbone", "device", "batch_size", "cache", "verify")
    parser.own("--chip", type=int, help="training chip size in px, a multiple of 16 (default: 224 for chips "
               "folders, 256 for rasters, the native size for GEO-Bench)")
    parser.own("--normalisation", default="auto", choices=("auto", "dataset", "backbone", "imagenet"),
               help="chip statistics: the dataset's band statistics (GEO-Bench), the backbone's (SAT), ImageNet's; "
               "auto: the dataset's when it has them")
    parser.options("bands", "scale", "seed", "overwrite")


def _training(args: argparse.Namespace) -> dict:
    options = dict(chip=args.chip, normalisation=args.normalisation, seed=args.seed, device=args.device,
                   batch_size=args.batch_size, cache=args.cache, bands=args.bands, scale=args.scale,
                   overwrite=args.overwrite, verify=args.verify, progress=print_progress)
    if args.backbone is not None:       # else the library's default backbone
        options["backbone"] = args.backbone
    return options


def run_train_classify(args: argparse.Namespace) -> int:
    result = train_classifier(args.output, chips=args.chips, geobench=args.geobench, torchgeo=args.torchgeo,
                              root=args.root, pooling=args.pooling, c_grid=args.c_grid or C_GRID, **_training(args))
    print(result.summary(), file=sys.stderr)
    return 0


def run_train_segment(args: argparse.Namespace) -> int:
    result = train_segmenter(args.output, images=args.images, labels=args.labels, label_column=args.label_column,
                             geobench=args.geobench, torchgeo=args.torchgeo, root=args.root,
                             class_names=args.class_names, decoder=args.decoder, lrs=args.lrs or LR_GRID,
                             epochs=args.epochs, **_training(args))
    print(result.summary(), file=sys.stderr)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    options = dict(backbone=args.backbone) if args.backbone is not None else {}
    report = evaluate_geobench(args.root, tasks=args.tasks, epochs=args.epochs, device=args.device,
                               batch_size=args.batch_size, cache=args.cache, verify=args.verify,
                               progress=print_progress, **options)
    print(report.to_json() if args.json else report.table())
    return 0

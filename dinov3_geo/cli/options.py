"""The command line's options, each spelled and explained once and added to commands by name.

Every command takes the options it needs from :data:`OPTIONS`, so an option has one spelling and
one meaning across the commands (``--head`` is a head file everywhere, ``-o/--output`` is what the
command writes, ``--config FILE.yaml`` and ``--debug`` are on every command). The parser keeps the
options it was given (:attr:`Parser.specs`), from which option files (:func:`apply_config`) and
negative values after a space (:func:`join_negative_values`) are handled without argparse's
private parts.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..config import load_options
from ..errors import UsageError
from ..io.scene import MAX_UPSAMPLE


def band_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated band numbers, got '{text}'") from None


def min_max(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX, got '{text}'") from None
    if not hi > lo:
        raise argparse.ArgumentTypeError(f"MAX must be above MIN, got '{text}'")
    return lo, hi


def point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y in the scene's CRS, got '{text}'") from None
    return x, y


def numbers(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",")]


@dataclass(frozen=True)
class Option:
    """One option: its flags, its help, and argparse's other keywords (type, default, action...)."""

    flags: tuple[str, ...]
    help: str
    kw: dict = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.kw.get("dest") or self.flags[-1].lstrip("-").replace("-", "_")

    @property
    def takes_value(self) -> bool:
        return self.kw.get("action") in (None, "append")


_STRETCH = "/255 for bytes, else a 2-98%% per-band stretch of the whole scene or training set"

#: Every shared option, by its destination (the library parameter it becomes).
OPTIONS: dict[str, Option] = {o.dest: o for o in (
    Option(("-o", "--output"), "what the command writes", dict(required=True, metavar="PATH")),
    Option(("--config",), "YAML file of option values (keys are the long option names, see configs/); options "
           "given on the command line win", dict(metavar="FILE.yaml")),
    Option(("--debug",), "show tracebacks", dict(action="store_true")),
    Option(("--overwrite",), "replace existing outputs", dict(action="store_true")),
    Option(("--progress",), "progress bar (default: only on a terminal)",
           dict(action=argparse.BooleanOptionalAction, default=None)),
    Option(("--no-verify",), "skip the SHA-256 check of official weights files",
           dict(action="store_false", dest="verify")),
    # the model
    Option(("--weights",), "canopy weights: a CHMv2 Hugging Face folder or Meta's head .pth (default: found in "
           "$DINOV3GEO_WEIGHTS or the cache); 'demo': a small random model built in memory (meaningless "
           "heights, to try the tool)"),
    Option(("--backbone-weights",), "the SAT ViT-L backbone checkpoint that Meta's CHMv2 head .pth needs "
           "(default: beside it or in the cache)"),
    Option(("--head",), "a head file from 'dinov3geo train': a segmentation head (segment) or a probe (classify)",
           dict(metavar="FILE.safetensors")),
    Option(("--backbone",), "backbone: dinov3-vitl16-sat493m (the default), dinov3-vit7b16-sat493m or a path (Meta "
           ".pth, HF folder, our safetensors); 'standin': built in memory, features of colour and texture (not "
           "DINOv3); 'demo': random; with --head, the one the head names unless given; with --features, the "
           "store's"),
    # how it runs
    Option(("--device",), "auto, cpu or cuda (auto: a GPU when there is one)", dict(default="auto")),
    Option(("--batch-size",), "chips per batch (8)", dict(type=int, default=8)),
    Option(("--precision",), "auto, fp32, bf16 or fp8 (auto: bf16 on a GPU, fp32 on the CPU); fp8: float8 "
           "products in the backbone, fast on GPUs of compute capability 8.9+, emulated on the CPU",
           dict(default="auto")),
    Option(("--compile",), "torch.compile the model by regions: a warm-up first (shorter once the inductor "
           "cache is warm), then faster chips; worth it on long runs, GPU or CPU", dict(action="store_true")),
    # the chips and the pixels
    Option(("--tile",), "chip size in pixels, a multiple of 16 (default: the task's: 512, a head's training chip)",
           dict(type=int)),
    Option(("--overlap",), "overlap between chips in pixels (default: the task's: 64, or a quarter of --tile; "
           "none for a probe)", dict(type=int)),
    Option(("--bands",), "1 or 3 band numbers (from 1) as R,G,B, e.g. 3,2,1 (default: by colour interpretation "
           "or band names)", dict(type=band_list, metavar="R,G,B")),
    Option(("--scale",), f"MIN,MAX of input values mapped to 0..1 (default: {_STRETCH})",
           dict(type=min_max, metavar="MIN,MAX")),
    Option(("--nodata",), "a value marking invalid input pixels where every band has it (replaces the file's own "
           "masks)", dict(type=float)),
    Option(("--gsd",), "run at this pixel size in metres; the output stays on the input grid", dict(type=float)),
    Option(("--allow-large",), f"allow a --gsd that upsamples more than {MAX_UPSAMPLE:g}x per axis (hours of work)",
           dict(dest="max_upsample", action="store_const", const=None, default=MAX_UPSAMPLE)),
    # outputs
    Option(("--vector",), "also write polygons to this GeoPackage", dict(metavar="FILE.gpkg")),
    Option(("--min-height",), "canopy polygons: the height threshold in metres (2)", dict(type=float, default=2.0)),
    Option(("--dtype",), "output type: float32 (default), float16 (half the size), uint16 (decimetres, scale 0.1 "
           "in the file so GIS tools show metres; 65535 nodata)",
           dict(default="float32", choices=("float32", "float16", "uint16"))),
    # many scenes
    Option(("--dask",), "batch on Dask: local[:N] (a local cluster of N worker processes) or a scheduler address "
           "such as tcp://host:8786 (default: $DASK_SCHEDULER_ADDRESS, else in this process)"),
    Option(("--split-above",), "batch: split scenes of more pixels into row bands run by different workers",
           dict(type=int, metavar="PIXELS")),
    # features and training
    Option(("--features",), "patch features of this scene (embed --patch: .zarr or .tif) instead of running the "
           "backbone"),
    Option(("--cache",), "feature cache folder (default: the dinov3-geo cache)"),
    Option(("--geobench",), "a GEO-Bench task folder (classification or segmentation, as the command trains)"),
    Option(("--torchgeo",), "a torchgeo dataset class name (EuroSAT, ...; RasterDataset: DIR/images with "
           "DIR/labels)"),
    Option(("--root",), "root folder of the data: a torchgeo dataset's (train), GEO-Bench's with "
           "classification_v1.0/ and segmentation_v1.0/ (eval geobench); nothing is downloaded"),
    Option(("--epochs",), "segmentation epochs per learning rate (20)", dict(type=int, default=20)),
    Option(("--seed",), "random seed (0): same data and seed, same result", dict(type=int, default=0)),
)}

#: The options of every pipeline run over scenes.
RUN = ("device", "batch_size", "precision", "tile", "overlap", "bands", "scale", "nodata", "overwrite", "progress")
SCENES_HELP = ("input raster (GeoTIFF, COG, VRT, JP2, /vsicurl/...); several paths, a quoted glob "
               "('scenes/*.tif') or @list.txt run a batch into the folder -o OUT_DIR/")


class Parser(argparse.ArgumentParser):
    """argparse with our one-line error format (exit code 2) and the record of the shared options
    it was given (:attr:`specs`, by destination)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.specs: dict[str, Option] = {}
        self.commands: list["Parser"] = []

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(None, message)

    def options(self, *dests: str, **helps: str) -> "Parser":
        """Add the shared options ``dests`` (``helps``: a command's own help of an option, the
        ``output``'s above all: what this command writes)."""
        for dest in dests:
            spec = OPTIONS[dest]
            self.add_argument(*spec.flags, help=helps.get(dest, spec.help), **spec.kw)
            self.specs[dest] = spec
        return self

    def own(self, *flags: str, **kw) -> None:
        """An option of this command alone, recorded like the shared ones."""
        spec = Option(tuple(flags), kw.pop("help", ""), kw)
        self.add_argument(*flags, help=spec.help, **kw)
        self.specs[spec.dest] = spec


def command(sub, name: str, run: Callable, help: str, description: Optional[str] = None) -> Parser:
    """A command's parser with ``--config`` and ``--debug``, running ``run(args)``."""
    parser = sub.add_parser(name, help=help, description=description or help)
    parser.options("config", "debug")
    parser.set_defaults(run=run, parser=parser)
    return parser


# -- option files and negative values -------------------------------------------------------------

def apply_config(parser: Parser, path: str) -> None:
    """The option values of the YAML file ``path`` as ``parser``'s defaults (so the command line's
    own options win); unknown options and wrong values are a UsageError naming the file."""
    values = {}
    for key, value in load_options(path).items():
        dest = key.replace("-", "_")
        spec = parser.specs.get(dest)
        if spec is None or dest in ("config", "debug", "output"):
            raise UsageError(path, f"unknown option '{key}' for this command")
        values[dest] = _config_value(spec, key, value, path)
    parser.set_defaults(**values)


def _config_value(spec: Option, key: str, value: Any, path: str) -> Any:
    action = spec.kw.get("action")
    if action is not None and action != "append":
        if not isinstance(value, bool):
            raise UsageError(path, f"option '{key}' takes true or false, got {value!r}")
        if action == "store_const":
            return spec.kw["const"] if value else spec.kw.get("default")
        return (not value) if action == "store_false" else value
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    try:
        converted = spec.kw.get("type", str)(text)
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        raise UsageError(path, f"option '{key}': {exc or 'not a valid value'}") from None
    if "choices" in spec.kw and converted not in spec.kw["choices"]:
        raise UsageError(path, f"option '{key}' is one of {', '.join(spec.kw['choices'])}, got {value!r}")
    return converted


_NEGATIVE = re.compile(r"^-(\d|\.\d)")


def join_negative_values(argv: list[str], value_flags: set[str]) -> list[str]:
    """``argv`` with every option that takes a value joined to a following value that starts with
    a minus sign (``--at -13639635,4555275`` -> ``--at=-13639635,4555275``), which argparse would
    otherwise take for an option."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in value_flags and i + 1 < len(argv) and _NEGATIVE.match(argv[i + 1]):
            out.append(f"{token}={argv[i + 1]}" if token.startswith("--") else f"{token}{argv[i + 1]}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out

"""The ``dinov3geo`` command: a thin layer over the Python API, one module per command group.

Every command is one library call (:mod:`.scenes`: segment, classify; :mod:`.land`: embed,
similar, cluster, change; :mod:`.train`: train, eval; :mod:`.view`), with its options taken from
one table (:mod:`.options`: one spelling and one meaning each, ``--config`` and ``--debug`` on every
command). Every expected failure prints one line ``error: <file>: <problem>`` and exits 2 (usage)
or 1 (a failed run); a traceback appears only with ``--debug``. Ctrl-C and SIGTERM stop the run
and leave no file at the output paths (:mod:`.stop`). The library names parameters; here alone
they are flags (:mod:`.messages`).
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Optional, Sequence

from .. import __version__
from ..errors import DinoGeoError, UsageError
from ..hostmem import keep_freed_memory
from . import land, scenes, train, view
from .messages import in_flags, own_warnings_only
from .options import Parser, apply_config, join_negative_values
from .stop import Terminated, restore, stop_signals

__all__ = ["main", "build_parser", "parse", "parameters"]


def build_parser() -> Parser:
    """The whole command line: every command's parser under ``dinov3geo`` (``.commands`` lists
    them, the train and eval sub-commands included)."""
    parser = Parser(prog="dinov3geo", description="DINOv3 satellite models over georeferenced rasters.")
    parser.add_argument("--version", action="version", version=f"dinov3geo {__version__}")
    parser.options("debug")
    sub = parser.add_subparsers(dest="command", parser_class=Parser, metavar="COMMAND")
    parser.commands = [p for group in (scenes, land, train, view) for p in group.add_commands(sub)]
    return parser


def parse(argv: Sequence[str], parser: Optional[Parser] = None):
    """The arguments of a command line as the command reads them: values that start with a minus
    sign taken after a space, and a ``--config`` file's values as defaults the command line
    overrides. A UsageError for anything argparse or the file refuses."""
    parser = parser or build_parser()
    argv = join_negative_values(list(argv), {flag for p in (parser, *parser.commands) for spec in p.specs.values()
                                             if spec.takes_value for flag in spec.flags})
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        apply_config(args.parser, args.config)
        args = parser.parse_args(argv)
    return args


def parameters(parser: Parser) -> set[str]:
    """Every library parameter a flag of the command line stands for."""
    return {dest for p in (parser, *parser.commands) for dest in p.specs} | {"verify=False"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns the exit code. The warning printer and the signal handlers are set
    for the call and restored after it (after a stop the process is ending: later signals stay
    ignored). The command keeps the memory its run frees (:func:`dinov3_geo.hostmem.keep_freed_memory`:
    the command's choice, not the library's, set once for this process and the workers it starts;
    ``DINOV3GEO_KEEP_FREED_MEMORY=0`` leaves the allocator alone)."""
    # Idle OpenMP threads must sleep, not spin: spinning starves the reader, writer and GDAL threads
    # on small CPUs (3-4x the CPU per chip on 2 cores). Takes effect if torch is not yet imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    keep_freed_memory()
    parser = build_parser()
    params = parameters(parser)
    previous = stop_signals()
    with own_warnings_only(params):
        code = _run(parser, params, list(sys.argv[1:] if argv is None else argv))
    if code not in (130, 143):
        restore(previous)
    return code


def _run(parser: Parser, params: set[str], argv: list[str]) -> int:
    """Parse and run one command; every failure becomes one ``error:`` line and an exit code."""
    debug = "--debug" in argv
    try:
        args = parse(argv, parser)
        if args.command is None:
            raise UsageError(None, "a command is required (segment, classify, embed, similar, cluster, change, "
                                   "train, eval, view); see dinov3geo --help")
        args.params = params
        return args.run(args)
    except DinoGeoError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {in_flags(exc, params)}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt as exc:
        if debug:
            traceback.print_exc()
        print("error: interrupted; no output was written", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except Exception as exc:  # a bug: still one line, the traceback with --debug
        if debug:
            traceback.print_exc()
        print(f"error: internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)",
              file=sys.stderr)
        return 1

"""What the command prints: the library's errors and warnings in the command line's words.

The library names its parameters (``tile``, `` `overwrite` ``); here alone they become flags
(``--tile``, ``--overwrite``). A usage error's ``where`` is a parameter; any other error's is a file
and is printed as it is. Our warnings print as ``warning: ...`` lines, each once per command; the
libraries' own warnings (torch's pickle notes, rasterio's 'crs was not provided') are hidden.
"""
from __future__ import annotations

import contextlib
import re
import sys
import warnings
from typing import Iterator

from ..errors import DinoGeoError, DinoGeoWarning, UsageError

#: Parameters whose flag is not ``--`` + the name with dashes.
FLAG_OF = {"verify=False": "--no-verify", "verify": "--no-verify", "images": "--image", "class_names": "--classes",
           "max_upsample": "--allow-large", "k": "-k", "head_kind": "--decoder"}
_QUOTED = re.compile(r"`([a-z_][a-z0-9_]*(?:=[A-Za-z]+)?)`")


def flag_for(param: str) -> str:
    """The command-line flag of a library parameter name (``batch_size`` -> ``--batch-size``)."""
    return FLAG_OF.get(param, "--" + param.replace("_", "-"))


def in_flags(exc: DinoGeoError, params: set[str]) -> str:
    """The error's one line: a usage error's parameter as its flag, and every `` `name` `` of a
    parameter in the text as its flag; a file stays a file."""
    where = exc.where
    if isinstance(exc, UsageError) and where in params:
        where = flag_for(where)
    problem = text_in_flags(exc.problem, params)
    return f"{where}: {problem}" if where else problem


def text_in_flags(text: str, params: set[str]) -> str:
    """``text`` with every `` `name` `` of a known parameter written as its flag."""
    return _QUOTED.sub(lambda m: flag_for(m.group(1)) if m.group(1).split("=")[0] in params else m.group(1), text)


@contextlib.contextmanager
def own_warnings_only(params: set[str]) -> Iterator[None]:
    """Inside the command: our warnings as ``warning: ...`` lines (each text once), the libraries'
    warnings hidden; all restored after."""
    said: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = text_in_flags(str(message), params)
        if text not in said:
            said.add(text)
            print(f"warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", DinoGeoWarning)
        warnings.showwarning = show          # catch_warnings puts the previous one back
        yield

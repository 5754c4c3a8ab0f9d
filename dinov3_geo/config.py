"""Option files: a YAML mapping of command-line options (``tile: 256``, ``precision: bf16``).

``dinov3geo segment scene.tif --config configs/canopy-gpu.yaml`` takes its option values from the
file; options given on the command line win. Keys are the long option names, with ``-`` or ``_``.
"""
from __future__ import annotations

import os
from typing import Any

import yaml

from .errors import UsageError, short_message


def load_options(path: os.PathLike | str) -> dict[str, Any]:
    """The option mapping of a YAML file; a UsageError naming the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise UsageError(path, "config file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UsageError(path, f"not a readable YAML file: {short_message(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise UsageError(path, "expected a mapping of option names to values")
    return data

"""Exception types of dinov3-geo.

Every expected failure is a :class:`DinoGeoError` carrying the file (or option) it concerns and the
cause in words, so the command line can print one line ``error: <file>: <problem>`` and exit (the
exit codes are the command line's: 2 for a usage error, 1 for any other).
"""
from __future__ import annotations

import os
from typing import Optional


def short_message(exc: BaseException) -> str:
    """The first line of an exception's text, at most 200 characters (no walls of GDAL or torch text)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class DinoGeoError(Exception):
    """Base of all expected failures: ``where`` names the file or option, ``problem`` the cause."""

    def __init__(self, where: Optional[os.PathLike | str], problem: str):
        self.where = None if where is None else str(where)
        self.problem = problem
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}" if self.where else self.problem


class UsageError(DinoGeoError):
    """A wrong option or argument (``where`` names the parameter)."""


class InputError(DinoGeoError):
    """An input raster that cannot be read or used."""


class WeightsError(DinoGeoError):
    """A checkpoint that is missing, damaged, unsafe or of another model."""


class WeightsNotFoundError(WeightsError):
    """No weights were found locally and downloading is not allowed."""


class OutputError(DinoGeoError):
    """An output that cannot be written (folder missing, read-only, exists, is the input)."""


class DeviceError(DinoGeoError):
    """The requested device is not available."""


class DinoGeoWarning(UserWarning):
    """Something the user should know that does not stop the run (pixel size, band choice)."""

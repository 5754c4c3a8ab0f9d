"""Stopping a run from outside it: a token the caller creates and passes to the run."""
from __future__ import annotations

from typing import Optional


class StopToken:
    """A stop asked for from outside a run: a signal handler (which must not raise wherever the
    signal lands, e.g. inside the set-up of a GDAL dataset), another thread, a user interface.

    The caller creates one, passes it to a run (``stop=``) and calls :meth:`request`; the run
    raises the exception at its next chip or scene (:meth:`raise_if_requested`), and its clean-up
    leaves no partial file. One token may serve several runs; a new run needs a new token once it
    was requested."""

    def __init__(self) -> None:
        self._exc: Optional[BaseException] = None

    def request(self, exc: Optional[BaseException] = None) -> None:
        """Ask the runs holding this token to stop by raising ``exc`` (default ``KeyboardInterrupt``,
        which every clean-up path handles as a Ctrl-C). The first request wins."""
        if self._exc is None:
            self._exc = exc if exc is not None else KeyboardInterrupt()

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self._exc is not None

    def raise_if_requested(self) -> None:
        """Raise the requested exception, if any (called by runs between chips and scenes)."""
        if self._exc is not None:
            raise self._exc


def check(stop: Optional[StopToken]) -> None:
    """Raise what ``stop`` asks for; nothing without a token."""
    if stop is not None:
        stop.raise_if_requested()

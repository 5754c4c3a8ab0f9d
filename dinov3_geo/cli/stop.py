"""Ctrl-C and SIGTERM: the run stops and leaves no file at the output paths.

A single run stops where the signal lands (:func:`stop_signals`: the first signal raises
``KeyboardInterrupt``, later ones are ignored so that an impatient second Ctrl-C cannot cut the
clean-up short). A batch in this process opens and closes many GDAL datasets, whose set-up must not
be cut: there the signal is recorded in the stop token the command passes to the run, which raises
it at its next chip or scene (:func:`stop_at_the_next_chip`).
"""
from __future__ import annotations

import contextlib
import signal
from typing import Iterator

from ..engine import StopToken


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C so every cleanup path runs."""


def _stop_once(signum, frame):
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _route(handler) -> dict:
    """SIGTERM, and SIGINT unless ignored (as under nohup), to ``handler``; the previous handlers."""
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, handler)}
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, handler)
    return previous


def _restore(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def stop_signals() -> dict:
    """Route the stop signals to an immediate ``KeyboardInterrupt``; returns the previous handlers
    (to put back with :func:`restore` unless the process is ending after a stop)."""
    return _route(_stop_once)


restore = _restore


@contextlib.contextmanager
def stop_at_the_next_chip(stop: StopToken) -> Iterator[StopToken]:
    """Within the block, the first stop signal is requested on ``stop`` (the token given to the
    run, which raises it at its next chip or scene); later ones are ignored; the handlers are put
    back after. Yields ``stop``."""
    def record(signum, frame):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        stop.request(Terminated() if signum == signal.SIGTERM else KeyboardInterrupt())

    previous = _route(record)
    try:
        yield stop
    finally:
        _restore(previous)

"""Running a model over a plan's chips: :func:`run_chips`, with an engine made for the run or one
kept for the model's many scenes (:func:`keep_engine`, :func:`engine_for`)."""
from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch

from ..errors import UsageError
from ..io.tiling import ChipPlan
from .core import Consumer, Engine, RunStats
from .settings import RunSettings
from .stop import StopToken


def run_chips(scene, model: torch.nn.Module, consumer: Consumer, plan: ChipPlan, settings: RunSettings,
              progress: Optional[bool] = None, mean: Optional[Sequence[float]] = None,
              std: Optional[Sequence[float]] = None, engine: Optional[Engine] = None,
              stop: Optional[StopToken] = None) -> RunStats:
    """Run ``model`` over every chip of ``plan`` on ``scene`` (a :class:`~dinov3_geo.io.scene.Scene`)
    and hand each chip's float32 output to ``consumer`` (``add``/``skip``, then ``close``).

    Chips without a valid pixel are skipped; others are padded to the tile by reflection, scaled to
    0..1, normalised (``mean``/``std``, else the model's ``normalise``) and run in batches of
    ``settings.batch_size`` (halved on out-of-GPU-memory, with a note). A warm-up batch runs first
    on a GPU or when compiling. ``engine``: an :class:`Engine` of ``model`` kept for many scenes
    (its settings and statistics are the ones it was built with; it compiles and warms up once);
    default a new one. ``stop``: a :class:`StopToken`; once requested, the run raises its
    exception before the next chip and ``consumer`` writes nothing. Returns the run's
    :class:`RunStats`.
    """
    if (scene.height, scene.width) != (plan.height, plan.width):
        raise UsageError("plan", f"plan is for a {plan.width} x {plan.height} grid, the scene is "
                                 f"{scene.width} x {scene.height}")
    engine = engine_for(model, settings, engine, mean=mean, std=std)
    warm = engine.prepare(plan.tile)      # compile, kernels, cuBLAS: before the chips
    stats = engine.run(scene, plan, consumer, progress=progress, stop=stop)
    stats.warmup_seconds = warm
    return stats


#: Engines kept for their models (:func:`keep_engine`), while the model lives.
_KEPT: "weakref.WeakKeyDictionary[torch.nn.Module, Engine]" = weakref.WeakKeyDictionary()


def keep_engine(model: torch.nn.Module, settings: RunSettings) -> Engine:
    """An engine of ``model`` that every later run of it with these ``settings`` (and the model's
    own statistics) uses when given none: a batch worker keeps one, so that the model is moved,
    compiled and warmed up once for all its scenes whatever writes them."""
    engine = Engine(model, settings)
    _KEPT[model] = engine
    return engine


def engine_for(model: torch.nn.Module, settings: RunSettings, engine: Optional[Engine] = None,
               mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> Engine:
    """``engine`` when given (a UsageError if it runs another model), else the one kept for
    ``model`` (:func:`keep_engine`) when it has these settings and no other statistics are asked
    for, else a new engine of ``model``."""
    if engine is None:
        kept = _KEPT.get(model)
        if kept is not None and kept.settings == settings and mean is None and std is None:
            return kept
        return Engine(model, settings, mean=mean, std=std)
    if engine.model is not model:
        raise UsageError("engine", "the engine was built for another model")
    return engine

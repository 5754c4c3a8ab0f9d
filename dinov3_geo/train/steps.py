"""The steps every way of training shares: the backbone, the chips' normalisation, the options
and classes checked before any work, and the frozen features (cached)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from ..errors import InputError, UsageError
from ..models import registry
from ..models.backbone import Backbone
from ..models.load import load_backbone
from . import datasets as ds_mod
from .datasets import ChipDataset
from .features import Features, default_cache, extract_features
from .labels import report_classes, report_labels

PathLike = Union[str, os.PathLike]
Progress = Optional[Callable[[str], None]]
DEFAULT_BACKBONE = "dinov3-vitl16-sat493m"
NORMALISATIONS = ("auto", "dataset", "backbone", "imagenet")


def resolve_backbone(backbone: Union[str, PathLike, Backbone], device: str = "cpu", verify: bool = True) -> Backbone:
    """A loaded backbone from a registry name, a path, or an already loaded one."""
    if isinstance(backbone, Backbone):
        return backbone.to(device)
    return load_backbone(backbone, device=device, verify=verify)


def chip_normalisation(ds: ChipDataset, backbone: Backbone, choice: str) -> tuple[tuple, tuple, str]:
    """(mean, std, source) of the chips: the dataset's own statistics (``dataset``; GEO-Bench's
    protocol), the backbone's (SAT), ImageNet's, or ``auto`` (the dataset's when it has them)."""
    if choice not in NORMALISATIONS:
        raise UsageError("normalisation", f"unknown normalisation {choice!r} ({', '.join(NORMALISATIONS)})")
    if choice in ("auto", "dataset") and ds.mean is not None:
        return tuple(ds.mean), tuple(ds.std), "dataset"
    if choice == "dataset":
        raise UsageError("normalisation", "this training source has no band statistics; use backbone or imagenet")
    if choice == "imagenet":
        return registry.IMAGENET_MEAN, registry.IMAGENET_STD, "imagenet"
    return tuple(backbone.mean), tuple(backbone.std), "backbone"


def check_options(*, epochs=None, lrs=None, c_grid=None, batch_size=None, chip=None, pooling=None, decoder=None,
                  normalisation=None) -> None:
    """Every training option checked before any data, backbone or feature is touched: one
    UsageError naming the option."""
    def whole(name: str, value, least: int, what: str) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least):
            raise UsageError(name, f"{what} must be a whole number of at least {least}, got {value!r}")

    whole("epochs", epochs, 1, "the number of epochs")
    whole("batch_size", batch_size, 1, "the batch size")
    for name, grid, what in (("lrs", lrs, "learning rates"), ("c_grid", c_grid, "C values")):
        if grid is None:
            continue
        values = list(grid)
        if not values or not all(isinstance(v, (int, float, np.number)) and np.isfinite(v) and v > 0 for v in values):
            raise UsageError(name, f"{what} must be positive numbers, got {values!r}")
    if chip is not None:
        ds_mod.validate_chip(chip)
    for name, value, allowed in (("pooling", pooling, ("cls", "cls+mean")), ("decoder", decoder, ("linear", "dpt")),
                                 ("normalisation", normalisation, NORMALISATIONS)):
        if value is not None and value not in allowed:
            raise UsageError(name, f"{name} must be one of {', '.join(allowed)}, not {value!r}")


def check_classes(ds: ChipDataset, progress: Progress = None) -> dict:
    """Count, show and check the examples per class (once per dataset; see :func:`.labels.report_classes`)."""
    if ds.counts is None:
        if ds.multilabel:
            ds.counts = report_labels(ds, progress)
        else:
            ds.counts = report_classes(ds.task, ds.class_names, ds.labels, ds.splits, ds.source, ds.notes, progress)
    return ds.counts


def backbone_features(backbone, ds, mean, std, kind, device, cache, batch_size, progress) -> Features:
    """The frozen backbone's features of a dataset's chips (from the cache when there), with
    progress lines; a chip whose features are not finite is an InputError naming the source."""
    computed = []

    def report(done: int, total: int) -> None:
        computed.append(done)
        if progress and (done == total or done % max(1, total // 10) < batch_size):
            progress(f"features: {done}/{total} chips")

    if progress:
        progress(f"features: {len(ds.images)} chips of {ds.chip_size} px through {backbone.name} "
                 f"({'CLS and mean patch' if kind == 'vector' else 'patch tokens'})")
    feats = extract_features(backbone, ds.images, mean, std, kind=kind, batch_size=batch_size, device=device,
                             cache=cache, progress=report)
    if progress and not computed:
        progress(f"features: read from the cache {cache}")
    if not all(bool(torch.isfinite(t).all()) for t in feats.to_tensors().values()):
        raise InputError(ds.source, "the backbone's features hold NaN or infinite values (NaN pixels in the chips?)")
    return feats


def feature_cache(cache: Union[None, bool, PathLike]) -> Optional[Path]:
    """The feature cache folder: ``cache``, the default one (``None``/``True``), or none (``False``)."""
    if cache is False:
        return None
    return default_cache() if cache in (None, True) else Path(cache)

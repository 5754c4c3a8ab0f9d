"""Train a head end to end: training data -> frozen features -> fitted head -> one head file.

``train_classifier`` and ``train_segmenter`` are what ``dinov3geo train classify|segment`` call.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from ..engine import resolve_device
from ..errors import UsageError
from ..io.atomic import check_output
from ..models.backbone import Backbone
from ..models.heads.io import default_colors, save_head
from . import datasets as ds_mod
from .datasets import ChipDataset
from .features import backbone_identity
from .fit import C_GRID, LR_GRID, fit_probe, fit_segmenter, predict_segmentation
from .geobench_data import geobench_task
from .metrics import scores
from .multilabel import fit_multilabel
from .steps import (  # noqa: F401
    DEFAULT_BACKBONE,
    NORMALISATIONS,
    backbone_features,
    check_classes,
    check_options,
    chip_normalisation,
    feature_cache,
    resolve_backbone,
)
from .torchgeo_source import torchgeo_dataset

PathLike = Union[str, os.PathLike]
Progress = Optional[Callable[[str], None]]


@dataclass
class TrainResult:
    """What training wrote and how well the head did."""

    output: Path
    task: str
    head: str
    class_names: list[str]
    metrics: dict
    data: dict
    choice: str
    seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Closing lines of the command."""
        d = self.data
        lines = [f"trained a {self.head} head ({self.task}, {len(self.class_names)} classes) on {d['chips']} chips of "
                 f"{d['chip_size']} px from {d['source']} in {self.seconds:.1f} s; {self.choice}"]
        for split, values in self.metrics.items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float))
            lines.append(f"{split}: {shown}")
        if "test" not in self.metrics:
            lines.append("test: none (this source has no test split: GEO-Bench and torchgeo datasets with one report "
                         "test metrics)")
        lines.append(f"wrote {self.output}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _base_meta(ds: ChipDataset, backbone: Backbone, mean, std, norm_source: str) -> dict:
    """Metadata every head file carries, whatever the head."""
    return {"task": ds.task, "class_names": list(ds.class_names),
            "colors": [list(c) for c in default_colors(len(ds.class_names))],
            "backbone": backbone_identity(backbone),
            "normalisation": {"mean": list(mean), "std": list(std), "source": norm_source},
            "bands": ds.bands, "scale": ds.scale, "chip_size": ds.chip_size, "training": ds.summary(),
            "ignore_classes": list(ds.ignore_classes), "class_counts_per_split": ds.counts,
            **({"class_codes": list(ds.codes)} if ds.codes is not None else {})}


def fit_classifier(ds: ChipDataset, backbone: Backbone, *, pooling: str = "cls", Cs: Sequence[float] = C_GRID,
                   normalisation: str = "auto", seed: int = 0, device: str = "cpu", batch_size: int = 16,
                   cache=None, progress: Progress = None):
    """Fit a logistic-regression probe on a classification dataset; returns (probe, meta, metrics, choice)."""
    if ds.task != "classify":
        raise UsageError("task", "this training data is for segmentation, not classification")
    check_options(c_grid=Cs, batch_size=batch_size, pooling=pooling, normalisation=normalisation)
    if ds.multilabel:
        return fit_multilabel(ds, backbone, pooling=pooling, Cs=Cs, normalisation=normalisation, seed=seed,
                              device=device, batch_size=batch_size, cache=feature_cache(cache), progress=progress)
    check_classes(ds, progress)
    mean, std, source = chip_normalisation(ds, backbone, normalisation)
    feats = backbone_features(backbone, ds, mean, std, "vector", device, feature_cache(cache), batch_size, progress)
    tr, va = ds.splits["train"], ds.splits["val"]
    fit = fit_probe(feats.take(tr), ds.labels[tr], feats.take(va), ds.labels[va], len(ds.class_names),
                    pooling, Cs, seed, refit=True, progress=progress)
    metrics = {"val": {"accuracy": fit.val_accuracy}}
    if "test" in ds.splits:
        te = ds.splits["test"]
        with torch.no_grad():
            pred = fit.probe(torch.from_numpy(feats.take(te).vectors(pooling))).argmax(1).numpy()
        metrics["test"] = scores(ds.labels[te], pred, len(ds.class_names), "classify")
    meta = {**_base_meta(ds, backbone, mean, std, source), "head": "probe", "pooling": pooling,
            "layers": [backbone.depth - 1],
            "fit": {"C": fit.C, "sweep": fit.sweep, "refit": "train+val"}, "metrics": metrics}
    return fit.probe, meta, metrics, f"C = {fit.C:.3g} chosen on val"


def fit_segmentation(ds: ChipDataset, backbone: Backbone, *, decoder: str = "dpt", lrs: Sequence[float] = LR_GRID,
                     epochs: int = 20, normalisation: str = "auto", seed: int = 0, device: str = "cpu",
                     batch_size: int = 8, cache=None, progress: Progress = None):
    """Train a linear or DPT segmentation head; returns (head, meta, metrics, choice)."""
    if ds.task != "segment":
        raise UsageError("task", "this training data is for classification, not segmentation")
    check_options(epochs=epochs, lrs=lrs, batch_size=batch_size, decoder=decoder, normalisation=normalisation)
    check_classes(ds, progress)
    mean, std, source = chip_normalisation(ds, backbone, normalisation)
    feats = backbone_features(backbone, ds, mean, std, "last" if decoder == "linear" else "layers", device, feature_cache(cache),
                      batch_size, progress)
    tr, va = ds.splits["train"], ds.splits["val"]
    k = len(ds.class_names)
    fit = fit_segmenter(decoder, feats.take(tr), ds.labels[tr], feats.take(va), ds.labels[va], k, backbone.embed_dim,
                        lrs, epochs, batch_size, seed, ds.ignore_classes, progress)
    val_pred = predict_segmentation(fit.head, feats.take(va), ds.chip_size)
    metrics = {"val": scores(ds.labels[va], val_pred, k, "segment", ds.ignore_classes)}
    if "test" in ds.splits:
        te = ds.splits["test"]
        pred = predict_segmentation(fit.head, feats.take(te), ds.chip_size)
        metrics["test"] = scores(ds.labels[te], pred, k, "segment", ds.ignore_classes)
    layers = list(backbone.dense_layers) if decoder == "dpt" else [backbone.depth - 1]
    meta = {**_base_meta(ds, backbone, mean, std, source), "head": decoder, "layers": layers, "dropout": 0.1,
            "fit": {"lr": fit.lr, "sweep": fit.sweep, "epochs": epochs, "weight_decay": 1e-4, "seed": seed},
            "metrics": metrics}
    return fit.head, meta, metrics, f"lr = {fit.lr:g} chosen on val"


def classification_data(*, chips: Optional[PathLike] = None, geobench: Optional[PathLike] = None,
                        torchgeo: Optional[str] = None, root: Optional[PathLike] = None, chip: Optional[int] = None,
                        seed: int = 0, bands=None, scale=None) -> ChipDataset:
    """The classification training set from exactly one source."""
    _one_source(chips=chips, geobench=geobench, torchgeo=torchgeo)
    if chips is not None:
        return ds_mod.chips_from_folder(chips, chip or 224, seed=seed, bands=bands, scale=scale)
    if geobench is not None:
        return geobench_task(geobench, chip)
    return torchgeo_dataset(torchgeo, root, task="classify", chip=chip, seed=seed)


def segmentation_data(*, images: Sequence[PathLike] = (), labels: Sequence[PathLike] = (),
                      label_column: Optional[str] = None, geobench: Optional[PathLike] = None,
                      torchgeo: Optional[str] = None, root: Optional[PathLike] = None, chip: Optional[int] = None,
                      class_names: Optional[Sequence[str]] = None, seed: int = 0, bands=None, scale=None) -> ChipDataset:
    """The segmentation training set from exactly one source: raster pairs, a labelled vector file
    over one image (``label_column``), a GEO-Bench task folder or a torchgeo dataset."""
    _one_source(labels=list(labels) or None, geobench=geobench, torchgeo=torchgeo)
    if class_names is not None and (geobench is not None or torchgeo is not None):
        raise UsageError("class_names", "GEO-Bench and torchgeo sources name their own classes")
    if geobench is not None:
        return geobench_task(geobench, chip)
    if torchgeo is not None:
        return torchgeo_dataset(torchgeo, root, task="segment", chip=chip, seed=seed)
    if label_column is not None:
        if len(labels) != 1 or len(images) != 1:
            raise UsageError("labels", "a labelled vector file goes with exactly one image")
        return ds_mod.vector_labels(labels[0], label_column, images[0], chip or 256, seed=seed, bands=bands, scale=scale,
                                    class_names=class_names)
    return ds_mod.raster_pairs(images, labels, chip or 256, class_names, seed=seed, bands=bands, scale=scale)


def _one_source(**sources) -> None:
    given = [k for k, v in sources.items() if v is not None]
    if len(given) != 1:
        raise UsageError("source", f"give exactly one training source ({', '.join(sources)}); got "
                                   f"{', '.join(given) or 'none'}")


def train_classifier(output: PathLike, *, chips=None, geobench=None, torchgeo=None, root=None,
                     backbone: Union[str, PathLike, Backbone] = DEFAULT_BACKBONE, pooling: str = "cls",
                     c_grid: Sequence[float] = C_GRID, chip: Optional[int] = None, normalisation: str = "auto",
                     seed: int = 0, device: str = "auto", batch_size: int = 16, cache=None, bands=None, scale=None,
                     overwrite: bool = False, verify: bool = True, progress: Progress = None) -> TrainResult:
    """Train a logistic-regression probe and write it as a head file at ``output``."""
    t0 = time.perf_counter()
    check_options(c_grid=c_grid, batch_size=batch_size, chip=chip, pooling=pooling, normalisation=normalisation)
    check_output(output, overwrite)
    data = classification_data(chips=chips, geobench=geobench, torchgeo=torchgeo, root=root, chip=chip,
                               seed=seed, bands=bands, scale=scale)
    if data.multilabel:
        raise UsageError("geobench", f"{data.source} is multi-label: its one-vs-rest probe is evaluated with "
                                     "'eval geobench'; 'train classify' writes single-label probes")
    check_classes(data, progress)
    device = str(resolve_device(device))
    bb = resolve_backbone(backbone, device, verify)
    probe, meta, metrics, choice = fit_classifier(data, bb, pooling=pooling, Cs=c_grid, normalisation=normalisation,
                                                  seed=seed, device=device, batch_size=batch_size, cache=cache,
                                                  progress=progress)
    save_head(output, probe, meta, overwrite)
    return TrainResult(Path(output), "classify", "probe", data.class_names, metrics, data.summary(), choice,
                       time.perf_counter() - t0, data.notes)


def train_segmenter(output: PathLike, *, images: Sequence[PathLike] = (), labels: Sequence[PathLike] = (),
                    label_column: Optional[str] = None, geobench=None, torchgeo=None, root=None,
                    class_names: Optional[Sequence[str]] = None,
                    backbone: Union[str, PathLike, Backbone] = DEFAULT_BACKBONE, decoder: str = "dpt",
                    lrs: Sequence[float] = LR_GRID, epochs: int = 20, chip: Optional[int] = None,
                    normalisation: str = "auto", seed: int = 0, device: str = "auto", batch_size: int = 8, cache=None,
                    bands=None, scale=None, overwrite: bool = False, verify: bool = True,
                    progress: Progress = None) -> TrainResult:
    """Train a linear or DPT segmentation head and write it as a head file at ``output``."""
    t0 = time.perf_counter()
    check_options(epochs=epochs, lrs=lrs, batch_size=batch_size, chip=chip, decoder=decoder, normalisation=normalisation)
    check_output(output, overwrite)
    data = segmentation_data(images=images, labels=labels, label_column=label_column, geobench=geobench,
                             torchgeo=torchgeo, root=root, chip=chip, class_names=class_names, seed=seed,
                             bands=bands, scale=scale)
    check_classes(data, progress)
    device = str(resolve_device(device))
    bb = resolve_backbone(backbone, device, verify)
    module, meta, metrics, choice = fit_segmentation(data, bb, decoder=decoder, lrs=lrs, epochs=epochs,
                                                     normalisation=normalisation, seed=seed, device=device,
                                                     batch_size=batch_size, cache=cache, progress=progress)
    save_head(output, module, meta, overwrite)
    return TrainResult(Path(output), "segment", decoder, data.class_names, metrics, data.summary(), choice,
                       time.perf_counter() - t0, data.notes)


def print_progress(line: str) -> None:
    """Progress lines to stderr (what the command shows while training)."""
    print(line, file=sys.stderr, flush=True)

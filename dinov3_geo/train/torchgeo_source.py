"""torchgeo datasets as a training source (the optional ``torchgeo`` extra).

A torchgeo ``NonGeoDataset`` (classification: samples with ``image`` and ``label``; segmentation:
``image`` and ``mask``) is read split by split from its own on-disk layout (``download=False``:
nothing is fetched), its RGB bands picked (``rgb_bands``), scaled to 0..1 with the training split's
0.1/99.9 percentiles per band, and its own band statistics kept for normalisation.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..errors import InputError, UsageError, short_message
from .datasets import (
    ChipDataset,
    check_classes_have_examples,
    random_split,
    resize_chips,
    resize_labels,
    validate_chip,
)

PathLike = Union[str, os.PathLike]
SPLITS = ("train", "val", "test")


def _torchgeo_datasets():
    """``torchgeo.datasets``, or one clear error when the optional extra is not installed."""
    try:
        import torchgeo.datasets as tgd
    except ImportError as exc:
        raise UsageError("torchgeo", f"torchgeo is not installed ({short_message(exc)}): "
                                     "pip install 'dinov3-geo[torchgeo]'") from None
    return tgd


def _dataset_class(name: str):
    tgd = _torchgeo_datasets()
    cls = getattr(tgd, str(name), None)
    if not (inspect.isclass(cls) and issubclass(cls, tgd.NonGeoDataset)):
        raise UsageError("torchgeo", f"'{name}' is not a torchgeo NonGeoDataset (e.g. EuroSAT, UCMerced)")
    return cls


def _open_split(cls, root: PathLike, split: str):
    """The dataset's ``split``, or None when it has no such split; missing files are an InputError."""
    from torchgeo.datasets import DatasetNotFoundError

    kwargs = {"root": str(root), "download": False}
    params = inspect.signature(cls.__init__).parameters
    if "bands" in params and getattr(cls, "rgb_bands", None):
        kwargs["bands"] = tuple(cls.rgb_bands)
    if "split" in params:
        kwargs["split"] = split
    elif split != "train":
        return None
    try:
        return cls(**kwargs)
    except DatasetNotFoundError as exc:
        raise InputError(root, f"torchgeo {cls.__name__}: {short_message(exc)}") from None
    except (AssertionError, ValueError, KeyError):
        return None                          # this split does not exist for the dataset


#: The sample key each task reads its labels from.
LABEL_KEYS = {"classify": "label", "segment": "mask"}


def check_sample_keys(dataset, name: str, task: str) -> None:
    """One clear error when the dataset's samples lack what the task needs (e.g. a classification
    dataset given to ``train segment``)."""
    keys = set(dataset[0]) if len(dataset) else set()
    want = LABEL_KEYS[task]
    if "image" not in keys or want not in keys:
        other = next((t for t, k in LABEL_KEYS.items() if k in keys and t != task), None)
        hint = f": a {other} dataset, use 'train {other}'" if other else ""
        raise UsageError("torchgeo", f"torchgeo {name} samples have no '{want if 'image' in keys else 'image'}' "
                                     f"(keys: {', '.join(sorted(map(str, keys))) or 'none'}){hint}")


def _samples(dataset, task: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for i in range(len(dataset)):
        s = dataset[i]
        images.append(np.asarray(s["image"], np.float32)[:3])
        labels.append(np.asarray(s[LABEL_KEYS[task]]))
    return np.stack(images), np.stack(labels)


def _scaling(train: np.ndarray) -> tuple[list, tuple, tuple]:
    """Per-band (lo, hi) of the training images and their mean/std on that 0..1 scale."""
    scale, mean, std = [], [], []
    for b in range(train.shape[1]):
        v = train[:, b].ravel()
        lo, hi = (float(x) for x in np.percentile(v, (0.1, 99.9)))
        hi = hi if hi > lo else lo + 1.0
        scaled = np.clip((v - lo) / (hi - lo), 0, 1)
        scale.append((lo, hi))
        mean.append(float(scaled.mean()))
        std.append(max(float(scaled.std()), 1e-6))
    return scale, tuple(mean), tuple(std)


def raster_chips(root: PathLike, chip: int) -> tuple[np.ndarray, np.ndarray]:
    """Chips of ``root/images`` rasters and ``root/labels`` masks: two torchgeo ``RasterDataset``s,
    their intersection, and a ``GridGeoSampler`` of ``chip`` px (images [N,C,chip,chip], masks [N,chip,chip])."""
    tgd = _torchgeo_datasets()
    from torchgeo.samplers import GridGeoSampler

    class Labels(tgd.RasterDataset):
        is_image = False

    folders = [Path(root) / "images", Path(root) / "labels"]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise InputError(root, f"a torchgeo RasterDataset source needs the folders images/ and labels/ "
                               f"(missing: {', '.join(missing)})")
    try:
        pair = tgd.RasterDataset(paths=str(folders[0])) & Labels(paths=str(folders[1]))
    except (tgd.DatasetNotFoundError, ValueError, RuntimeError) as exc:
        raise InputError(root, f"torchgeo RasterDataset: {short_message(exc)}") from None
    images, masks = [], []
    for query in GridGeoSampler(pair, size=chip, stride=chip):
        sample = pair[query]
        x, y = np.asarray(sample["image"], np.float32)[:3], np.asarray(sample["mask"]).reshape(-1, chip, chip)[0]
        if x.shape[-2:] == (chip, chip):
            images.append(x)
            masks.append(y)
    if not images:
        raise InputError(root, "labels do not overlap the images (no chip in their intersection)")
    return np.stack(images), np.stack(masks)


def torchgeo_dataset(name: Optional[str], root: Optional[PathLike], task: str, chip: Optional[int] = None,
                     seed: int = 0) -> ChipDataset:
    """The torchgeo dataset ``name`` under ``root`` as a :class:`ChipDataset` (its own splits when it
    has train/val; otherwise 20 % of train held out). ``RasterDataset`` (segmentation): rasters in
    ``root/images`` and masks in ``root/labels``, chips from a ``GridGeoSampler``."""
    if root is None:
        raise UsageError("root", "a torchgeo dataset needs its root folder")
    if name == "RasterDataset":
        return _from_rasters(root, task, chip or 256, seed)
    cls = _dataset_class(name)
    parts = {s: ds for s in SPLITS if (ds := _open_split(cls, root, s)) is not None and len(ds)}
    if "train" not in parts:
        raise InputError(root, f"torchgeo {name}: no training samples")
    check_sample_keys(parts["train"], cls.__name__, task)
    loaded = {s: _samples(ds, task) for s, ds in parts.items()}
    scale, mean, std = _scaling(loaded["train"][0])
    lo = np.array([s[0] for s in scale], np.float32)[:, None, None]
    hi = np.array([s[1] for s in scale], np.float32)[:, None, None]
    images = np.concatenate([np.clip((x - lo) / (hi - lo), 0, 1) for x, _ in loaded.values()])
    labels = np.concatenate([y for _, y in loaded.values()])
    size = chip or max(16, int(round(images.shape[-1] / 16)) * 16)
    validate_chip(size)
    images = resize_chips(images, size)
    sizes = [len(y) for _, y in loaded.values()]
    offsets = np.cumsum([0] + sizes)
    splits = {s: np.arange(offsets[i], offsets[i + 1]) for i, s in enumerate(loaded)}
    classes = [str(c) for c in getattr(parts["train"], "classes", [])] or \
        [f"class_{i}" for i in range(int(labels.max()) + 1)]
    if task == "classify":
        labels = labels.astype(np.int64)
        check_classes_have_examples(labels[splits["train"]], classes, str(root))
    else:
        labels = resize_labels(labels.astype(np.uint8), size)
    if "val" not in splits:
        inner = random_split(len(splits["train"]), 0.2, seed, labels[splits["train"]] if task == "classify" else None)
        splits = {**splits, "train": splits["train"][inner["train"]], "val": splits["train"][inner["val"]]}
    return ChipDataset(task, images, labels, classes, splits, f"torchgeo {cls.__name__} ({root})", mean=mean, std=std,
                       bands=list(getattr(cls, "rgb_bands", []) or []) or None, scale=scale)


def _from_rasters(root: PathLike, task: str, chip: int, seed: int) -> ChipDataset:
    """Segmentation chips from torchgeo ``RasterDataset`` pairs, scaled with their own statistics."""
    if task != "segment":
        raise UsageError("torchgeo", "RasterDataset pairs (images/, labels/) train segmentation heads")
    validate_chip(chip)
    images, masks = raster_chips(root, chip)
    scale, mean, std = _scaling(images)
    lo = np.array([s[0] for s in scale], np.float32)[:, None, None]
    hi = np.array([s[1] for s in scale], np.float32)[:, None, None]
    images = np.clip((images - lo) / (hi - lo), 0, 1)
    if masks.min() < 0 or masks.max() >= 255:
        raise InputError(root, f"mask values must lie in 0..254, found {int(masks.min())}..{int(masks.max())}")
    names = [f"class_{i}" for i in range(int(masks.max()) + 1)]
    return ChipDataset("segment", images, masks.astype(np.uint8), names, random_split(len(images), 0.2, seed),
                       f"torchgeo RasterDataset ({root})", mean=mean, std=std, scale=scale)

"""GEO-Bench task folders in the format ServiceNow's geo-bench ships, read without running its pickles.

A task folder holds one HDF5 file per sample (one dataset per band, ``label`` for segmentation),
``band_stats.json``, ``<name>_partition.json`` (train/valid/test sample names) and ``task_specs.pkl``.
The pickles (``task_specs.pkl`` and each HDF5 file's ``pickle`` attribute) name geo-bench's classes
(``ccb.io.*`` in 0.x, ``geobench.*`` today). They are read by :class:`RestrictedUnpickler`, which
never imports or calls anything of theirs: every class reference becomes a plain
:class:`PickledRecord` holding the fields; numpy arrays (m-bigearthnet's multi-label vectors) are
rebuilt by numpy's own array constructor; anything else is refused.

Pixels are normalised as GEO-Bench's loader does: ``(x - mean) / std`` with each band's mean and
std from ``band_stats.json`` (geo-bench ``GeobenchDataset.normalization_stats`` / ``rgb_stats``),
without clipping. The chips are stored on a 0..1 scale (the band's 0.1-99.9 percentiles; values
outside stay outside) with ``mean``/``std`` on that scale, which is the same normalisation.
"""
from __future__ import annotations

import ast
import io
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..errors import InputError, UsageError, short_message
from .datasets import ChipDataset, resize_chips, resize_labels, validate_chip
from .labels import CHESAPEAKE_LEGEND

PathLike = Union[str, os.PathLike]
#: Modules whose class references a GEO-Bench pickle may hold (rebuilt as records, never imported).
GEOBENCH_MODULES = re.compile(r"^(ccb|geobench)(\.[A-Za-z_][A-Za-z0-9_]*)*$")
#: numpy's array reconstruction, the only callables a pickle may name (a label array).
NUMPY_ARRAY = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}
SPLITS = {"train": "train", "val": "valid", "test": "test"}
RGB = ("red", "green", "blue")


class PickledRecord:
    """Stand-in for any geo-bench object in a pickle: keeps its state as attributes, runs nothing."""

    _qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:       # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"<{self._qualname} {self.__dict__}>"


class RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds geo-bench pickles as plain data: their classes become :class:`PickledRecord`
    subclasses; a reference to any other module (``os``, ``builtins``, numpy...) is refused."""

    def find_class(self, module: str, name: str):  # noqa: D102 - pickle API
        if (module, name) in NUMPY_ARRAY:
            return getattr(np, name) if module == "numpy" else _array_reconstructor()
        if not GEOBENCH_MODULES.match(module) or not name.isidentifier():
            raise pickle.UnpicklingError(f"refused reference to {module}.{name}")
        return type(name, (PickledRecord,), {"_qualname": f"{module}.{name}"})


def _array_reconstructor():
    """numpy's ``_reconstruct`` (in ``numpy._core`` from numpy 2, ``numpy.core`` before)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:          # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def safe_unpickle(data: bytes, where: PathLike) -> Any:
    """The plain content of a geo-bench pickle (see :class:`RestrictedUnpickler`)."""
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise InputError(where, f"unreadable or unsafe pickle ({short_message(exc)})") from None


def pickle_attribute(h5, where: PathLike) -> dict:
    """An HDF5 sample's ``pickle`` attribute (a ``repr`` of bytes, parsed as a literal) as a dict."""
    raw = h5.attrs.get("pickle")
    if raw is None:
        return {}
    if isinstance(raw, str):
        try:
            raw = ast.literal_eval(raw)
        except (ValueError, SyntaxError) as exc:
            raise InputError(where, f"bad pickle attribute ({short_message(exc)})") from None
    value = safe_unpickle(bytes(raw), where)
    return value if isinstance(value, dict) else {}


def find_partition(folder: Path, partition: str = "default") -> Path:
    """``<partition>_partition.json`` of a task folder (or its only partition file)."""
    wanted = folder / f"{partition}_partition.json"
    if wanted.exists():
        return wanted
    found = sorted(folder.glob("*_partition.json"))
    if not found:
        raise InputError(folder, "no *_partition.json: not a GEO-Bench task folder (or an incomplete copy)")
    if len(found) > 1:
        raise UsageError("partition", f"no {wanted.name} in {folder}; choose one of "
                                      + ", ".join(p.name.removesuffix("_partition.json") for p in found))
    return found[0]


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"unreadable JSON ({short_message(exc)})") from None


def task_specs(folder: Path) -> dict:
    """Plain fields of ``task_specs.pkl`` (class names, label kind, patch size); {} when absent."""
    path = folder / "task_specs.pkl"
    if not path.exists():
        return {}
    spec = safe_unpickle(path.read_bytes(), path)
    fields = dict(getattr(spec, "__dict__", {}))
    label = fields.get("label_type")
    if label is not None:
        fields["label_kind"] = getattr(label, "_qualname", "").rsplit(".", 1)[-1]
        names = (getattr(label, "_class_names", None) or getattr(label, "class_names", None)
                 or getattr(label, "class_name", None))       # geo-bench's MultiLabelClassification
        fields["class_names"] = list(names) if names else None
        fields["n_classes"] = getattr(label, "n_classes", None)
    return fields


def rgb_band_names(names: list[str], where: PathLike) -> list[str]:
    """The red, green and blue band datasets among a sample's bands (by name)."""
    picked = []
    for colour in RGB:
        hits = [n for n in names if re.search(rf"\b{colour}\b", n, re.IGNORECASE)
                and not re.search(r"edge|infrared|nir", n, re.IGNORECASE)]
        if not hits:
            raise InputError(where, f"no {colour} band among {names}")
        picked.append(hits[0])
    return picked


def band_scaling(stats: dict, bands: list[str], where: PathLike) -> tuple[list, tuple, tuple]:
    """Per-band (lo, hi) mapping to a 0..1 scale (0.1 and 99.9 percentiles, else min/max) and the
    dataset's mean/std expressed on that scale (so normalising equals ``(x - mean) / std``)."""
    scale, mean, std = [], [], []
    for b in bands:
        s = stats.get(b)
        if s is None:
            raise InputError(where, f"band_stats.json has no statistics for band '{b}'")
        lo = float(s.get("percentile_0_1", s["min"]))
        hi = float(s.get("percentile_99_9", s["max"]))
        hi = hi if hi > lo else lo + 1.0
        scale.append((lo, hi))
        mean.append((float(s["mean"]) - lo) / (hi - lo))
        std.append(max(float(s["std"]), 1e-6) / (hi - lo))
    return scale, tuple(mean), tuple(std)


def read_sample(path: Path, bands: list[str], scale: list, segment: bool) -> tuple[np.ndarray, Any]:
    """(RGB float32 [3,h,w] on the 0..1 scale of ``scale``, not clipped; label) of one HDF5 sample."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            x = np.stack([np.asarray(h5[b], np.float32) for b in bands])
            label = np.asarray(h5["label"]) if segment else pickle_attribute(h5, path).get("label")
    except (OSError, KeyError) as exc:
        raise InputError(path, f"unreadable GEO-Bench sample ({short_message(exc)})") from None
    lo = np.array([s[0] for s in scale], np.float32)[:, None, None]
    hi = np.array([s[1] for s in scale], np.float32)[:, None, None]
    return np.nan_to_num((x - lo) / (hi - lo)), label


def sample_bands(path: Path) -> tuple[list[str], bool]:
    """Band dataset names of a sample and whether it has a ``label`` dataset (segmentation)."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            names = list(h5.keys())
    except OSError as exc:
        raise InputError(path, f"not an HDF5 file ({short_message(exc)})") from None
    return [n for n in names if n != "label"], "label" in names


def geobench_task(folder: PathLike, chip: Optional[int] = None, partition: str = "default",
                  ignore_classes: tuple[int, ...] = ()) -> ChipDataset:
    """A GEO-Bench task folder as a :class:`ChipDataset` (RGB, scaled with the dataset's band
    statistics; ``mean``/``std`` are the dataset's own) with its train/val/test partition.

    ``chip``: resize chips to this size (default: the native size rounded to a multiple of 16).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "GEO-Bench task folder not found")
    parts = read_json(find_partition(folder, partition))
    names = {ours: list(parts.get(theirs, [])) for ours, theirs in SPLITS.items()}
    if not names["train"]:
        raise InputError(folder, "the partition file lists no training sample")
    first = folder / f"{names['train'][0]}.hdf5"
    if not first.exists():
        raise InputError(first, "sample listed in the partition file is missing")
    all_bands, segment = sample_bands(first)
    rgb = rgb_band_names(all_bands, first)
    stats_path = folder / "band_stats.json"
    if not stats_path.exists():
        raise InputError(folder, "no band_stats.json (needed to scale and normalise the bands)")
    scale, mean, std = band_scaling(read_json(stats_path), rgb, stats_path)
    specs = task_specs(folder)
    order = [n for split in ("train", "val", "test") for n in names[split]]
    unique = list(dict.fromkeys(order))
    read = [read_sample(folder / f"{n}.hdf5", rgb, scale, segment) for n in unique]
    native = read[0][0].shape[-1]
    size = chip if chip is not None else max(16, int(round(native / 16)) * 16)
    validate_chip(size)
    images = resize_chips(np.stack([r[0] for r in read]), size)
    labels, class_names, multilabel = _labels(read, segment, specs, folder, size)
    index = {n: i for i, n in enumerate(unique)}
    splits = {k: np.array([index[n] for n in v], np.int64) for k, v in names.items() if v}
    return ChipDataset("segment" if segment else "classify", images, labels, class_names, splits,
                       f"GEO-Bench {folder.name}", mean=mean, std=std, bands=rgb, scale=scale,
                       ignore_classes=tuple(ignore_classes), multilabel=multilabel)


def _labels(read: list, segment: bool, specs: dict, folder: Path, size: int) -> tuple[np.ndarray, list[str], bool]:
    """(labels, class names, multi-label): class indices per pixel (segmentation) or per chip, or
    0/1 vectors per chip (multi-label, m-bigearthnet). Names from the task specs, else the
    source's legend (Chesapeake), else as many as label_stats.json counts (``class_<i>``)."""
    multilabel = False
    if segment:
        y = np.stack([np.asarray(r[1]) for r in read])
        if y.min() < 0 or y.max() >= 255:
            raise InputError(folder, f"segmentation labels outside 0..254 ({int(y.min())}..{int(y.max())})")
        y = resize_labels(y.astype(np.uint8), size)
    elif any(r[1] is not None and np.ndim(r[1]) == 1 for r in read):
        if any(r[1] is None or np.ndim(r[1]) != 1 or len(r[1]) != len(read[0][1]) for r in read):
            raise InputError(folder, "multi-label samples whose label vectors differ in length")
        y = np.stack([np.asarray(r[1]) for r in read]).astype(np.uint8)
        if not np.isin(y, (0, 1)).all():
            raise InputError(folder, "multi-label vectors must hold 0 and 1 only")
        multilabel = True
    else:
        if any(r[1] is None or np.ndim(r[1]) != 0 for r in read):
            raise InputError(folder, "samples without a class label")
        y = np.array([int(r[1]) for r in read], np.int64)
    names = specs.get("class_names") or legend_for(folder)
    if not names:
        stats = folder / "label_stats.json"
        count = specs.get("n_classes") or (len(next(iter(read_json(stats).values()))) if stats.exists() else None)
        count = count or (y.shape[1] if multilabel else int(y[y != 255].max()) + 1)
        names = [f"class_{i}" for i in range(int(count))]
    return y, [str(n) for n in names], multilabel


def legend_for(folder: Path) -> Optional[list[str]]:
    """The class names of a task whose files do not carry them: Chesapeake land cover (its
    task_specs.pkl names none; the legend is the dataset's, see :data:`.labels.CHESAPEAKE_LEGEND`)."""
    return list(CHESAPEAKE_LEGEND) if "chesapeake" in folder.name.lower() else None

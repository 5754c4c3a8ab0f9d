"""Every training input turned into one in-memory :class:`ChipDataset` of 0..1 RGB chips and labels.

Sources: a folder of chips per class (torchvision's ImageFolder layout), image/label raster pairs,
a GeoPackage of labelled polygons or points rasterised onto a scene's grid, and (in
:mod:`.geobench` / :mod:`.torchgeo_source`) GEO-Bench task folders and torchgeo datasets.
Segmentation labels are class indices ``0..K-1`` with 255 = ignore (unlabelled or nodata).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from ..errors import InputError, UsageError, short_message
from ..io.pixels import check_scale, stretch
from ..io.scene import open_scene, stats_sample
from ..io.tiling import pad_to_tile, plan_chips
from .labels import classes_for_codes, nodata_note, parse_class_names, text_classes

PathLike = Union[str, os.PathLike]
IGNORE = 255
#: Image file suffixes read from a chips folder (anything GDAL opens would do; these are the usual ones).
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".jp2", ".bmp")


@dataclass
class ChipDataset:
    """Chips ready for the backbone, whatever their source.

    ``images`` float32 ``[N,3,T,T]`` in 0..1; ``labels`` int64 ``[N]`` (classify) or uint8
    ``[N,T,T]`` (segment, 255 = ignore); ``splits`` maps ``train``/``val`` (and maybe ``test``) to
    chip indices. ``mean``/``std`` are the dataset's own statistics of the 0..1 chips when the
    source defines them (GEO-Bench), ``bands``/``scale`` how the chips were read, for the head file.
    ``codes``: the label code of each class when it is not the class value itself (see :mod:`.labels`).
    """

    task: str
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    splits: dict[str, np.ndarray]
    source: str
    mean: Optional[tuple[float, float, float]] = None
    std: Optional[tuple[float, float, float]] = None
    bands: Optional[list] = None
    scale: Optional[list] = None
    ignore_classes: tuple[int, ...] = ()
    notes: list[str] = field(default_factory=list)
    codes: Optional[list[float]] = None
    multilabel: bool = False
    counts: Optional[dict] = None          # examples per class and split, once reported

    @property
    def chip_size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) of one split."""
        idx = self.splits[split]
        return self.images[idx], self.labels[idx]

    def summary(self) -> dict:
        """What the head file records about its training data."""
        out = {"source": self.source, "task": self.task, "chips": int(len(self.images)),
               "chip_size": self.chip_size, "splits": {k: int(len(v)) for k, v in self.splits.items()},
               "class_counts": class_counts(self).tolist()}
        if self.codes is not None:
            out["class_codes"] = list(self.codes)
        if self.multilabel:
            out["multilabel"] = True
        return out


def class_counts(ds: ChipDataset) -> np.ndarray:
    """Examples (classify; per label for multi-label sets) or labelled pixels (segment) per class
    over the whole dataset."""
    if ds.multilabel:
        return ds.labels.sum(0).astype(np.int64)
    labels = ds.labels[ds.labels != IGNORE] if ds.task == "segment" else ds.labels
    return np.bincount(labels.ravel().astype(np.int64), minlength=len(ds.class_names))


def resize_chips(images: np.ndarray, size: int) -> np.ndarray:
    """``[N,3,h,w]`` float chips resized to ``size`` x ``size`` (bilinear, antialiased)."""
    if images.shape[-2:] == (size, size):
        return images
    t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    return F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False).numpy()


def resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """``[N,h,w]`` label maps resized to ``size`` (nearest)."""
    if labels.shape[-2:] == (size, size):
        return labels
    t = torch.from_numpy(labels.astype(np.int64))[:, None].float()
    return F.interpolate(t, size=(size, size), mode="nearest")[:, 0].numpy().astype(labels.dtype)


def validate_chip(chip: int) -> None:
    """A chip size is a positive multiple of the 16 px patch."""
    if not isinstance(chip, (int, np.integer)) or chip <= 0 or chip % 16:
        raise UsageError("chip", f"chip size must be a positive multiple of 16, got {chip!r}")


def random_split(n: int, val_fraction: float, seed: int, strata: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Train/val chip indices (stratified by ``strata`` when given); deterministic given ``seed``."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    if n < 2:
        return {"train": idx, "val": idx}
    n_val = max(1, int(round(n * val_fraction)))
    if strata is not None:
        n_val = max(n_val, len(np.unique(strata)))
    train, val = train_test_split(idx, test_size=n_val, random_state=seed, stratify=strata)
    return {"train": np.sort(train), "val": np.sort(val)}


def check_classes_have_examples(labels: np.ndarray, class_names: Sequence[str], where: str, least: int = 2) -> None:
    """Refuse a classification set where a class has some, but fewer than ``least``, examples
    (classes without any are reported by :func:`.labels.report_classes`)."""
    counts = np.bincount(labels, minlength=len(class_names))
    poor = [f"'{class_names[i]}' ({int(c)})" for i, c in enumerate(counts) if 0 < c < least]
    if poor:
        raise InputError(where, f"class {', '.join(poor)} has fewer than {least} examples: a probe needs "
                                f"at least {least} per class (one to fit, one to validate)")


# -- reading training images through the pixel contract ---------------------------------------------

#: Values per band kept from each image's decimated sample when pooling the dataset's stretch.
POOL_PER_IMAGE = 65536


def dataset_scaling(images: Sequence[PathLike], bands=None, scale=None, seed: int = 0) -> tuple[Optional[list], list[str]]:
    """How every training image is read, by the pixel contract's rules over the whole set (never
    image by image): ``scale`` when given; ``None`` (bytes divided by 255) when every image is
    uint8; else the 2-98 % stretch of the valid values of all images' decimated samples pooled per
    band. Returns the per-band ``[[low, high], ...]`` (what the head file records and inference
    applies) and the band-choice warnings, one line per kind of warning."""
    rng = np.random.default_rng(seed)
    pooled: list[list[np.ndarray]] = []
    warnings: dict[str, list[str]] = {}
    all_bytes = True
    for path in images:
        with open_scene(path, bands=bands, scale=scale if scale is not None else (0.0, 1.0)) as sc:
            for text in sc.warnings:
                warnings.setdefault(text.replace(str(path), "{}"), []).append(str(path))
            all_bytes &= sc.dtype == "uint8"
            if scale is None:
                with rasterio.open(path) as src:
                    sample = stats_sample(src, sc.bands, where=str(path))
                pooled.append([_thin(v, rng) for v in sample])
    notes = [_grouped(text, paths) for text, paths in warnings.items()]
    if scale is not None:
        pairs = check_scale(scale)
        return [list(p) for p in (pairs * 3 if len(pairs) == 1 else pairs)], notes
    if all_bytes:
        return None, notes
    per_band = [np.concatenate([image[b] for image in pooled]) for b in range(len(pooled[0]))]
    return [list(p) for p in stretch(per_band)], notes


def _thin(values: np.ndarray, rng) -> np.ndarray:
    return values if values.size <= POOL_PER_IMAGE else rng.choice(values, POOL_PER_IMAGE, replace=False)


def _grouped(text: str, paths: list[str]) -> str:
    """One warning for every image it concerns: the first one named, how many more alike."""
    more = f" (and {len(paths) - 1} more image{'s' * (len(paths) > 2)} alike)" if len(paths) > 1 else ""
    return text.replace("{}", paths[0]) + more


# -- a folder of chips per class -------------------------------------------------------------------

def chips_from_folder(root: PathLike, chip: int = 224, val_fraction: float = 0.2, seed: int = 0,
                      bands: Optional[Sequence[int]] = None, scale: Optional[tuple[float, float]] = None) -> ChipDataset:
    """Classification chips in the ImageFolder layout ``root/<class>/<image>``, resized to ``chip``.

    Each image is read like a scene (band choice, scaling to 0..1); the split is stratified.
    """
    from torchvision.datasets.folder import make_dataset

    validate_chip(chip)
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "chips folder not found")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise InputError(root, "no class folders: expected ROOT/<class>/<image> (ImageFolder layout)")
    try:
        samples = make_dataset(str(root), {c: i for i, c in enumerate(classes)}, extensions=IMAGE_SUFFIXES,
                               allow_empty=True)
    except (FileNotFoundError, OSError) as exc:
        raise InputError(root, short_message(exc)) from None
    if not samples:
        raise InputError(root, f"no image chips in the class folders ({', '.join(classes)}; "
                               f"suffixes {', '.join(IMAGE_SUFFIXES)})")
    labels = np.array([y for _, y in samples], np.int64)
    check_classes_have_examples(labels, classes, str(root))
    scaling, notes = dataset_scaling([path for path, _ in samples], bands, scale, seed)
    images = np.stack([read_whole_image(path, chip, bands, scaling) for path, _ in samples])
    return ChipDataset("classify", images, labels, classes, random_split(len(labels), val_fraction, seed, labels),
                       f"chips folder {root}", bands=None if bands is None else list(bands), scale=scaling,
                       notes=notes)


def read_whole_image(path: PathLike, chip: int, bands=None, scale=None) -> np.ndarray:
    """One image file as float32 ``[3,chip,chip]`` in 0..1 (read as a scene, resized)."""
    with open_scene(path, bands=bands, scale=scale) as sc:
        data, _ = sc.read(Window(0, 0, sc.width, sc.height))
    x = data.astype(np.float32) / 255 if data.dtype == np.uint8 else data.astype(np.float32)
    return resize_chips(x[None], chip)[0]


# -- image / label raster pairs --------------------------------------------------------------------

def raster_pairs(images: Sequence[PathLike], labels: Sequence[PathLike], chip: int = 256,
                 class_names=None, val_fraction: float = 0.2, seed: int = 0,
                 bands: Optional[Sequence[int]] = None, scale: Optional[tuple[float, float]] = None) -> ChipDataset:
    """Segmentation chips cut from image/label raster pairs.

    Label rasters hold class codes 0..254, each the class value (``class_names``: names of the
    codes 0, 1, 2, ... or ``CODE:NAME`` pairs; default ``class_<code>`` up to the largest code);
    their nodata becomes 255 (ignored; how many pixels it removes is noted). A label grid that
    differs from its image is reprojected nearest onto it when both are georeferenced, else refused.
    """
    validate_chip(chip)
    given = parse_class_names(class_names)
    if len(images) != len(labels) or not images:
        raise UsageError("labels", f"give one label raster per image ({len(images)} images, {len(labels)} labels)")
    scaling, notes = dataset_scaling(images, bands, scale, seed)
    pairs = [read_pair(img, lab, bands, scaling) for img, lab in zip(images, labels)]
    notes += [n for lab in labels if (n := label_nodata_note(lab)) is not None]
    for _, lab, where in pairs:         # a code nobody named is refused, naming its file
        classes_for_codes(np.unique(lab[lab != IGNORE]), given, where)
    present = np.unique(np.concatenate([np.unique(lab[lab != IGNORE]) for _, lab, _ in pairs]))
    names, _ = classes_for_codes(present, given, labels[0])
    chips = [c for img, lab, _ in pairs for c in cut_chips(img, lab, chip)]
    if not chips:
        raise InputError(labels[0], "no labelled pixel in any chip")
    x = np.stack([c[0] for c in chips])
    y = np.stack([c[1] for c in chips])
    return ChipDataset("segment", x, y, names, random_split(len(x), val_fraction, seed),
                       f"{len(images)} image/label pair(s): " + ", ".join(Path(p).name for p in images),
                       bands=None if bands is None else list(bands), scale=scaling, notes=notes)


def label_nodata_note(path: PathLike) -> Optional[str]:
    """How many pixels the label raster's nodata value takes out of training (None: none)."""
    with _open_labels(path) as src:
        nodata = src.nodata
        if nodata is None:
            return None
        values = src.read(1)
    removed = int(np.isnan(values).sum()) if np.isnan(nodata) else int((values == nodata).sum())
    return nodata_note(path, removed, values.size, nodata)


def read_pair(image: PathLike, labels: PathLike, bands=None, scale=None) -> tuple[np.ndarray, np.ndarray, str]:
    """(image float32 [3,H,W] in 0..1, labels uint8 [H,W] on the image grid with 255 = ignore, where)."""
    with open_scene(image, bands=bands, scale=scale) as sc:
        data, valid = sc.read(Window(0, 0, sc.width, sc.height))
        grid = dict(crs=sc.crs, transform=sc.transform, width=sc.width, height=sc.height)
    x = data.astype(np.float32) / 255 if data.dtype == np.uint8 else data.astype(np.float32)
    y = labels_on_grid(labels, grid, str(image))
    y[~valid] = IGNORE
    return x, y, str(labels)


def _open_labels(path: PathLike):
    if not Path(path).exists():
        raise InputError(path, "file not found")
    try:
        return rasterio.open(path)
    except RasterioError as exc:
        raise InputError(path, f"not a readable raster ({short_message(exc)})") from None


def labels_on_grid(path: PathLike, grid: dict, image: str) -> np.ndarray:
    """Band 1 of the label raster on the image ``grid`` as uint8 (255 where nodata or outside)."""
    with _open_labels(path) as src:
        same = (src.crs == grid["crs"] and src.transform == grid["transform"]
                and (src.width, src.height) == (grid["width"], grid["height"]))
        if same or (src.crs is None and grid["crs"] is None and (src.width, src.height) == (grid["width"], grid["height"])):
            values, valid = src.read(1), src.read_masks(1) > 0
        elif src.crs is None or grid["crs"] is None:
            raise InputError(path, f"label grid ({src.width} x {src.height}, CRS {src.crs}) differs from the image "
                                   f"{image} ({grid['width']} x {grid['height']}, CRS {grid['crs']}) and lacks a "
                                   "georeference to reproject it: give labels on the image's grid")
        else:
            check_overlap(src, grid, path, image)
            with WarpedVRT(src, crs=grid["crs"], transform=grid["transform"], width=grid["width"],
                           height=grid["height"], resampling=Resampling.nearest) as vrt:
                values, valid = vrt.read(1), vrt.read_masks(1) > 0
    return as_class_values(values, valid, path)


def check_overlap(src, grid: dict, path: PathLike, image: str) -> None:
    """Refuse labels whose footprint misses the image."""
    left, bottom, right, top = transform_bounds(src.crs, grid["crs"], *src.bounds)
    t = grid["transform"]
    x0, y0 = t @ (0, 0)
    x1, y1 = t @ (grid["width"], grid["height"])
    if min(right, max(x0, x1)) <= max(left, min(x0, x1)) or min(top, max(y0, y1)) <= max(bottom, min(y0, y1)):
        raise InputError(path, f"labels do not overlap the image {image}")


def as_class_values(values: np.ndarray, valid: np.ndarray, where: PathLike) -> np.ndarray:
    """Integer class values as uint8 with 255 = ignore; fractional or out-of-range values refused."""
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values[valid]) & (values[valid] == np.round(values[valid]))):
            raise InputError(where, "label values must be whole class numbers, found fractions or NaN")
    v = values[valid]
    if v.size and (v.min() < 0 or v.max() >= IGNORE):
        raise InputError(where, f"label values must lie in 0..{IGNORE - 1}, found {int(v.min())}..{int(v.max())}")
    out = np.full(values.shape, IGNORE, np.uint8)
    out[valid] = values[valid].astype(np.uint8)
    if not (out != IGNORE).any():
        raise InputError(where, "labels do not overlap the image (no labelled pixel on its grid)")
    return out


def cut_chips(image: np.ndarray, labels: np.ndarray, chip: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping ``chip`` tiles (border tiles shifted inward, small rasters padded) that hold
    at least one labelled pixel; images padded by reflection, labels with 255."""
    out = []
    for w in plan_chips(image.shape[1], image.shape[2], chip, 0):
        sl = (slice(w.row_off, w.row_off + w.height), slice(w.col_off, w.col_off + w.width))
        y = labels[sl]
        if not (y != IGNORE).any():
            continue
        x, _ = pad_to_tile(image[(slice(None),) + sl], chip)
        y = np.pad(y, [(0, chip - y.shape[0]), (0, chip - y.shape[1])], constant_values=IGNORE)
        out.append((np.ascontiguousarray(x), y))
    return out


# -- a GeoPackage of labelled polygons or points -----------------------------------------------------

def vector_labels(vector: PathLike, column: str, image: PathLike, chip: int = 256, val_fraction: float = 0.2,
                  seed: int = 0, layer: Optional[str] = None, bands=None, scale=None, class_names=None) -> ChipDataset:
    """Segmentation chips of ``image`` labelled by the polygons or points of ``vector``, burnt onto the
    image grid (``rasterio.features.rasterize``). Classes: a numeric ``column``'s codes (numeric
    order, named by ``class_names`` as for rasters), a text column's values (alphabetical, or the
    order of ``class_names``); see :mod:`.labels`."""
    validate_chip(chip)
    frame = read_labelled_vector(vector, column, layer)
    names, codes = column_classes(frame[column], class_names, vector)
    scaling, notes = dataset_scaling([image], bands, scale, seed)
    with open_scene(image, bands=bands, scale=scaling) as sc:
        data, valid = sc.read(Window(0, 0, sc.width, sc.height))
        grid = dict(crs=sc.crs, transform=sc.transform, width=sc.width, height=sc.height)
    y = rasterise_labels(frame, column, codes, grid, vector, image)
    y[~valid] = IGNORE
    x = data.astype(np.float32) / 255 if data.dtype == np.uint8 else data.astype(np.float32)
    chips = cut_chips(x, y, chip)
    if not chips:
        raise InputError(vector, f"labels do not overlap the valid pixels of {image}")
    xs, ys = np.stack([c[0] for c in chips]), np.stack([c[1] for c in chips])
    numeric = all(isinstance(c, float) for c in codes)
    class_codes = list(codes) if numeric and list(codes) != [float(i) for i in range(len(names))] else None
    return ChipDataset("segment", xs, ys, names, random_split(len(xs), val_fraction, seed),
                       f"{Path(vector).name} column '{column}' over {Path(image).name}",
                       bands=None if bands is None else list(bands), scale=scaling, codes=class_codes, notes=notes)


def column_classes(values, class_names, where: PathLike) -> tuple[list[str], Optional[list]]:
    """(class names, class codes: numeric codes, or the text values, in class order) of an
    attribute column."""
    import pandas as pd


    given = parse_class_names(class_names)
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        names, codes = classes_for_codes(np.unique(values.to_numpy(np.float64)), given, where)
        return names, codes
    names = text_classes(values.astype(str), given, where)
    return names, names


def read_labelled_vector(vector: PathLike, column: str, layer: Optional[str] = None):
    """The features of ``vector`` with a value in ``column``; one clear error otherwise."""
    import geopandas as gpd
    import pyogrio

    if not Path(vector).exists():
        raise InputError(vector, "file not found")
    try:
        frame = gpd.read_file(vector, layer=layer, engine="pyogrio")
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError, ValueError) as exc:
        raise InputError(vector, f"not a readable vector file ({short_message(exc)})") from None
    fields = [c for c in frame.columns if c != frame.geometry.name]
    if column == frame.geometry.name:
        raise InputError(vector, f"column '{column}' is the features' geometry, not a class attribute "
                                 f"(columns: {', '.join(fields) or 'none'})")
    if column not in frame.columns:
        raise InputError(vector, f"no column '{column}' (columns: {', '.join(fields) or 'none'})")
    frame = frame[frame[column].notna() & frame.geometry.notna() & ~frame.geometry.is_empty]
    if frame.empty:
        raise InputError(vector, f"no feature with a geometry and a value in column '{column}'")
    if frame[column].nunique() < 2:
        raise InputError(vector, f"column '{column}' has one value ({frame[column].iloc[0]!r}) for every feature: "
                                 "a head needs at least two classes")
    if frame.crs is None:
        raise InputError(vector, "no CRS: cannot place the labels on the image")
    if frame[column].nunique() > IGNORE:
        raise InputError(vector, f"column '{column}' has more than {IGNORE} distinct values")
    return frame


def rasterise_labels(frame, column: str, codes: list, grid: dict, where: PathLike, image: PathLike) -> np.ndarray:
    """Class indices (position of the value in ``codes``) of ``frame``'s geometries burnt onto
    ``grid`` (255 elsewhere); points and lines burn every pixel they touch, polygons the pixels
    whose centre they contain."""
    from rasterio.features import rasterize

    if grid["crs"] is None:
        raise InputError(image, "no CRS: cannot place vector labels on it")
    frame = frame.to_crs(grid["crs"])
    index = {_key(c): i for i, c in enumerate(codes)}
    kinds = frame.geometry.geom_type.str.replace("Multi", "")
    out = np.full((grid["height"], grid["width"]), IGNORE, np.uint8)
    for touched, part in ((False, frame[kinds == "Polygon"]), (True, frame[kinds != "Polygon"])):
        if len(part):
            shapes = ((g, index[_key(v)]) for g, v in zip(part.geometry, part[column]))
            rasterize(shapes, out=out, transform=grid["transform"], all_touched=touched)
    if not (out != IGNORE).any():
        raise InputError(where, f"labels do not overlap the image {image}")
    return out


def _key(value):
    """A column value as the class table's key: numbers as floats, anything else as text."""
    return float(value) if isinstance(value, (int, float, np.integer, np.floating)) and \
        not isinstance(value, bool) else str(value)

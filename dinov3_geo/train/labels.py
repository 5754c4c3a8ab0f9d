"""Classes of a training set: which label values are which class, and how many examples each has.

Rules (the README's *Labels*): raster labels and numeric attribute columns hold class codes; a
code that is a whole number 0..254 is the class value itself (the head's output value equals the
code), other numeric codes become 0..K-1 in numeric order. ``class_names`` names them: a plain
list names the codes 0, 1, 2, ... in the order given, ``CODE:NAME`` pairs name the codes given.
A text column's classes are its values in alphabetical order, or in the order ``class_names``
gives. Before any feature is computed the examples per class are counted and shown; fewer than
two classes with examples is refused, a named class without any is warned about.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np

from ..errors import DinoGeoWarning, InputError, UsageError

IGNORE = 255
MAX_CODE = IGNORE - 1
DEFAULT_NAME = re.compile(r"^class_\d+$")
#: Chesapeake Land Cover's legend (Robinson et al., CVPR 2019; torchgeo's ``ChesapeakeCVPR``
#: 7-class set): code -> name, 0 where the source has no label.
CHESAPEAKE_LEGEND = ("no data", "water", "tree canopy / forest", "low vegetation / field", "barren land",
                     "impervious (other)", "impervious (road)")


@dataclass(frozen=True)
class ClassNames:
    """Names given for class codes: ``names`` in the order given (codes 0..K-1 or a text
    column's order), or ``pairs`` {code: name}."""

    names: tuple[str, ...] = ()
    pairs: Optional[dict[float, str]] = None


def parse_class_names(class_names: Union[None, Sequence[str], dict]) -> Optional[ClassNames]:
    """``class_names`` as a plain list of names, ``CODE:NAME`` strings, or a {code: name} dict."""
    if class_names is None:
        return None
    if isinstance(class_names, dict):
        items = list(class_names.items())
    else:
        items = [str(n).strip() for n in class_names]
        if not items or any(not n for n in items):
            raise UsageError("class_names", f"empty class name in {list(class_names)!r}")
        paired = [re.fullmatch(r"\s*(-?[0-9.eE+-]+)\s*:\s*(.+)", n) for n in items]
        if not any(paired):
            if len(set(items)) != len(items):
                raise UsageError("class_names", f"class names repeat: {', '.join(items)}")
            return ClassNames(tuple(items))
        if not all(paired):
            raise UsageError("class_names", "give either plain names (for codes 0, 1, 2, ...) or CODE:NAME "
                                            f"pairs, not both: {', '.join(items)}")
        items = [(m.group(1), m.group(2).strip()) for m in paired]
    pairs = {}
    for code, name in items:
        try:
            value = float(code)
        except (TypeError, ValueError):
            raise UsageError("class_names", f"'{code}' is not a numeric code (CODE:NAME)") from None
        if value in pairs:
            raise UsageError("class_names", f"code {code} is named twice")
        pairs[value] = str(name)
    return ClassNames(pairs=pairs)


def _code_text(code: float) -> str:
    return str(int(code)) if float(code).is_integer() else repr(float(code))


def is_class_value(codes: np.ndarray) -> bool:
    """Whether every code is a whole number 0..254 (then the code is the class value)."""
    codes = np.asarray(codes, np.float64)
    return bool(np.all((codes == np.round(codes)) & (codes >= 0) & (codes <= MAX_CODE)))


def classes_for_codes(present: np.ndarray, given: Optional[ClassNames], where) -> tuple[list[str], list[float]]:
    """(class names, code of each class) for the numeric codes ``present`` in the labels.

    Whole codes 0..254: class i is code i (0..the largest code; codes nobody named are
    ``class_<i>``). Other codes: the codes in numeric order. A present code that ``given``
    does not name is refused.
    """
    present = np.unique(np.asarray(present, np.float64))
    if given is not None and given.pairs is None:       # plain names: codes 0..K-1
        named = np.arange(len(given.names), dtype=np.float64)
        codes, names = named, list(given.names)
    elif given is not None:
        named = np.array(sorted(given.pairs), np.float64)
        codes = named
        names = [given.pairs[c] for c in named]
    else:
        codes, names = present, [_code_text(c) for c in present]
    unknown = np.setdiff1d(present, codes)
    if unknown.size:
        raise InputError(where, f"label values {', '.join(_code_text(c) for c in unknown[:8])} are not in the "
                                f"class list ({', '.join(f'{_code_text(c)} {n}' for c, n in zip(codes, names))}): "
                                "name every code with `class_names`")
    if not is_class_value(codes):
        return names, [float(c) for c in codes]
    k = int(codes.max()) + 1 if codes.size else 0
    full = [f"class_{i}" for i in range(k)]
    if given is not None:
        for c, n in zip(codes, names):
            full[int(c)] = n
    return full, [float(i) for i in range(k)]


def codes_to_indices(values: np.ndarray, codes: Sequence[float]) -> np.ndarray:
    """Class index of each code value (``codes`` sorted: the class list's codes)."""
    return np.searchsorted(np.asarray(codes, np.float64), np.asarray(values, np.float64))


def text_classes(values: Sequence[str], given: Optional[ClassNames], where) -> list[str]:
    """Classes of a text column: its values in alphabetical order, or ``given``'s order."""
    present = sorted({str(v) for v in values})
    if given is None:
        return present
    if given.pairs is not None:
        raise UsageError("class_names", "CODE:NAME pairs name numeric codes; this column holds text: list the "
                                        "class names in the order wanted")
    unknown = [v for v in present if v not in given.names]
    if unknown:
        raise InputError(where, f"values {', '.join(unknown[:8])} are not in the class list ({', '.join(given.names)})")
    return list(given.names)


def nodata_note(path, removed: int, total: int, nodata) -> Optional[str]:
    """The line saying how many pixels a label raster's nodata value takes out of training."""
    if nodata is None or not removed:
        return None
    value = _code_text(nodata) if np.isfinite(nodata) else str(nodata)
    return (f"labels {path}: its nodata value {value} removes {removed:,} of {total:,} pixels "
            f"({100 * removed / max(total, 1):.1f} %) from training")


def split_counts(labels: np.ndarray, splits: dict[str, np.ndarray], num_classes: int, task: str) -> dict[str, np.ndarray]:
    """Examples (classify) or labelled pixels (segment) per class in each split."""
    out = {}
    for split, idx in splits.items():
        y = labels[idx]
        y = y[y != IGNORE] if task == "segment" else y
        out[split] = np.bincount(y.ravel().astype(np.int64), minlength=num_classes)[:num_classes]
    return out


def report_classes(task: str, class_names: Sequence[str], labels: np.ndarray, splits: dict[str, np.ndarray],
                   where: str, notes: Sequence[str] = (), progress: Optional[Callable[[str], None]] = None) -> dict:
    """Count the examples per class and split, show them, and refuse a set that cannot train a
    head (fewer than two classes with training examples); warn about each named class without
    any. Returns the counts per split (lists)."""
    counts = split_counts(labels, splits, len(class_names), task)
    unit = "chips" if task == "classify" else "labelled pixels"
    order = [s for s in ("train", "val", "test") if s in counts]
    if progress:
        for note in notes:
            progress(note)
        progress(f"classes: {len(class_names)}, {unit} per class ({' / '.join(order)}):")
        for i, name in enumerate(class_names):
            progress(f"  {i} {name}: " + " / ".join(f"{int(counts[s][i]):,}" for s in order))
    trained = [class_names[i] for i in np.flatnonzero(counts["train"])]
    if len(trained) < 2:
        hint = "; ".join(n for n in notes if "nodata" in n)
        what = f"only class '{trained[0]}' has" if trained else "no class has"
        raise InputError(where, f"{what} training examples: a head needs at least two classes"
                                + (f" ({hint})" if hint else ""))
    total = sum(counts[s] for s in order)
    for i, name in enumerate(class_names):
        if total[i] == 0 and not DEFAULT_NAME.match(name):
            warnings.warn(f"class {i} '{name}' has no examples in {where}: the head will never predict it",
                          DinoGeoWarning, stacklevel=2)
    return {s: counts[s].tolist() for s in order}


def report_labels(ds, progress=None) -> dict:
    """Chips carrying each label, per split, shown before any feature is computed; a set where
    fewer than two labels occur in training is refused."""
    order = [s for s in ("train", "val", "test") if s in ds.splits]
    counts = {s: ds.labels[ds.splits[s]].sum(0).astype(np.int64) for s in order}
    if progress:
        progress(f"labels: {len(ds.class_names)} (multi-label), chips carrying each ({' / '.join(order)}):")
        for i, name in enumerate(ds.class_names):
            progress(f"  {i} {name}: " + " / ".join(f"{int(counts[s][i]):,}" for s in order))
    if np.count_nonzero(counts["train"]) < 2:
        raise InputError(ds.source, "fewer than two labels occur in the training chips: nothing to learn")
    return {s: counts[s].tolist() for s in order}

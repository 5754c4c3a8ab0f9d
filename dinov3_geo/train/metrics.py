"""Accuracy and mean IoU from one confusion matrix (checked against scikit-learn in the tests)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

IGNORE = 255


def confusion(truth: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = IGNORE) -> np.ndarray:
    """``[K,K]`` counts, rows = truth, columns = prediction; pixels labelled ``ignore_index`` left out."""
    t = np.asarray(truth).ravel().astype(np.int64)
    p = np.asarray(pred).ravel().astype(np.int64)
    keep = t != ignore_index
    t, p = t[keep], p[keep]
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(cm: np.ndarray) -> float:
    """Share of correct predictions."""
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """IoU of each class (NaN for a class absent from both truth and prediction)."""
    inter = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def mean_iou(cm: np.ndarray, ignore_classes: Sequence[int] = ()) -> float:
    """Mean IoU over the classes present in truth or prediction, without ``ignore_classes``
    (GEO-Bench m-cashew-plantation: class 0, absent from its test split)."""
    ious = iou_per_class(cm)
    keep = np.ones(len(ious), bool)
    keep[list(ignore_classes)] = False
    vals = ious[keep]
    vals = vals[np.isfinite(vals)]
    return float(vals.mean()) if vals.size else float("nan")


def scores(truth: np.ndarray, pred: np.ndarray, num_classes: int, task: str,
           ignore_classes: Sequence[int] = ()) -> dict:
    """``{"accuracy": ..}`` (classify) or ``{"miou": .., "pixel_accuracy": .., "iou": [..]}`` (segment)."""
    cm = confusion(truth, pred, num_classes)
    if task == "classify":
        return {"accuracy": accuracy(cm)}
    return {"miou": mean_iou(cm, ignore_classes), "pixel_accuracy": accuracy(cm),
            "iou": [None if not np.isfinite(v) else float(v) for v in iou_per_class(cm)]}


def headline(task: str) -> str:
    """The metric a task is judged by."""
    return "accuracy" if task == "classify" else "miou"

"""Multi-label classification (GEO-Bench m-bigearthnet): a one-vs-rest logistic-regression probe
on frozen features, C swept on the validation split by micro-F1, refitted on train + val, and
micro-F1 on the test split (the metric GEO-Bench reports for m-bigearthnet).

Labels are 0/1 vectors per chip (``ChipDataset.multilabel``). These probes are evaluated (``eval
geobench``), not written as head files: ``classify`` maps one class per chip.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import numpy as np

from .datasets import ChipDataset
from .steps import backbone_features, check_classes, chip_normalisation

Progress = Optional[Callable[[str], None]]


def _one_vs_rest(x: np.ndarray, y: np.ndarray, C: float, seed: int):
    """scikit-learn's OneVsRestClassifier of L-BFGS logistic regressions (a label that is always
    0 or always 1 in ``y`` gets a constant predictor)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)          # "Label not present in all training examples"
        return OneVsRestClassifier(LogisticRegression(C=C, max_iter=1000, random_state=seed)).fit(x, y)


def micro_f1(truth: np.ndarray, pred: np.ndarray) -> float:
    """Micro-averaged F1 over every (chip, label) decision (scikit-learn's ``f1_score``)."""
    from sklearn.metrics import f1_score

    return float(f1_score(truth, pred, average="micro", zero_division=0))


def fit_multilabel_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                         Cs: Sequence[float], seed: int = 0, progress: Progress = None):
    """Sweep ``Cs`` by validation micro-F1, refit on train + val at the best; returns (model, C,
    val micro-F1, sweep)."""
    sweep = []
    for i, C in enumerate(Cs):
        f1 = micro_f1(y_val, _one_vs_rest(x_train, y_train, C, seed).predict(x_val))
        sweep.append((float(C), f1))
        if progress:
            progress(f"C {C:.3g} ({i + 1}/{len(Cs)}): val micro-F1 {f1:.4f}")
    best_c, best_f1 = max(sweep, key=lambda s: (s[1], -abs(np.log10(s[0]))))
    model = _one_vs_rest(np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val]), best_c, seed)
    return model, best_c, best_f1, sweep


def fit_multilabel(ds: ChipDataset, backbone, *, pooling: str, Cs: Sequence[float], normalisation: str, seed: int,
                   device: str, batch_size: int, cache, progress: Progress = None):
    """The one-vs-rest probe on a multi-label set; returns (model, meta, metrics, choice) as
    :func:`.run.fit_classifier` does (``metrics[split]["micro_f1"]``)."""
    check_classes(ds, progress)
    mean, std, source = chip_normalisation(ds, backbone, normalisation)
    feats = backbone_features(backbone, ds, mean, std, "vector", device, cache, batch_size, progress)
    tr, va = ds.splits["train"], ds.splits["val"]
    model, C, val_f1, sweep = fit_multilabel_probe(feats.take(tr).vectors(pooling), ds.labels[tr],
                                                   feats.take(va).vectors(pooling), ds.labels[va], Cs, seed, progress)
    metrics = {"val": {"micro_f1": val_f1}}
    if "test" in ds.splits:
        te = ds.splits["test"]
        metrics["test"] = {"micro_f1": micro_f1(ds.labels[te], model.predict(feats.take(te).vectors(pooling)))}
    meta = {"task": "classify", "multilabel": True, "class_names": list(ds.class_names), "pooling": pooling,
            "normalisation": {"mean": list(mean), "std": list(std), "source": source},
            "fit": {"C": C, "sweep": sweep, "refit": "train+val"}, "metrics": metrics}
    return model, meta, metrics, f"C = {C:.3g} chosen on val"

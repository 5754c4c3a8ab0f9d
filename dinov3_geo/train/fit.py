"""Fitting heads on frozen features, as in the DINOv3 / GEO-Bench evaluations.

- Classification: scikit-learn logistic regression (L-BFGS, L2) on per-chip vectors, ``C`` swept on
  the validation split, then refitted on train + val (dinov3's ``log_regression.py``).
- Segmentation: a linear head (last block) or a DPT head (four blocks), cross-entropy with 255
  ignored, AdamW with weight decay 1e-4, dropout 0.1, learning rate swept over
  {3e-5, 1e-4, 3e-4, 1e-3}, the best by validation mIoU kept. Deterministic given ``seed``.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..models.heads.linear import DPTSegHead, LinearProbe, LinearSegHead, dpt_config
from .features import Features
from .metrics import IGNORE, confusion, mean_iou

#: dinov3's logistic-regression grid of the inverse regularisation strength.
C_GRID = tuple(float(c) for c in 10 ** np.linspace(-6, 5, 45))
LR_GRID = (3e-5, 1e-4, 3e-4, 1e-3)
WEIGHT_DECAY = 1e-4
DROPOUT = 0.1
Progress = Optional[Callable[[str], None]]


@dataclass
class ProbeFit:
    """A fitted probe: its module, the chosen C and the validation accuracy at that C."""

    probe: LinearProbe
    C: float
    val_accuracy: float
    sweep: list[tuple[float, float]]


def _logistic(x: np.ndarray, y: np.ndarray, C: float, seed: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=C, max_iter=1000, random_state=seed).fit(x, y)


def probe_from_sklearn(model, num_classes: int, pooling: str) -> LinearProbe:
    """A :class:`LinearProbe` giving the same class probabilities as a fitted scikit-learn model
    (binary models become two-class softmax; classes it never saw get a very low logit)."""
    coef, bias = model.coef_, model.intercept_
    if coef.shape[0] == 1:       # binary: softmax([0, z]) == sigmoid(z)
        coef, bias = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], bias])
    weight = np.zeros((num_classes, coef.shape[1]), np.float32)
    b = np.full(num_classes, -1e4, np.float32)
    weight[model.classes_] = coef
    b[model.classes_] = bias
    probe = LinearProbe(coef.shape[1], num_classes, pooling)
    with torch.no_grad():
        probe.linear.weight.copy_(torch.from_numpy(weight))
        probe.linear.bias.copy_(torch.from_numpy(b))
    return probe.eval()


def fit_probe(train: Features, y_train: np.ndarray, val: Features, y_val: np.ndarray, num_classes: int,
              pooling: str = "cls", Cs: Sequence[float] = C_GRID, seed: int = 0, refit: bool = True,
              progress: Progress = None) -> ProbeFit:
    """Sweep ``Cs`` on the validation split, then refit on train + val (``refit``) at the best C."""
    xt, xv = train.vectors(pooling), val.vectors(pooling)
    sweep = []
    for i, C in enumerate(Cs):
        model = _logistic(xt, y_train, C, seed)
        acc = float((model.predict(xv) == y_val).mean())
        sweep.append((float(C), acc))
        if progress:
            progress(f"C {C:.3g} ({i + 1}/{len(Cs)}): val accuracy {acc:.4f}")
    best_c, best_acc = max(sweep, key=lambda s: (s[1], -abs(np.log10(s[0]))))
    x_all, y_all = (np.concatenate([xt, xv]), np.concatenate([y_train, y_val])) if refit else (xt, y_train)
    final = _logistic(x_all, y_all, best_c, seed)
    return ProbeFit(probe_from_sklearn(final, num_classes, pooling), best_c, best_acc, sweep)


@dataclass
class SegFit:
    """A trained segmentation head: module, chosen learning rate, validation mIoU, and per-lr results."""

    head: torch.nn.Module
    lr: float
    val_miou: float
    sweep: list[tuple[float, float]]


def build_seg_head(kind: str, embed_dim: int, num_classes: int, dropout: float = DROPOUT,
                   dpt_channels: Optional[int] = None) -> torch.nn.Module:
    """A fresh ``linear`` or ``dpt`` head."""
    if kind == "linear":
        return LinearSegHead(embed_dim, num_classes, dropout)
    if kind == "dpt":
        return DPTSegHead(dpt_config(embed_dim, num_classes, dpt_channels), dropout)
    raise ValueError(f"head must be 'linear' or 'dpt', not {kind!r}")


def seg_logits(head: torch.nn.Module, feats: Features, size: int) -> torch.Tensor:
    """Logits [B,K,size,size] of a segmentation head on the features it reads."""
    if isinstance(head, DPTSegHead):
        return head(feats.layers, (size, size))
    return head(feats.last, (size, size))


@torch.no_grad()
def predict_segmentation(head: torch.nn.Module, feats: Features, size: int, batch_size: int = 16) -> np.ndarray:
    """Argmax classes [N,size,size] (uint8) of a head over features."""
    head.eval()
    n = len(feats.cls)
    out = []
    for s in range(0, n, batch_size):
        part = feats.take(np.arange(s, min(n, s + batch_size)))
        out.append(seg_logits(head, part, size).argmax(1).to(torch.uint8).numpy())
    return np.concatenate(out)


def _train_one(kind: str, lr: float, train: Features, y_train: torch.Tensor, val: Features, y_val: np.ndarray,
               num_classes: int, embed_dim: int, epochs: int, batch_size: int, seed: int,
               ignore_classes: Sequence[int], progress: Progress,
               dpt_channels: Optional[int]) -> tuple[Optional[torch.nn.Module], float]:
    """One learning rate: train, then the validation mIoU of the final head ((None, NaN) when
    training diverged: a loss not finite)."""
    torch.manual_seed(seed)
    head = build_seg_head(kind, embed_dim, num_classes, DROPOUT, dpt_channels)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    n, size = len(y_train), int(y_train.shape[-1])
    steps = epochs * max(1, -(-n // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(seed)
    miou = float("nan")
    for epoch in range(epochs):
        head.train()
        total = 0.0
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            if len(idx) < 2 and isinstance(head, LinearSegHead) and n > 1:
                continue        # BatchNorm needs two samples
            if not (y_train[idx] != IGNORE).any():
                continue        # a batch with no labelled pixel
            logits = seg_logits(head, train.take(idx.numpy()), size)
            loss = F.cross_entropy(logits, y_train[idx], ignore_index=IGNORE)
            if not torch.isfinite(loss):
                if progress:
                    progress(f"lr {lr:g} epoch {epoch + 1}/{epochs}: diverged (the loss is not finite); "
                             "this learning rate is dropped")
                return None, float("nan")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        pred = predict_segmentation(head, val, size, batch_size)
        miou = mean_iou(confusion(y_val, pred, num_classes), ignore_classes)
        if progress:
            progress(f"lr {lr:g} epoch {epoch + 1}/{epochs}: loss {total / n:.4f}, val mIoU {miou:.4f}")
    return head.eval(), miou


def fit_segmenter(kind: str, train: Features, y_train: np.ndarray, val: Features, y_val: np.ndarray,
                  num_classes: int, embed_dim: int, lrs: Sequence[float] = LR_GRID, epochs: int = 20,
                  batch_size: int = 8, seed: int = 0, ignore_classes: Sequence[int] = (),
                  progress: Progress = None, dpt_channels: Optional[int] = None) -> SegFit:
    """Train a ``linear`` or ``dpt`` head at each learning rate of ``lrs``; keep the best on val
    mIoU among the heads whose weights are finite (a diverged learning rate is dropped)."""
    yt = torch.from_numpy(y_train.astype(np.int64))
    best, sweep = None, []
    for i, lr in enumerate(lrs):
        head, miou = _train_one(kind, float(lr), train, yt, val, y_val, num_classes, embed_dim, epochs,
                                batch_size, seed, ignore_classes, progress, dpt_channels)
        finite = head is not None and all(bool(torch.isfinite(t).all()) for t in head.state_dict().values())
        sweep.append((float(lr), miou if finite else float("nan")))
        if progress:
            progress(f"lr {lr:g} ({i + 1}/{len(lrs)}): val mIoU {miou:.4f}" if finite else
                     f"lr {lr:g} ({i + 1}/{len(lrs)}): diverged, dropped")
        if not finite:
            continue
        score = miou if np.isfinite(miou) else -1.0
        if best is None or score > best[0]:
            best = (score, float(lr), copy.deepcopy(head), miou)
    if best is None:
        raise UsageError("lrs", f"training diverged at every learning rate ({', '.join(f'{v:g}' for v in lrs)}): "
                                "try smaller ones")
    return SegFit(best[2], best[1], best[3], sweep)

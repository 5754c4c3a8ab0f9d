"""The GEO-Bench protocol on a frozen backbone, reported beside the DINOv3 model card's figures.

Classification: logistic-regression probe on the CLS token, C swept on ``valid``, refitted on
train + valid, accuracy on ``test`` (m-bigearthnet, multi-label: one-vs-rest probes, micro-F1). Segmentation: DPT head on four blocks, learning rate swept over
{3e-5, 1e-4, 3e-4, 1e-3} on ``valid``, mIoU on ``test`` (m-cashew-plantation without class 0).
Chips are normalised with each dataset's band statistics, as GEO-Bench's loader does; RGB bands only.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..engine import resolve_device
from ..errors import InputError, UsageError
from .fit import C_GRID, LR_GRID
from .geobench_data import geobench_task
from .model_card import MODEL_CARD
from .run import check_options, fit_classifier, fit_segmentation, resolve_backbone

PathLike = Union[str, os.PathLike]

#: Classes left out of a task's mIoU (absent from its test split).
IGNORE_CLASSES = {"m-cashew-plantation": (0,)}
FOLDERS = {"classify": "classification_v1.0", "segment": "segmentation_v1.0"}


@dataclass
class TaskResult:
    task: str
    kind: str
    metric: str
    ours: Optional[float]
    model_card: Optional[float]
    choice: str = ""
    seconds: float = 0.0


@dataclass
class GeoBenchReport:
    """Per-task results and the means per kind, as a table or JSON."""

    backbone: str
    column: str
    results: list[TaskResult] = field(default_factory=list)

    def means(self) -> dict[str, dict[str, Optional[float]]]:
        """Mean of ours and of the model card per kind, over the tasks run."""
        out = {}
        for kind in ("classify", "segment"):
            rows = [r for r in self.results if r.kind == kind and r.ours is not None]
            if rows:
                cards = [r.model_card for r in rows if r.model_card is not None]
                out[kind] = {"ours": float(np.mean([r.ours for r in rows])),
                             "model_card": float(np.mean(cards)) if len(cards) == len(rows) else None}
        return out

    def table(self) -> str:
        """A text table: task, metric, ours, the model card's figure, difference; then the means."""
        lines = [f"GEO-Bench, frozen {self.backbone} (model card column: {self.column})",
                 f"{'task':<24} {'metric':<9} {'ours':>6} {'card':>6} {'diff':>6}"]
        for r in self.results:
            lines.append(f"{r.task:<24} {r.metric:<9} {_pct(r.ours)} {_pct(r.model_card)} {_diff(r.ours, r.model_card)}")
        for kind, m in self.means().items():
            lines.append(f"{'mean ' + kind:<24} {'':<9} {_pct(m['ours'])} {_pct(m['model_card'])} "
                         f"{_diff(m['ours'], m['model_card'])}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"backbone": self.backbone, "model_card_column": self.column,
                           "results": [asdict(r) for r in self.results], "means": self.means()}, indent=2)


def _pct(v: Optional[float]) -> str:
    return f"{v:6.1f}" if v is not None else f"{'-':>6}"


def _diff(a: Optional[float], b: Optional[float]) -> str:
    return f"{a - b:+6.1f}" if a is not None and b is not None else f"{'':>6}"


def find_tasks(root: Path, names: Optional[Sequence[str]]) -> list[tuple[str, str, Path]]:
    """(task, kind, folder) of the requested (default: all model-card) tasks present under ``root``."""
    if not root.is_dir():
        raise InputError(root, "GEO-Bench root folder not found")
    found = {}
    for kind, sub in FOLDERS.items():
        for folder in sorted((root / sub).glob("*")) if (root / sub).is_dir() else []:
            if folder.is_dir():
                found[folder.name] = (kind, folder)
    if names:
        missing = [n for n in names if n not in found]
        if missing:
            raise InputError(root, f"task(s) {', '.join(missing)} not found (present: {', '.join(found) or 'none'})")
        return [(n, *found[n]) for n in names]
    picked = [(n, *found[n]) for n in MODEL_CARD if n in found]
    if not picked:
        raise InputError(root, f"no GEO-Bench task folder under {root}/{{{','.join(FOLDERS.values())}}}")
    return picked


def evaluate_geobench(root: PathLike, tasks: Optional[Sequence[str]] = None, backbone="dinov3-vitl16-sat493m",
                      epochs: int = 20, device: str = "auto", batch_size: int = 8, cache=None, seed: int = 0,
                      c_grid: Optional[Sequence[float]] = None, lrs: Optional[Sequence[float]] = None,
                      verify: bool = True, progress=None) -> GeoBenchReport:
    """Run the protocol on every requested task under ``root`` (``classification_v1.0/<task>``,
    ``segmentation_v1.0/<task>``); returns the report (test metrics in %)."""
    check_options(epochs=epochs, batch_size=batch_size, c_grid=c_grid, lrs=lrs)
    if root is None:
        raise UsageError("root", "give GEO-Bench's root folder (with classification_v1.0/ and segmentation_v1.0/)")
    picked = find_tasks(Path(root), tasks)
    device = str(resolve_device(device))
    bb = resolve_backbone(backbone, device, verify)
    column = "ViT-7B/16" if bb.depth == 40 else "ViT-L/16"
    report = GeoBenchReport(str(backbone), column)
    for name, kind, folder in picked:
        t0 = time.perf_counter()
        if progress:
            progress(f"{name}: loading {folder}")
        data = geobench_task(folder, ignore_classes=IGNORE_CLASSES.get(name, ()))
        if "test" not in data.splits:
            raise InputError(folder, "the partition has no test split")
        if kind == "classify":
            _, _, metrics, choice = fit_classifier(data, bb, Cs=c_grid or C_GRID, seed=seed, device=device,
                                                   batch_size=batch_size, cache=cache, progress=progress)
            ours, metric = ((metrics["test"]["micro_f1"], "micro-F1") if data.multilabel else
                            (metrics["test"]["accuracy"], "accuracy"))
        else:
            _, _, metrics, choice = fit_segmentation(data, bb, decoder="dpt", lrs=lrs or LR_GRID, epochs=epochs, seed=seed,
                                                     device=device, batch_size=batch_size, cache=cache, progress=progress)
            ours, metric = metrics["test"]["miou"], "mIoU"
        card = MODEL_CARD.get(name)
        report.results.append(TaskResult(name, kind, metric, 100 * ours,
                                         None if card is None else card[2 if column == "ViT-7B/16" else 1],
                                         choice, time.perf_counter() - t0))
    return report

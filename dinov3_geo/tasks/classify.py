"""One class per chip from a trained probe: backbone + probe -> class probabilities per chip.

The ``classify`` task (:mod:`dinov3_geo.tasks.registry`) runs a :class:`ChipClassifier` over a
scene's chips through the pipeline's ``run_chips`` and writes a GeoPackage with one polygon per
chip (:func:`write_chips`): the class, its probability and every class's probability.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from rasterio.windows import Window, bounds

from ..engine import StopToken
from ..io import styles
from ..io.atomic import atomic_output
from ..io.georef import vector_transform
from ..io.gpkg import write_gpkg_layer
from ..pipeline import run_chips
from .segment_head import HeadTaskModel

PathLike = Union[str, os.PathLike]


class ChipClassifier(HeadTaskModel):
    """A task model: normalised chips ``[B,3,T,T]`` -> class probabilities ``[B,K]``."""

    output = "vector"
    task = "classify"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities per chip."""
        f = self.backbone.forward_features(x)
        vectors = self.head.pool(f["cls"], f["patches"]).to(self.head.linear.weight.dtype)
        return self.head(vectors).float().softmax(dim=1)


class ChipCollector:
    """Pipeline consumer keeping each computed chip's window and probabilities."""

    def __init__(self) -> None:
        self.windows: list[Window] = []
        self.probs: list[np.ndarray] = []
        self.skipped = 0

    def add(self, window: Window, out: np.ndarray, valid: np.ndarray) -> None:
        self.windows.append(window)
        self.probs.append(np.asarray(out, np.float32).reshape(-1))

    def skip(self, window: Window) -> None:
        self.skipped += 1

    def close(self) -> None:
        """Nothing to flush: the GeoPackage is written once every chip is in."""


def chip_frame(collector: ChipCollector, class_names: Sequence[str], transform, crs):
    """One polygon per chip with ``class``, ``probability`` and ``p_<class>`` for every class."""
    import geopandas as gpd
    import shapely

    probs = np.stack(collector.probs) if collector.probs else np.zeros((0, len(class_names)), np.float32)
    best = probs.argmax(1) if len(probs) else np.zeros(0, np.int64)
    boxes = [shapely.box(*bounds(w, transform)) for w in collector.windows]
    columns = {"class": [class_names[i] for i in best], "class_id": best.astype(np.int32),
               "probability": probs.max(1) if len(probs) else np.zeros(0, np.float32),
               "row": [int(w.row_off) for w in collector.windows], "col": [int(w.col_off) for w in collector.windows]}
    for i, name in enumerate(class_names):
        columns[f"p_{name}"] = probs[:, i]
    return gpd.GeoDataFrame(columns, geometry=gpd.GeoSeries(boxes, crs=crs), crs=crs)


def write_chips(scene, model: ChipClassifier, output: Path, plan, settings, *, overwrite: bool = False,
                progress: Optional[bool] = None, stop: Optional[StopToken] = None):
    """Classify the chips of ``plan`` over the open ``scene`` into the GeoPackage ``output`` (layer
    ``chips``, written atomically; ``stop``: see :func:`~dinov3_geo.engine.run_chips`); returns the
    run's stats and the chips' frame."""
    collector = ChipCollector()
    stats = run_chips(scene, model, collector, plan, settings, progress=progress, stop=stop)
    frame = chip_frame(collector, model.class_names, vector_transform(scene.crs, scene.transform), scene.crs)
    with atomic_output(output, overwrite, inputs=[scene.path]) as tmp:
        os.unlink(tmp)      # the GPKG driver creates the file itself
        write_gpkg_layer(frame, tmp, "chips")
        styles.write_layer_style(tmp, "chips", "chips", styles.class_table(model.class_names, model.colormap))
    return stats, frame

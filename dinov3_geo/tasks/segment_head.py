"""Dense classes from a trained head: backbone + linear or DPT head -> per-class scores per pixel.

``segment_with_head`` runs it over a scene through the pipeline's ``predict(kind="classes")``: a
uint8 class COG (colour table, class names, 255 = nodata) and, on request, one polygon per region
of equal class (class, class name, area_m2) merged across chip and strip borders.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..errors import UsageError, WeightsError
from ..models.backbone import Backbone, load_backbone, normalise_rgb
from ..models.heads.io import HeadFile, check_backbone, load_head
from ..models.heads.linear import DPTSegHead
from ..train.features import backbone_identity

PathLike = Union[str, os.PathLike]


class HeadTaskModel(nn.Module):
    """What every head-based task model shares: the backbone (checked against the head file), the
    normalisation the head was trained with, its classes and chip size."""

    task = ""

    def __init__(self, backbone: Backbone, head: HeadFile):
        super().__init__()
        check_backbone(head, backbone_identity(backbone), self.task)
        self.backbone = backbone
        self.head = head.module()
        self.mean = tuple(head.meta["normalisation"]["mean"])
        self.std = tuple(head.meta["normalisation"]["std"])
        self.class_names = tuple(head.class_names)
        self.channels = len(self.class_names)
        self.chip_size = int(head.meta["chip_size"])
        self.colormap = head.colormap()

    def normalise(self, x01: torch.Tensor) -> torch.Tensor:
        """0..1 chips normalised as the head was trained."""
        return normalise_rgb(x01, self.mean, self.std)


class SegmentHeadModel(HeadTaskModel):
    """A task model: normalised chips ``[B,3,T,T]`` -> class probabilities ``[B,K,T,T]``."""

    output = "classes"
    task = "segment"

    def __init__(self, backbone: Backbone, head: HeadFile):
        super().__init__(backbone, head)
        self.layers = tuple(int(i) for i in head.meta["layers"])
        self.dense_layers = self.layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax class scores at the chip's size (blended across overlaps, then argmax)."""
        size = tuple(x.shape[-2:])
        if isinstance(self.head, DPTSegHead):
            logits = self.head(self.backbone.get_intermediate_layers(x, indices=self.layers), size)
        else:
            logits = self.head(self.backbone.forward_features(x)["patches"], size)
        return logits.float().softmax(dim=1)


def backbone_for_head(head: HeadFile, backbone: Union[None, PathLike, Backbone], verify: bool = True) -> Backbone:
    """The backbone a head runs on: the one given (checked later), else the one its file names."""
    if isinstance(backbone, Backbone):
        return backbone
    if backbone is None:
        name = head.meta["backbone"].get("name")
        try:
            return load_backbone(name, verify=verify)
        except WeightsError:
            raise UsageError("backbone", f"{head.source} was trained on backbone '{name}', which is not found "
                                         "here; give its path with `backbone`") from None
    return load_backbone(backbone, verify=verify)


def head_reading(head: HeadFile, bands: Optional[Sequence[int]], scale: Optional[tuple[float, float]]):
    """Bands and scaling to read a scene with: the caller's, else the head's when it recorded raster
    band numbers and one (MIN, MAX) (per-band statistics of a benchmark do not transfer to a scene)."""
    meta_bands, meta_scale = head.meta.get("bands"), head.meta.get("scale")
    if bands is None and meta_bands and all(isinstance(b, int) for b in meta_bands):
        bands = meta_bands
    if scale is None and meta_scale and len(meta_scale) == 2 and all(isinstance(v, (int, float)) for v in meta_scale):
        scale = tuple(meta_scale)
    return bands, scale


def load_segment_head(head: PathLike) -> HeadFile:
    """The segmentation head file ``head``; a probe is a WeightsError naming the file."""
    hf = load_head(head)
    if hf.task != "segment":
        raise WeightsError(head, f"a {hf.task} head: use it with classify, not segment")
    return hf


def head_tiling(head: HeadFile, tile: Optional[int], overlap: Optional[int]) -> tuple[int, int]:
    """Chip size and overlap to map with: ``tile`` defaults to the head's training chip size,
    ``overlap`` to a quarter of the tile (at most 64)."""
    tile = tile or int(head.meta["chip_size"])
    return tile, min(64, tile // 4) if overlap is None else overlap


@dataclass
class HeadRunResult:
    """What applying a head wrote."""

    output: Path
    vector: Optional[Path]
    polygons: Optional[int]
    predict: object
    seconds: float

    def summary(self) -> str:
        lines = [self.predict.summary()]         # the scene's warnings were issued as warnings
        if self.vector is not None:
            lines.append(f"wrote {self.vector} ({self.polygons} polygon{'' if self.polygons == 1 else 's'})")
        return "\n".join(lines)


def segment_with_head(scene: PathLike, head: PathLike, output: PathLike, *, vector: Optional[PathLike] = None,
                      backbone: Union[None, PathLike, Backbone] = None, tile: Optional[int] = None,
                      overlap: Optional[int] = None, batch_size: int = 8, device: str = "auto",
                      precision: str = "auto", bands: Optional[Sequence[int]] = None,
                      scale: Optional[tuple[float, float]] = None, overwrite: bool = False,
                      progress: Optional[bool] = None, verify: bool = True) -> HeadRunResult:
    """Map ``scene`` with a segmentation head file into a class COG (and per-class polygons).

    ``tile`` defaults to the head's training chip size, ``overlap`` to a quarter of it (at most 64).
    """
    from ..io.sinks import check_output
    from ..io.stac import describe_output
    from ..io.vector import polygonize_classes
    from ..pipeline import predict

    t0 = time.perf_counter()
    check_output(output, overwrite, inputs=[scene])
    if vector is not None:
        if Path(vector).resolve() == Path(output).resolve():
            raise UsageError("vector", "the vector output must differ from the raster output")
        check_output(vector, overwrite, inputs=[scene, output])
    hf = load_segment_head(head)
    model = SegmentHeadModel(backbone_for_head(hf, backbone, verify), hf)
    tile, overlap = head_tiling(hf, tile, overlap)
    bands, scale = head_reading(hf, bands, scale)
    result = predict(scene, model, output, kind="classes", tile=tile, overlap=overlap, batch_size=batch_size,
                     device=device, precision=precision, bands=bands, scale=scale, overwrite=overwrite,
                     progress=progress)
    polygons = None
    if vector is not None:
        try:
            polygons = polygonize_classes(output, vector, model.class_names, overwrite=overwrite)
        except BaseException:           # no half job: the same command can be rerun
            Path(output).unlink(missing_ok=True)
            raise
        describe_output(vector, output, model)        # its STAC Item (predict described the raster)
    return HeadRunResult(Path(output), Path(vector) if vector is not None else None, polygons, result,
                         time.perf_counter() - t0)

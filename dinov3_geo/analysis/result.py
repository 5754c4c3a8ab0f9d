"""What a land analysis returns: the files it wrote, the backbone, chips and time, once the
outputs' GIS sidecars (QGIS style, STAC Items) are written."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from dinov3_geo.io.stac import describe_output

PathLike = Union[str, os.PathLike]


@dataclass
class AnalysisResult:
    """What a land-analysis function wrote and how it went."""

    output: Path
    backbone: str
    seconds: float
    chips_computed: int = 0
    chips_skipped: int = 0
    vector: Optional[Path] = None
    extra: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The closing lines the command prints."""
        lines = [f"done in {self.seconds:.1f} s: {self.chips_computed} chips computed "
                 f"({self.chips_skipped} empty skipped), backbone {self.backbone}", f"wrote {self.output}"]
        if self.vector is not None:
            lines.append(f"wrote {self.vector}")
        lines += [f"{k}: {v}" for k, v in self.extra.items()]
        return "\n".join(lines)


def scene_path(scene) -> Optional[str]:
    """The file a scene argument names (a path, a DataArray's source, an open scene's path), if any."""
    if isinstance(scene, (str, os.PathLike)):
        return str(scene)
    return getattr(scene, "path", None) or getattr(scene, "encoding", {}).get("source")


def result(output: Path, backbone: str, t0: float, stats=(), source=None, **kw) -> AnalysisResult:
    """The result of a written ``output`` (made from ``source``), once its GIS sidecars are
    written: a raster's QGIS style, the STAC Items of it and of its polygons (``vector``)."""
    describe_output(output, source, vector=kw.get("vector"), properties={"backbone": backbone})
    computed = sum(s.chips_computed for s in stats)
    skipped = sum(s.chips_skipped for s in stats)
    return AnalysisResult(output, backbone, time.perf_counter() - t0, computed, skipped, **kw)


def model_id(model) -> str:
    """The backbone id a task model records in its outputs."""
    return model.backbone_id

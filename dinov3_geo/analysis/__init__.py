"""Land analysis with frozen DINOv3 features: embeddings, similarity, clustering and change.

Every function resolves its request at the door (:func:`dinov3_geo.tasks.registry.request_for`:
the task, the backbone's source, tiling, reading and run settings, all checked before any weights
are read), then runs the shared tiled pipeline with an embedding task model
(:mod:`dinov3_geo.tasks.embed`) and writes its result atomically:

- :func:`embed` -- one GeoParquet row per non-empty chip (CLS and mean patch embeddings), or with
  ``patch=True`` the patch-token map at 16-px cells (Zarr, or a COG for ``.tif``), optionally
  reduced to ``pca`` components;
- :func:`similar` -- cosine similarity of every cell to a reference (a point or polygons);
- :func:`cluster` -- k-means land units (scikit-learn's MiniBatchKMeans) over the cells;
- :func:`change` -- cosine distance between the cells of two dates on the first one's grid.

The rasters of ``similar``, ``cluster`` and ``change`` lie on the scene's own grid (its CRS,
transform and size), one value per 16 x 16 pixel cell. Scenes are paths, rioxarray DataArrays (the
``da.dinov3`` accessor passes its array) or open scene readers. Cell features go through a hidden
temporary Zarr store beside the output, so memory stays flat in the scene size; ``features``
reuses a store from ``embed(patch=True)`` without building or loading the backbone.

One module per analysis (:mod:`.embeddings`, :mod:`.similarity`, :mod:`.clustering`,
:mod:`.change_detection`) over what they share (:mod:`.cells`, :mod:`.result`).
"""
from dinov3_geo.analysis.change_detection import change
from dinov3_geo.analysis.clustering import cluster
from dinov3_geo.analysis.embeddings import embed, patch_map
from dinov3_geo.analysis.result import AnalysisResult
from dinov3_geo.analysis.similarity import similar
from dinov3_geo.tasks.registry import DEFAULT_BACKBONE

__all__ = ["embed", "patch_map", "similar", "cluster", "change", "AnalysisResult", "DEFAULT_BACKBONE"]

"""Many scenes in one job, in this process or on a Dask cluster, resumable: :func:`run_batch`."""
from dinov3_geo.batch.plan import expand_inputs, is_batch
from dinov3_geo.batch.runner import BatchResult, SceneOutcome, run_batch

__all__ = ["run_batch", "BatchResult", "SceneOutcome", "expand_inputs", "is_batch"]

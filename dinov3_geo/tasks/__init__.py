"""The tasks: each declared once in :mod:`dinov3_geo.tasks.registry` (what it computes, its
options, its writers), every route (command, function, accessor, batch) running it the same way.
The protocol a task model follows is :mod:`dinov3_geo.task_model`."""
from dinov3_geo.task_model import DENSE_OUTPUTS, OUTPUTS, TaskInfo, TaskModel, describe

__all__ = ["DENSE_OUTPUTS", "OUTPUTS", "TaskInfo", "TaskModel", "describe"]

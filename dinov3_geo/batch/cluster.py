"""Where a batch job runs: in this process, on a local Dask cluster, or on an existing scheduler.

``dask=None`` runs scenes one after the other here (or on ``$DASK_SCHEDULER_ADDRESS`` when set);
``"local"`` / ``"local:N"`` starts a :class:`distributed.LocalCluster` of N worker processes (one
thread each; N defaults to the GPUs, else 2); any address with ``://`` joins that scheduler. Each
worker loads the model once, on its first scene, through :class:`ModelPlugin`. Workers started with
``--resources GPU=1`` get scenes only one at a time per GPU.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from dataclasses import replace
from typing import Iterator, Optional

from dinov3_geo.batch.work import BatchJob, Runtime
from dinov3_geo.errors import DeviceError, DinoGeoWarning, UsageError

PLUGIN_PREFIX = "dinov3geo-model"


def dask_target(dask: Optional[str]) -> Optional[str]:
    """The cluster to use: ``dask`` checked, or ``$DASK_SCHEDULER_ADDRESS``, or None (in-process)."""
    target = dask if dask else os.environ.get("DASK_SCHEDULER_ADDRESS") or None
    if target is None or target == "local" or "://" in target:
        return target
    if target.startswith("local:"):
        n = target.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise UsageError("dask", f"expected local:N with N >= 1 workers, got '{target}'")
        return target
    raise UsageError("dask", f"expected local, local:N or a scheduler address such as tcp://host:8786, got '{target}'")


def local_workers(target: str) -> int:
    """Worker processes for ``local[:N]``: N, else one per GPU, else 2."""
    if ":" in target:
        return int(target.split(":", 1)[1])
    return _local_gpu_count() or 2


@contextlib.contextmanager
def open_client(target: str) -> Iterator:
    """A ``distributed.Client`` on ``target`` (a LocalCluster it starts and stops, or a scheduler)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise UsageError("dask", "needs Dask distributed: pip install 'dinov3-geo[cluster]'") from None
    if target.startswith("local"):
        n = local_workers(target)
        gpus = _local_gpu_count()
        resources = {"GPU": 1} if gpus else None
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, resources=resources,
                          silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            yield client
        return
    try:
        client = Client(target, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise DeviceError(target, f"cannot reach the Dask scheduler ({exc})") from None
    with client:
        yield client


def _local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def dashboard_link(client) -> Optional[str]:
    """The scheduler's dashboard address, or None when it serves none."""
    if "dashboard" not in (client.scheduler_info().get("services") or {}):
        return None
    return client.dashboard_link


def uses_gpus(client) -> bool:
    """Whether the cluster's workers declare a ``GPU`` resource (then each task takes one)."""
    workers = client.scheduler_info().get("workers", {})
    return any("GPU" in (w.get("resources") or {}) for w in workers.values())


def workers_per_host(client) -> dict[str, int]:
    """How many workers each machine of the cluster runs (they share its cores)."""
    hosts: dict[str, int] = {}
    for w in client.scheduler_info().get("workers", {}).values():
        host = w.get("host", "")
        hosts[host] = hosts.get(host, 0) + 1
    return hosts


try:
    from distributed import WorkerPlugin as _Base
except ImportError:  # distributed is only needed for the cluster paths
    _Base = object


class ModelPlugin(_Base):
    """Holds one :class:`Runtime` per worker, loaded on the first scene and reused for the rest.

    Unless the job sets ``torch_threads``, torch on each worker uses the cores of its machine
    divided among the workers there (``hosts``: workers per host address)."""

    def __init__(self, options: BatchJob, name: str, hosts: Optional[dict[str, int]] = None):
        self.options, self.name, self.hosts = options, name, dict(hosts or {})
        self._runtime: Optional[Runtime] = None
        self._lock = threading.Lock()
        self._index: Optional[int] = None

    def __getstate__(self):
        return {"options": self.options, "name": self.name, "hosts": self.hosts}

    def __setstate__(self, state):
        self.__init__(state["options"], state["name"], state["hosts"])

    def setup(self, worker) -> None:
        """Remember the worker's index (its name on a LocalCluster) to pick its GPU, and share the
        machine's cores among its workers."""
        name = str(getattr(worker, "name", ""))
        self._index = int(name) if name.isdigit() else None
        if self.options.torch_threads is None:
            from distributed.comm import get_address_host

            sharing = self.hosts.get(get_address_host(worker.address), 1)
            self.options = replace(self.options, torch_threads=max(1, (os.cpu_count() or 1) // sharing))

    def teardown(self, worker) -> None:
        """Free the model when the job ends (the plugin is unregistered)."""
        self._runtime = None

    def runtime(self) -> Runtime:
        with self._lock:
            if self._runtime is None:
                self._runtime = Runtime(self.options, gpu_index=self._index)
            return self._runtime


def chip_events(topic: str):
    """A chip report that sends ``(unit, chips)`` to the client as events of ``topic`` (thread-safe)."""
    from distributed import get_worker

    worker = get_worker()
    return lambda unit, chips: worker.log_event(topic, [unit, int(chips)])


@contextlib.contextmanager
def library_warnings_hidden() -> Iterator[None]:
    """Around a task on a worker: the libraries' warnings (rasterio's 'no geotransform', pyogrio's
    'crs was not provided') hidden, as the command hides them in its own process; ours still show."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("default", DinoGeoWarning)
        yield


def worker_settings(client, settings):
    """The run settings as the cluster's workers resolve them (``auto``: their GPU, bf16), asked of
    one worker, so that the job's resume recipe records what the workers will compute with."""
    return client.submit(_resolve_here, settings, pure=False).result()


def _resolve_here(settings):
    return settings.on_this_machine()


def worker_runtime(plugin_name: str) -> Runtime:
    """The model of the worker this task runs on."""
    from distributed import get_worker

    return get_worker().plugins[plugin_name].runtime()

"""The host pipeline's capacity with a synchronous pass-through model (the first channel of the
chip, as ``bench_pipeline.py --ceiling``), through the public ``predict`` only, so that the same
script measures any version of the code (``PYTHONPATH`` set to its checkout): chips/s end to end
and CPU per chip, ``--runs`` times in one process, run under ``taskset`` for a core count.

    taskset -c 0 python benchmarks/bench_capacity.py --scene SCENE.tif [--runs 3] [--classes 6]
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # as the dinov3geo command does


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scene", required=True)
    ap.add_argument("--out", default=None, help="output COG (default beside the scene)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--classes", type=int, default=0, help="K > 0: K class scores (uint8 COG) instead")
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    import dinov3_geo
    import torch
    from dinov3_geo import predict
    from dinov3_geo.hostmem import keep_freed_memory

    keep_freed_memory()     # as the dinov3geo command does; library runs leave the allocator alone

    class PassThrough(torch.nn.Module):
        """The first channel (or K scores of it, the argmax its level) of the 0..1 chip."""

        def forward(self, x):
            first = x[:, :1]
            if not a.classes:
                return first.clone()
            levels = torch.linspace(0, 1, a.classes).view(1, a.classes, 1, 1)
            return first * levels - levels * levels / 2

    out = a.out or os.path.splitext(a.scene)[0] + "_capacity.tif"
    runs = []
    for _ in range(a.runs):
        t, c = time.perf_counter(), time.process_time()
        res = predict(a.scene, PassThrough(), out, kind="classes" if a.classes else "continuous", tile=512,
                      overlap=64, batch_size=a.batch, device="cpu", overwrite=True, progress=False)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        n = res.stats.chips_computed
        runs.append(dict(chips_per_s=round(n / wall, 2), cpu_ms_per_chip=round(1000 * cpu / n, 3)))
    print(json.dumps(dict(code=os.path.dirname(os.path.dirname(dinov3_geo.__file__)), cores=len(os.sched_getaffinity(0)),
                          classes=a.classes, runs=runs, load_average=[round(v, 2) for v in os.getloadavg()])))


if __name__ == "__main__":
    main()

"""Does the host keep a device of R chips/s busy, on 1 and on 2 cores? A sweep of
``bench_pipeline.py --model sleep:R``, one process per run, pinned with ``taskset``.

For each round (``--rounds``, alternating: every output, core set and rate once per round), each
output (``continuous``: canopy-like floats; ``classes``: 6 class scores to a uint8 COG; ``patches``:
``embed --patch``, 384 features per 16 px cell to Zarr) and each core set (``--cores``, e.g. ``0``
and ``0,1``): the host's capacity (``sleep:inf``: chips/s end to end with an infinitely fast
device) and every rate of ``--rates``. Each run's JSON goes to ``OUT/<output>_c<cores>_r<R>_<round>.json``;
the summary (medians over the rounds: capacity, busy share end to end and over the device's span,
host CPU per chip; the scaling from the first core set to the last; whether the device is busy
>= ``--target`` whenever R <= ``--share`` x capacity) to ``OUT/summary.json`` and as a table on
stdout.

    python benchmarks/bench_busy.py --out benchmarks/results/busy-DATE [--rounds 3] [--grid 24x24]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_one(a, output: str, cores: str, rate: str, round_: int) -> dict:
    """One pinned bench_pipeline.py run; its JSON (also kept in ``a.out``)."""
    path = a.out / f"{output}_c{cores.replace(',', '-')}_r{rate}_{round_}.json"
    cmd = ["taskset", "-c", cores, sys.executable, str(HERE / "bench_pipeline.py"), "--model", f"sleep:{rate}",
           "--output", output, "--grid", a.grid, "--tile", str(a.tile), "--overlap", str(a.overlap),
           "--batch", str(a.batch), "--work", str(a.work), "--json", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    try:
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        res = {"error": proc.stderr[-2000:]}
    res.update(round=round_, cores_set=cores, rate=rate)
    print(f"[busy {time.strftime('%H:%M:%S')}] {output} cores {cores} sleep:{rate} round {round_}: "
          f"{res.get('chips_per_s')} chips/s, busy {res.get('busy_fraction')} (span {res.get('busy_fraction_span')}), "
          f"{res.get('host_cpu_ms_per_chip')} ms CPU/chip, load {res.get('load_average_before')}",
          file=sys.stderr, flush=True)
    return res


def _work(kind: str, seconds: float, core: int, queue) -> None:
    """Pinned to ``core``: repeat one unit of ``kind`` work for ``seconds``; put units/s."""
    import numpy as np
    import zstandard

    os.sched_setaffinity(0, {core})
    rng = np.random.default_rng(core)
    if kind == "compute":       # ZSTD level 1 on 256 KB of real-ish data: stays in the core's cache
        data = (rng.normal(size=65536).astype(np.float32) * 10).round(2).tobytes()
        cctx = zstandard.ZstdCompressor(level=1)
        step = lambda: cctx.compress(data)      # noqa: E731
    else:                       # copying 64 MB: the memory bus
        a = np.ones(16 << 20, np.float32)
        b = np.empty_like(a)
        step = lambda: np.copyto(b, a)          # noqa: E731
    step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    queue.put(n / (time.perf_counter() - t0))


def machine_scaling(cores: list[int], seconds: float = 3.0) -> dict:
    """How this machine scales from one core to ``cores``: in-cache compression (the cores) and
    memory copies (the shared memory bus), one process per core, each alone and all at once."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    out = {}
    for kind in ("compute", "memory"):
        rates = {}
        for group in ([cores[0]], cores):
            queue = ctx.Queue()
            procs = [ctx.Process(target=_work, args=(kind, seconds, c, queue)) for c in group]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            rates[len(group)] = sum(queue.get() for _ in procs)
        out[f"{kind}_scaling"] = round(rates[len(cores)] / rates[1], 3)
    out["load_average"] = [round(v, 2) for v in os.getloadavg()]
    return out


def median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def summarise(a, runs: list[dict]) -> dict:
    """Medians per output, core set and rate; capacity scaling; the busy target checked."""
    out: dict = {}
    for output in a.outputs:
        per_cores = {}
        for cores in a.cores:
            mine = [r for r in runs if r.get("output") == output and r["cores_set"] == cores and "error" not in r]
            cap = median([r["chips_per_s"] for r in mine if r["rate"] == "inf"])
            rates = {}
            for rate in a.rates:
                sel = [r for r in mine if r["rate"] == rate]
                if not sel:
                    continue
                busy = median([r["busy_fraction"] for r in sel])
                rates[rate] = dict(busy_fraction=busy, busy_fraction_span=median([r["busy_fraction_span"] for r in sel]),
                                   chips_per_s=median([r["chips_per_s"] for r in sel]),
                                   host_cpu_ms_per_chip=median([r["host_cpu_ms_per_chip"] for r in sel]),
                                   model_output_cpu_ms_per_chip=median([r["model_output_cpu_ms_per_chip"] for r in sel]),
                                   start_s=median([r["start_s"] for r in sel]), tail_s=median([r["tail_s"] for r in sel]),
                                   runs=len(sel), below_share_of_capacity=bool(cap and float(rate) <= a.share * cap))
            held = [v for v in rates.values() if v["below_share_of_capacity"]]
            per_cores[cores] = dict(
                capacity_chips_per_s=cap,
                capacity_runs=[r["chips_per_s"] for r in mine if r["rate"] == "inf"],
                capacity_host_cpu_ms_per_chip=median([r["host_cpu_ms_per_chip"] for r in mine if r["rate"] == "inf"]),
                rates=rates,
                target_met=all(v["busy_fraction"] >= a.target for v in held) if held else None,
                target_met_span=all(v["busy_fraction_span"] >= a.target for v in held) if held else None)
        caps = [per_cores[c]["capacity_chips_per_s"] for c in a.cores]
        scaling = round(caps[-1] / caps[0], 3) if len(caps) > 1 and all(caps) else None
        out[output] = dict(cores=per_cores, scaling=scaling)
    return out


def table(summary: dict, a) -> str:
    lines = []
    for output, s in summary.items():
        lines.append(f"\n{output}: capacity scaling {a.cores[0]} -> {a.cores[-1]}: {s['scaling']}")
        lines.append("| cores | capacity (chips/s) | R | busy end to end | busy over the span | chips/s | host CPU ms/chip |")
        lines.append("|---|---|---|---|---|---|---|")
        for cores, c in s["cores"].items():
            for rate, v in c["rates"].items():
                lines.append(f"| {cores} | {c['capacity_chips_per_s']} | {rate} | {v['busy_fraction']} | "
                             f"{v['busy_fraction_span']} | {v['chips_per_s']} | {v['host_cpu_ms_per_chip']} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for every run's JSON and the summary")
    ap.add_argument("--work", type=Path, default=None, help="folder for the scene (default OUT/../busy-work)")
    ap.add_argument("--rates", default="25,50,100,150,200,300,400")
    ap.add_argument("--cores", default="0;0,1", help="core sets for taskset, ';'-separated")
    ap.add_argument("--outputs", default="continuous,classes,patches")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--grid", default="24x24")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--share", type=float, default=0.8, help="R up to this share of capacity must keep ...")
    ap.add_argument("--target", type=float, default=0.95, help="... the device busy at least this share")
    a = ap.parse_args(argv)
    a.rates = [r.strip() for r in a.rates.split(",") if r.strip()]
    a.cores = [c.strip() for c in a.cores.split(";") if c.strip()]
    a.outputs = [o.strip() for o in a.outputs.split(",") if o.strip()]
    a.out.mkdir(parents=True, exist_ok=True)
    a.work = a.work or a.out.parent / "busy-work"
    a.work.mkdir(parents=True, exist_ok=True)
    probe = machine_scaling(sorted({int(c) for cs in a.cores for c in cs.split(",")}))
    print(f"[busy] machine: {probe}", file=sys.stderr, flush=True)
    runs = []
    t0 = time.perf_counter()
    for round_ in range(a.rounds):
        for output in a.outputs:
            order = a.cores if round_ % 2 == 0 else a.cores[::-1]
            for cores in order:
                for rate in ["inf", *a.rates]:
                    runs.append(run_one(a, output, cores, rate, round_))
    summary = dict(machine=f"{os.cpu_count()} cores", grid=a.grid, tile=a.tile, overlap=a.overlap, batch=a.batch,
                   rounds=a.rounds, share=a.share, target=a.target, wall_s=round(time.perf_counter() - t0),
                   machine_scaling=probe,
                   outputs=summarise(a, runs))
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(table(summary["outputs"], a))
    return summary


if __name__ == "__main__":
    main()

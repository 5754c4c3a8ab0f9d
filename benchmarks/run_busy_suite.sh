#!/usr/bin/env bash
# Every figure of issue #25 in one go, on this machine: the simulated-device sweep (1 and 2
# cores, floats / 6 classes / embed --patch, R = 25..400 chips/s, alternating rounds), the
# per-scene overhead of batches, in-process against --dask local:2, and the per-stage CPU.
# Run it on a quiet machine (1-minute load average below 0.6: nothing else running); it waits up
# to WAIT_MIN minutes (default 30) for that, then runs anyway and says so in load.txt.
#
#   bash benchmarks/run_busy_suite.sh [OUT_DIR]        # default benchmarks/results/busy-<date>
#
# ROUNDS (default 3), GRID (default 24x24: 576 chips of 512 px), RATES, WAIT_MIN override.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/busy-$(date +%Y-%m-%d)}
ROUNDS=${ROUNDS:-3}
GRID=${GRID:-24x24}
RATES=${RATES:-25,50,100,150,200,300,400}
WAIT_MIN=${WAIT_MIN:-30}
WORK=${WORK:-$(mktemp -d -t busy-suite-XXXX)}
mkdir -p "$OUT"
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1

load1() { cut -d' ' -f1 /proc/loadavg; }
for _ in $(seq 1 $((WAIT_MIN * 2))); do
    awk -v l="$(load1)" 'BEGIN { exit !(l < 0.6) }' && break
    sleep 30
done
{ echo "start $(date -Is) load $(cat /proc/loadavg)"; nproc; lscpu | grep -E 'Model name|^CPU\(s\)'; } > "$OUT/load.txt"

python benchmarks/bench_busy.py --out "$OUT/sweep" --work "$WORK" --rounds "$ROUNDS" --grid "$GRID" \
    --rates "$RATES" > "$OUT/sweep_table.md" 2> "$OUT/sweep.log"
echo "after sweep $(date -Is) load $(cat /proc/loadavg)" >> "$OUT/load.txt"

python benchmarks/bench_batch.py --mode overhead --scenes 20 --repeats 3 --work "$WORK/batch" \
    --json "$OUT/overhead.json" > /dev/null 2> "$OUT/overhead.log"
python benchmarks/bench_batch.py --mode batch --scenes 20 --large 2 --large-px 2304 --workers 2 --repeats 2 \
    --work "$WORK/batch" --json "$OUT/dask.json" > /dev/null 2> "$OUT/dask.log"
for c in 0 0,1; do
    taskset -c "$c" python benchmarks/bench_stages.py --grid 12x12 > "$OUT/stages_c${c/,/-}.json" 2> /dev/null
done
echo "end $(date -Is) load $(cat /proc/loadavg)" >> "$OUT/load.txt"
cat "$OUT/sweep_table.md"

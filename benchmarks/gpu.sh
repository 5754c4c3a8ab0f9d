#!/usr/bin/env bash
# The pipeline benchmark on a bare GPU machine (PyTorch, transformers, timm present; no rasterio).
#
#   bash benchmarks/fetch_wheels.sh          # once, where PyPI is reachable: wheels into .whl/
#   bash benchmarks/gpu.sh OUTDIR            # on the GPU machine, from the repo root, .whl/ beside it
#
# Installs the carried wheels whose package is missing (or, for timm, too old) into /tmp/site, then
# runs benchmarks/bench_pipeline.py, one process per run, each writing OUTDIR/<run>.json:
#   vitl_b16        canopy (ViT-L + DPT), batch 16, eager, with the TerraTorch peer on the same scene
#                   and the pass-through pipeline ceiling (--ceiling: the host's own limit)
#   vitl_b32        canopy, batch 32, eager
#   vitl_bb_b64     ViT-L backbone embeddings (feature norm written), batch 64, eager
#   vit7b_b16       ViT-7B backbone embeddings, batch 16, eager (smaller scene)
#   vitl_b16_c      canopy, batch 16, --compile (warm-up not timed)
#   variants_b16    bench_model.py: canopy ViT-L variants (bf16, cuDNN autotuning, channels-last head,
#                   fp8) against fp32: errors and model-only speed
#   vitl_b32_c      canopy, batch 32, --compile
# bf16, 512 px chips, overlap 64, on the Salt Lake sample tiled to 24 x 24 chips (576; 12 x 12 for
# the 7B): chip counts are multiples of every batch, so a compiled model never meets a short batch.
# A failed or timed-out run leaves a JSON with "error" and the rest go on; the whole script keeps to
# GPU_SH_BUDGET_S (default 300 s) by shortening the last runs' limits (vitl_b32_c is last). At the end
# it prints a table; OUTDIR/gpu_sh.log holds every run's output (8 files in all, so all come back
# from a device run's $OUT, which returns at most 8).
#
# GPU_SH_SMOKE=1 runs the same sequence on CPU with the small models (checks this script anywhere).
set -u
OUTDIR=${1:?usage: bash benchmarks/gpu.sh OUTDIR}
mkdir -p "$OUTDIR"
T0=$(date +%s)
BUDGET=${GPU_SH_BUDGET_S:-300}
PY=${PYTHON:-python3}
WORK=${GPU_SH_WORK:-/tmp/dinov3geo-bench}
LOG="$OUTDIR/gpu_sh.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$WORK"

say() { echo "[gpu.sh +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

# -- 1. what is missing, from the carried wheels -------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  NEED=$($PY - .whl/*.whl <<'EOF'
import importlib, importlib.util, sys
from pathlib import Path

def have(mod):
    try:
        return importlib.util.find_spec(mod) is not None
    except Exception:
        return False

def timm_ok():
    try:
        import timm
        v = tuple(int(x) for x in timm.__version__.split(".")[:3])
        return v >= (1, 0, 20)
    except Exception:
        return False

checks = {"rasterio": lambda: have("rasterio"), "affine": lambda: have("affine"), "cligj": lambda: have("cligj"),
          "click_plugins": lambda: have("click_plugins"), "terratorch": lambda: have("terratorch"),
          "timm": timm_ok}
for whl in sys.argv[1:]:
    name = Path(whl).name.split("-")[0].lower().replace("-", "_")
    if not checks.get(name, lambda: have(name))():
        print(whl)
EOF
)
  if [ -n "$NEED" ]; then
    say "installing into /tmp/site: $(echo $NEED | xargs -n1 basename | tr '\n' ' ')"
    # shellcheck disable=SC2086
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $NEED >>"$LOG" 2>&1; then
      export PYTHONPATH="/tmp/site:$PYTHONPATH"
    else
      say "wheel install failed (see $LOG); going on with what is there"
    fi
  fi
fi
$PY - >>"$LOG" 2>&1 <<'EOF'
import importlib
for m in ("torch", "transformers", "timm", "rasterio", "numpy", "terratorch"):
    try:
        mod = importlib.import_module(m) if m != "terratorch" else None
        print(m, getattr(mod, "__version__", "present") if mod else ("present" if importlib.util.find_spec(m) else "missing"))
    except Exception as exc:
        print(m, "MISSING:", exc)
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >>"$LOG" 2>&1

# -- 2. the runs ------------------------------------------------------------------------------------
if [ "${GPU_SH_SMOKE:-0}" = 1 ]; then
  DEV=cpu; CANOPY=small; BB=small-backbone; BIG=small-backbone
  COMMON=(--device cpu --tile 128 --overlap 16 --iters 2); GRID=4x4; GRID7=2x4; B1=4; B2=8; BB_B=8; B7=4
else
  DEV=cuda; CANOPY=vitl; BB=vitl-backbone; BIG=vit7b
  COMMON=(--device cuda --tile 512 --overlap 64); GRID=24x24; GRID7=12x12; B1=16; B2=32; BB_B=64; B7=16
fi

record_error() {  # name, message, args...
  local name=$1 msg=$2; shift 2
  $PY - "$OUTDIR/$name.json" "$name" "$msg" "$LOG" "$@" <<'EOF'
import json, sys
path, name, msg, log, *args = sys.argv[1:]
try:
    tail = open(log, errors="replace").read().splitlines()[-15:]
except OSError:
    tail = []
json.dump({"run": name, "error": msg, "args": args, "log_tail": tail}, open(path, "w"))
EOF
}

bench() {  # name, limit_s, args...
  local name=$1 limit=$2; shift 2
  local left=$(( T0 + BUDGET - $(date +%s) ))
  rm -f "$OUTDIR/$name.json"
  if (( left < 20 )); then
    say "$name: skipped, the time budget is spent"
    record_error "$name" "skipped: the ${BUDGET}s budget of gpu.sh was spent" "$@"
    return
  fi
  (( limit > left )) && limit=$left
  say "$name: $(basename "${SCRIPT:-bench_pipeline.py}") $* (limit ${limit}s)"
  timeout -k 10 "$limit" $PY "${SCRIPT:-benchmarks/bench_pipeline.py}" "$@" --work "$WORK" --json "$OUTDIR/$name.json" >>"$LOG" 2>&1
  local rc=$?
  if [ ! -s "$OUTDIR/$name.json" ]; then
    if (( rc == 124 || rc == 137 )); then record_error "$name" "timed out after ${limit}s" "$@"
    else record_error "$name" "exit status $rc without a result (see log_tail)" "$@"; fi
  fi
  say "$name: done (rc $rc)"
}

bench vitl_b16    150 --model "$CANOPY" --batch "$B1" --grid "$GRID" --peer auto --ceiling "${COMMON[@]}"
bench vitl_b32     60 --model "$CANOPY" --batch "$B2" --grid "$GRID" --peer off "${COMMON[@]}"
bench vitl_bb_b64  50 --model "$BB" --batch "$BB_B" --grid "$GRID" --peer off "${COMMON[@]}"
bench vit7b_b16    70 --model "$BIG" --batch "$B7" --grid "$GRID7" --peer off "${COMMON[@]}"
bench vitl_b16_c  120 --model "$CANOPY" --batch "$B1" --grid "$GRID" --peer off --compile "${COMMON[@]}"
SCRIPT=benchmarks/bench_model.py bench variants_b16 80 --model "$CANOPY" --batch "$B1" --device "$DEV" \
  $([ "$DEV" = cpu ] && echo "--tile 128 --iters 2")
bench vitl_b32_c  120 --model "$CANOPY" --batch "$B2" --grid "$GRID" --peer off --compile "${COMMON[@]}"

# -- 3. the table ----------------------------------------------------------------------------------
$PY - "$OUTDIR" <<'EOF' | tee -a "$LOG"
import json, sys
from pathlib import Path
order = ["vitl_b16", "vitl_b32", "vitl_bb_b64", "vit7b_b16", "vitl_b16_c", "vitl_b32_c"]
rows = []
for name in order:
    p = Path(sys.argv[1]) / f"{name}.json"
    try:
        r = json.loads(p.read_text())
    except Exception as exc:
        r = {"error": f"no result ({exc})"}
    def f(k, fmt="{:.1f}"):
        v = r.get(k)
        return fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"
    rows.append([name, str(r.get("device", "-"))[:22], str(r.get("model", "-")), f("batch", "{}"),
                 "yes" if r.get("compile") else "no", f("chips", "{}"), f("model_only_chips_per_s"),
                 f("end_to_end_chips_per_s"), f("ratio", "{:.3f}"), f("peer_end_to_end_chips_per_s"),
                 f("peer_ratio", "{:.3f}"), f("cog_finalize_s", "{:.1f}"), f("pipeline_ceiling_chips_per_s"),
                 f("compile_warmup_s", "{:.0f}"),
                 f("peak_gpu_mb", "{}"), f("peak_rss_mb", "{}"), str(r.get("error", ""))[:60]])
head = ["run", "device", "model", "batch", "compile", "chips", "model-only/s", "e2e/s", "ratio", "peer e2e/s",
        "peer ratio", "cog s", "ceiling/s", "warm s", "GPU MB", "RSS MB", "error"]
w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
print("  ".join(h.ljust(w[i]) for i, h in enumerate(head)))
for r in rows:
    print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))
try:
    r = json.loads((Path(sys.argv[1]) / "variants_b16.json").read_text())
    print("variants_b16:", r.get("device"), r.get("error", ""))
    for name, v in r.items():
        if isinstance(v, dict):
            print(f"  {name:22s}", {k: v.get(k) for k in ("model_only_chips_per_s", "speedup_over_bf16",
                                                          "median_rel_error", "p99_rel_error", "error") if k in v})
except Exception as exc:
    print("variants_b16: no result", exc)
EOF
say "all done in $(( $(date +%s) - T0 )) s; JSON in $OUTDIR"

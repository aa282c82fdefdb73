#!/usr/bin/env bash
# The long form of bench/gpu_check.sh (which fits one call of 8 minutes): everything we measure on a lent GPU,
# in two parts that each fit one call of ten minutes:
#   PARTS=ab   the kernel A/B of every op (bench.ab)
#   PARTS=mfu  training-step MFU (bench.mfu): d20 against the torch Newton-Schulz, d20 at device batch 32,
#              d12 against every torch version, d20 with FP8
# (default: both), then the markdown report and charts (bench.report). RESULTS=DIR puts a second part's
# JSON next to the first's, so one report covers both.
# Results land in bench/results/<UTC stamp>/ (or RESULTS) and, when $OUT is set, are copied to
# $OUT/results/<stamp>/ after every step, so a time limit never loses what was already measured (ab and mfu
# also rewrite their JSON after every case).
# Time: each step has its own limit in seconds (TIME_NS TIME_CE TIME_ATTN TIME_D20 TIME_D20_B32 TIME_D12 TIME_FP8) and
# the whole script a deadline (TOTAL, default 580 s, the report included): a step gets what is left, or
# is not run. A step that fails or runs out of time is logged and the next one runs.
# STEPS: timed optimizer steps per bench.mfu run. Peers (Liger, cut-cross-entropy, torchao) are installed
# from .whl/ when it was carried along (bench/steps.sh).
#
#   bash bench/run_gpu.sh
#   PARTS=ab bash bench/run_gpu.sh; PARTS=mfu RESULTS=bench/results/<that stamp> bash bench/run_gpu.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
dir=${RESULTS:-bench/results/$(date -u +%Y%m%d-%H%M%S)}
PARTS=${PARTS:-"ab mfu"}
mkdir -p "$dir"
echo "--- PARTS=$PARTS, $(date -u +%H:%M:%S) UTC" >> "$dir/summary.txt"  # a second part appends
t_start=$(date +%s)
deadline=$(( t_start + ${TOTAL:-580} ))
RESERVE=25  # for the report
source bench/steps.sh
install_wheels

step env 60 $PY -c "
import json, torch
from bench.timing import device_info
print(json.dumps(device_info(), indent=1))
assert torch.cuda.is_available(), 'no CUDA device'
"
nvidia-smi >> "$dir/env.log" 2>&1

if [[ " $PARTS " == *" ab "* ]]; then
step ab_newton_schulz "${TIME_NS:-90}"    $PY -m bench.ab newton_schulz --json "$dir/ab_newton_schulz.json"
step ab_cross_entropy "${TIME_CE:-120}"   $PY -m bench.ab cross_entropy --json "$dir/ab_cross_entropy.json"
step ab_attention     "${TIME_ATTN:-300}" $PY -m bench.ab attention     --json "$dir/ab_attention.json"
fi
if [[ " $PARTS " == *" mfu "* ]]; then
# d20: ours against the torch Newton-Schulz only (issue: a d20 step no slower than with it); each variant compiles
step mfu_d20 "${TIME_D20:-150}" $PY -m bench.mfu --depth 20 --device-batch-size 16 --compare newton_schulz --warmup 2 --steps "${STEPS:-8}" --json "$dir/mfu_d20.json"
# d20 at the default device batch 32: fits only with relu² recomputed (chosen automatically from the estimate)
step mfu_d20_b32 "${TIME_D20_B32:-80}" $PY -m bench.mfu --depth 20 --warmup 2 --steps "${STEPS:-8}" --json "$dir/mfu_d20_b32.json"
step mfu_d12 "${TIME_D12:-180}"  $PY -m bench.mfu --depth 12 --compare --warmup 2 --steps "${STEPS:-8}" --json "$dir/mfu_d12.json"
step mfu_d20_fp8 "${TIME_FP8:-80}" $PY -m bench.mfu --depth 20 --device-batch-size 16 --fp8 --warmup 2 --steps "${STEPS:-8}" --json "$dir/mfu_d20_fp8.json"
fi
RESERVE=0
step report 25 $PY -m bench.report "$dir"

echo
echo "=== summary ($(( $(date +%s) - t_start ))s in all), results in $dir"
cat "$dir/summary.txt"
for f in "$dir"/ab_*.log "$dir"/mfu_*.log; do
    [ -f "$f" ] || continue
    echo "--- $(basename "$f" .log)"
    # the tables only, without the per-run chatter
    sed -n '/^newton_schulz$\|^cross_entropy$\|^attention$\|^kernels /,/^$/p' "$f"
done
publish

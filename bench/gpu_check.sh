#!/usr/bin/env bash
# Everything a lent GPU should measure, in one call of at most 8 minutes (TOTAL, default 450 s, wheel install and
# every compile included), most valuable first:
#   env         device, driver, torch, triton, commit
#   d20         d20 training step at device batch 32 x 2048: our kernels (auto) against the torch-only path of a
#               nanochat user without FA3 (SDPA with window masks, torch CE and Newton-Schulz, compiled with the
#               model), same seed and batches; then a profile of our step (time per category, top 15 kernels) and
#               this GPU's tuned-config table (tuned/<device>.json: commit it to kernels/tuned/)
#   fp8         the same step with --fp8 tensorwise (against d20's bf16 number)
#   ab_*        the three kernels' A/B at the d20 shapes, peers included where installed; each row's error
#               against an fp32 reference is the native bf16 correctness check
#   fp8_rowwise if time is left
#   ab_variants_* if time is left: our selectable variants (kernels.dispatch.VARIANTS) beside auto's kernel, at
#               the same shapes, bf16 correctness included
# After every step check.json and check.md are rebuilt (bench.check, while the next step runs) and, with $OUT set,
# everything is copied to $OUT/results/<stamp>/. A step that runs out of time is marked so; what it wrote stays.
#
#   bash bench/gpu_check.sh           # on the GPU; RESULTS=DIR to choose the folder (default bench/results/<stamp>)
#   bash bench/gpu_check.sh --cpu     # the same pipeline at tiny shapes on the CPU (CI runs it)
# Without .git on the GPU machine, pass GIT_COMMIT=<what `python -m bench.timing --stamp` prints where .git is>: it is
# recorded only when its source hash is that of the tree the check runs on.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
dir=${RESULTS:-bench/results/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$dir"
t_start=$(date +%s)
deadline=$(( t_start + ${TOTAL:-450} ))
RESERVE=30  # for the last step's kill (15 s) and the closing check.json
source bench/steps.sh

checking=""  # the pid of the bench.check that rebuilds check.json beside the next step
check() {  # bench.check starts python and torch (seconds each time): it runs beside the next step, one at a time
    [ -n "$checking" ] && wait "$checking"
    { $PY -m bench.check "$dir" --mode "$MODE" > /dev/null || echo "bench.check failed"; } &
    checking=$!
}

if [ "$MODE" = gpu ]; then
    install_wheels
    D20=(--depth 20 --device-batch-size 32 --seq-len 2048 --warmup 2 --steps 8)
    AB_NS=(--shape d20-all)
    AB_CE=(--shape 65536x1280x32768)
    AB_ATTN=(--shape 32x2048x10x128:w1024 --shape 32x2048x10x128:full)
    DEVICE=(--device cuda)
    FP8=(--fp8)
else  # tiny shapes, torch paths, FP8 emulated by torchao
    D20=(--depth 2 --device-batch-size 2 --seq-len 64 --warmup 1 --steps 2)
    AB_NS=(--small); AB_CE=(--small); AB_ATTN=(--small)
    DEVICE=(--device cpu)
    FP8=(--fp8 --fp8-emulate)
fi

step env 30 $PY -m bench.timing --json "$dir/env.json"
check
step d20 "${TIME_D20:-210}" $PY -m bench.mfu "${D20[@]}" "${DEVICE[@]}" --compare nanochat \
    --profile "$dir/profile.json" --tuned-out "$dir/tuned" --json "$dir/d20.json"
check
step fp8 "${TIME_FP8:-80}" $PY -m bench.mfu "${D20[@]}" "${DEVICE[@]}" "${FP8[@]}" --fp8-recipe tensorwise \
    --json "$dir/fp8.json"
check
step ab_newton_schulz "${TIME_NS:-40}" $PY -m bench.ab newton_schulz "${AB_NS[@]}" "${DEVICE[@]}" --rep 50 \
    --variants skip --json "$dir/ab_newton_schulz.json"
check
step ab_cross_entropy "${TIME_CE:-40}" $PY -m bench.ab cross_entropy "${AB_CE[@]}" "${DEVICE[@]}" --rep 50 \
    --variants skip --json "$dir/ab_cross_entropy.json"
check
step ab_attention "${TIME_ATTN:-100}" $PY -m bench.ab attention "${AB_ATTN[@]}" "${DEVICE[@]}" --rep 50 \
    --variants skip --json "$dir/ab_attention.json"
check
step fp8_rowwise "${TIME_ROWWISE:-60}" $PY -m bench.mfu "${D20[@]}" "${DEVICE[@]}" "${FP8[@]}" --fp8-recipe rowwise \
    --json "$dir/fp8_rowwise.json"
check
step ab_variants_attention "${TIME_VARIANTS:-70}" $PY -m bench.ab attention "${AB_ATTN[@]}" "${DEVICE[@]}" \
    --rep 50 --variants only --json "$dir/ab_variants_attention.json"
check
step ab_variants_newton_schulz "${TIME_VARIANTS_NS:-30}" $PY -m bench.ab newton_schulz "${AB_NS[@]}" "${DEVICE[@]}" \
    --rep 50 --variants only --json "$dir/ab_variants_newton_schulz.json"
RESERVE=0
check
wait "$checking"
publish
cat "$dir/check.md"
echo "=== $(( $(date +%s) - t_start ))s in all; results in $dir"

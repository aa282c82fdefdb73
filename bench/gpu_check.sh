#!/usr/bin/env bash
# A lent GPU's call: what matters most first, every step under its own time limit and all of them under TOTAL
# (default 450 s, wheel install and compiles included), so one call of at most 8 minutes never loses what it measured.
#
#   bash bench/gpu_check.sh [--cpu] [check] [tests]
#
#   check  (the default part)
#     env         device, driver, torch, triton, commit
#     d20         d20 training step at device batch 32 x 2048: our kernels (auto) against the torch-only path of a
#                 nanochat user without FA3 (SDPA with window masks, torch CE and Newton-Schulz, compiled with the
#                 model), same seed and batches; then a profile of our step (time per category, top 15 kernels)
#                 and this GPU's tuned-config table (tuned/<device>.json: commit it to kernels/tuned/)
#     fp8         the same step with --fp8 tensorwise (against d20's bf16 number)
#     ab_*        the three kernels' A/B at the d20 shapes, peers included where installed; each row's error
#                 against an fp32 reference is the native bf16 correctness check
#     fp8_rowwise if time is left
#     After every step check.json and check.md are rebuilt (bench.check, while the next step runs).
#   tests  test files (TEST_FILES, default the kernels' first), one step each, natively: the cuda tests run
#   --cpu  the same pipeline at tiny shapes on the torch paths, on the CPU (the test suite runs it)
#
# Every step appends a line to steps.jsonl and writes <step>.log; a step that runs out of time is marked so and what
# it wrote stays. RESULTS=DIR chooses the folder (default bench/results/<UTC stamp>); with $OUT set, the folder is
# copied to $OUT/results/<its name>/ after every step. Peers carried as wheels in .whl/ (../shared/tools/device-wheels)
# are installed first. Without .git on the GPU machine, pass GIT_COMMIT=<what `python -m bench.timing --stamp`
# prints where .git is>: it is recorded only when its source hash is that of the tree the check runs on.
set -u
export PYTHONUNBUFFERED=1
PY=${PY:-${PYTHON:-python3}}

publish() {
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT/results/$(basename "$dir")" && cp -r "$dir"/. "$OUT/results/$(basename "$dir")/"
    fi
}

record() {  # record NAME STATUS SECONDS: one line of steps.jsonl and of summary.txt
    printf '{"step": "%s", "status": "%s", "seconds": %s, "log": "%s.log"}\n' "$1" "$2" "$3" "$1" >> "$dir/steps.jsonl"
    printf '%-18s %5ss  %s\n' "$1" "$3" "$2" | tee -a "$dir/summary.txt"
}

step() {  # step NAME LIMIT_S command...: run under min(LIMIT_S, time left), log, record the outcome, never abort
    local name=$1 limit=$2
    shift 2
    local left=$(( deadline - $(date +%s) - ${RESERVE:-0} ))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        record "$name" "not run (out of time)" 0
        return
    fi
    local t0=$(date +%s)
    echo "=== $name (limit ${limit}s): $*"
    # SIGINT first, so Python stops cleanly (its JSON is rewritten as it goes); SIGKILL 15 s later
    timeout --signal=INT --kill-after=15 "$limit" "$@" > "$dir/$name.log" 2>&1
    local rc=$?
    local outcome="ok"
    case $rc in
        0) ;;
        124|130|137) outcome="timed out (partial results kept)";;
        1) outcome="failed or wrong results (see $name.log)";;
        *) outcome="failed rc=$rc (see $name.log)";;
    esac
    record "$name" "$outcome" $(( $(date +%s) - t0 ))
    tail -n 25 "$dir/$name.log"
    publish
}

install_wheels() {  # the peers carried as wheels in .whl/, when there
    if ls .whl/*.whl > /dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl > "$dir/wheels.log" 2>&1 && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} \
            || echo "installing .whl/ failed (see wheels.log)"
    fi
}

checking=""  # the pid of the bench.check that rebuilds check.json beside the next step
check() {  # bench.check starts python and torch (seconds each time): it runs beside the next step, one at a time
    [ -n "$checking" ] && wait "$checking"
    { $PY -m bench.check "$dir" --mode "$MODE" > /dev/null || echo "bench.check failed"; } &
    checking=$!
}

part_check() {
    if [ "$MODE" = gpu ]; then
        D20=(--depth 20 --device-batch-size 32 --seq-len 2048 --warmup 2 --steps 8)
        AB_NS=(--shape d20-all); AB_CE=(--shape 65536x1280x32768)
        AB_ATTN=(--shape 32x2048x10x128:w1024 --shape 32x2048x10x128:full)
        DEVICE=(--device cuda); FP8=(--fp8)
    else  # tiny shapes, torch paths, FP8 emulated by torchao
        D20=(--depth 2 --device-batch-size 2 --seq-len 64 --warmup 1 --steps 2)
        AB_NS=(--small); AB_CE=(--small); AB_ATTN=(--small)
        DEVICE=(--device cpu); FP8=(--fp8 --fp8-emulate)
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
        --json "$dir/ab_newton_schulz.json"
    check
    step ab_cross_entropy "${TIME_CE:-40}" $PY -m bench.ab cross_entropy "${AB_CE[@]}" "${DEVICE[@]}" --rep 50 \
        --json "$dir/ab_cross_entropy.json"
    check
    step ab_attention "${TIME_ATTN:-100}" $PY -m bench.ab attention "${AB_ATTN[@]}" "${DEVICE[@]}" --rep 50 \
        --json "$dir/ab_attention.json"
    check
    step fp8_rowwise "${TIME_ROWWISE:-60}" $PY -m bench.mfu "${D20[@]}" "${DEVICE[@]}" "${FP8[@]}" \
        --fp8-recipe rowwise --json "$dir/fp8_rowwise.json"
    check
    wait "$checking"
}

part_tests() {  # TEST_FILES, default: the kernels first (what only a GPU can check), the end-to-end CLI tests last
    if [ "${MODE:-gpu}" = gpu ] && ! $PY -c "import torch; assert torch.cuda.is_available()" > /dev/null 2>&1; then
        record tests "failed: no CUDA device visible to torch (every cuda test would be skipped)" 0
        return
    fi
    for f in ${TEST_FILES:-tests/test_cross_entropy.py tests/test_newton_schulz.py tests/test_attention.py
             tests/test_model.py tests/test_optim.py tests/test_fp8.py tests/test_step.py tests/test_pretrain.py}; do
        local name
        name=$(basename "$f" .py)
        step "$name" "${TIME_TEST_FILE:-240}" $PY -m pytest -q -rs "$f" --junitxml="$dir/$name.xml"
        echo "$name: $(tail -n 1 "$dir/$name.log")" | tee -a "$dir/summary.txt"  # passed, skipped, failed
    done
}

[[ "${BASH_SOURCE[0]}" != "$0" ]] && return  # sourced (the tests of step): the functions only
cd "$(dirname "$0")/.."
MODE=gpu
PARTS=()
for arg in "$@"; do
    case $arg in
        --cpu) MODE=cpu;;
        check|tests) PARTS+=("$arg");;
        *) echo "bench/gpu_check.sh: unknown argument $arg (expected --cpu, check, tests)" >&2; exit 2;;
    esac
done
[ ${#PARTS[@]} -eq 0 ] && PARTS=(check)
dir=${RESULTS:-bench/results/$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$dir"
t_start=$(date +%s)
deadline=$(( t_start + ${TOTAL:-450} ))
RESERVE=30  # for the last step's kill (15 s) and the closing check.json
[ "$MODE" = gpu ] && install_wheels
for part in "${PARTS[@]}"; do
    "part_$part"
done
publish
[ -f "$dir/check.md" ] && cat "$dir/check.md"
echo "=== $(( $(date +%s) - t_start ))s in all; results in $dir"

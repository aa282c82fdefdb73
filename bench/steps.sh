# Sourced by bench/gpu_check.sh and bench/run_gpu.sh: steps under a deadline that never lose what they measured.
# Expects: $dir (the results folder), $deadline (epoch seconds), $RESERVE (seconds kept for the closing steps),
# $PY. Each step appends one JSON line to $dir/steps.jsonl and its output to $dir/<name>.log; when $OUT is set,
# the folder is copied to $OUT/results/<its name>/ after every step.

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

install_wheels() {  # the peers carried as wheels in .whl/ (../shared/tools/device-wheels), when there
    if ls .whl/*.whl > /dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl > "$dir/wheels.log" 2>&1 && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} \
            || echo "installing .whl/ failed (see wheels.log)"
    fi
}

#!/usr/bin/env bash
# The test suite on a lent GPU, one file at a time under its own time limit, so that one slow file (Triton
# autotuning compiles every config for each new dtype and shape) never hides the results of the others.
# On CUDA every kernel test runs natively (bf16 included) and the @pytest.mark.cuda ones are not skipped.
# Logs and JUnit XML land in bench/results/tests-<UTC stamp>/ (or RESULTS) and, when $OUT is set, in
# $OUT/<that folder's name>.tar.gz.
#
#   bash bench/run_gpu_tests.sh                          # every test file
#   FILES="tests/test_cross_entropy.py" bash bench/run_gpu_tests.sh
#   LIMIT=200 TOTAL=560 bash bench/run_gpu_tests.sh      # seconds per file, and in all
#   RESULTS=DIR bash bench/run_gpu_tests.sh              # logs there instead
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
dir=${RESULTS:-bench/results/tests-$(date -u +%Y%m%d-%H%M%S)}
stamp=$(basename "$dir")
mkdir -p "$dir"
deadline=$(( $(date +%s) + ${TOTAL:-560} ))
# the kernels first (what only a GPU can check), the slow end-to-end CLI tests last
FILES=${FILES:-"tests/test_cross_entropy.py tests/test_newton_schulz.py tests/test_model.py tests/test_attention.py
tests/test_optim.py tests/test_fp8.py tests/test_dataloader.py tests/test_activations.py tests/test_scaling.py
tests/test_checkpoint.py tests/test_bench.py tests/test_dataset.py tests/test_tokenizer.py tests/test_core_eval.py
tests/test_pretrain.py"}
for f in $FILES; do
    name=$(basename "$f" .py)
    left=$(( deadline - $(date +%s) ))
    limit=${LIMIT:-240}
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        echo "$name: NOT RUN (out of time)" | tee -a "$dir/summary.txt"
        continue
    fi
    timeout --signal=INT --kill-after=15 "$limit" $PY -m pytest -q -rs "$f" --junitxml="$dir/$name.xml" \
        > "$dir/$name.log" 2>&1
    rc=$?
    case $rc in 0) outcome=passed;; 124|130|137) outcome="TIMED OUT after ${limit}s";; *) outcome="FAILED rc=$rc";; esac
    echo "$name: $outcome | $(tail -n 1 "$dir/$name.log")" | tee -a "$dir/summary.txt"
    if [ -n "${OUT:-}" ]; then  # the device hands back few files: one archive, rewritten after every file
        mkdir -p "$OUT"
        tar czf "$OUT/$stamp.tar.gz" -C "$(dirname "$dir")" "$stamp" && cp "$dir/summary.txt" "$OUT/"
    fi
done
cat "$dir/summary.txt"

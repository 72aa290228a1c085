#!/usr/bin/env bash
# One device call on a lent GPU machine (no network; its torch and Triton are used as they are):
#   install the project, build the CUDA extension, run the test suite on CUDA, measure the two ceilings,
#   run the model and kernel benchmarks. Logs and JSON go to $OUT; a short table is printed last.
#
#   OUT=/tmp/out bash benchmarks/gpu_session.sh                 # everything
#   STAGES="install bench" VARIANTS=b0 bash benchmarks/gpu_session.sh
#
# Stages: install, test, ceilings, kernels, bench. Each stage's log is $OUT/<stage>.log; a failing stage is
# reported and the next ones still run (the exit status is that of the first failure).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/segformer-fast-out}"
STAGES="${STAGES:-install test ceilings kernels bench}"
VARIANTS="${VARIANTS:-b0 b2 b5}"
DTYPES="${DTYPES:-fp16}"
RESOLUTIONS="${RESOLUTIONS:-ade cityscapes}"
PYTHON="${PYTHON:-python}"
DATE="$(date +%F)"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

run_stage() {
    local name="$1"; shift
    echo "== $name: $*"
    local start=$SECONDS
    if "$@" >"$OUT/$name.log" 2>&1; then
        echo "   ok ($((SECONDS - start)) s)"
    else
        local rc=$?
        echo "   FAILED rc=$rc ($((SECONDS - start)) s); last lines:"
        tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
        [ "$status" -eq 0 ] && status=$rc
    fi
}

for stage in $STAGES; do
    case "$stage" in
        install)
            run_stage install "$PYTHON" -m pip install --no-build-isolation --no-deps -e . ;;
        test)
            run_stage test "$PYTHON" -m pytest tests -ra -q -p no:cacheprovider ;;
        ceilings)
            run_stage ceilings "$PYTHON" benchmarks/ceilings.py --out "$OUT/ceilings.json" ;;
        kernels)
            run_stage kernels "$PYTHON" benchmarks/bench_kernels.py --out "$OUT/kernels-$DATE.json" ;;
        bench)
            # shellcheck disable=SC2086
            run_stage bench "$PYTHON" benchmarks/bench_model.py --variants $VARIANTS --resolutions $RESOLUTIONS \
                --dtype $DTYPES --runners engine reference transformers compile \
                --out "$OUT/h200-$DATE.json" ;;
        *)
            echo "unknown stage $stage (stages: install test ceilings kernels bench)"; status=2 ;;
    esac
done

if [ -f "$OUT/h200-$DATE.json" ]; then
    "$PYTHON" benchmarks/make_table.py "$OUT/h200-$DATE.json" | tee "$OUT/table.md"
fi
grep -h -E "passed|failed" "$OUT/test.log" 2>/dev/null | tail -n 1
exit "$status"

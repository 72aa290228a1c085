#!/usr/bin/env bash
# The device check on a lent GPU machine (no network; its python, torch and Triton are used as they are), in
# stages that each fit one device call with room to spare. Logs and JSON go to $OUT; each stage ends with a
# short table or summary.
#
#   OUT=$OUT bash benchmarks/gpu_session.sh                          # stage 1 (the default)
#   OUT=$OUT STAGES="check build test" bash benchmarks/gpu_session.sh  # the same, named
#   OUT=$OUT STAGES=bench-ade bash benchmarks/gpu_session.sh
#
# Stages, in priority order, with estimates for one H200 (not measured yet: the first GPU run replaces them):
#   1. check      prerequisites (python, CUDA torch, triton, nvcc, ninja, pybind11, pytest, transformers):
#                 seconds; stops the session with the list of what is missing.
#      build      pip install -e (no deps) + the CUDA extension for sm_90: 2 .cu files, ~1-2 min of nvcc.
#      test       the CUDA correctness tests: tests/kernels (~60 Triton configurations x ~1-2 s compile each, the
#                 full stage-1 shapes), the engine for B0-B5 in fp32/fp16/bf16 (18 engines, each verified), CUDA
#                 graph replay and the graph-cache hazards, fp16 safety, the decoder ops, the memory model:
#                 ~4-6 min.
#   2. bench-ade          the model benchmark, fp16, B0/B2/B5 at 512x512 (150 classes), batch 1 and 16: engine,
#                         reference (eager), transformers (eager), torch.compile (default mode; one compile per
#                         shape, ~20-40 s each, 6 shapes): ~5-7 min.
#      bench-cityscapes   the same at 1024x2048 (19 classes), batch 1 and 8: ~5-7 min.
#      (torch.compile max-autotune is opt-in: RUNNERS="engine compile-max" STAGES=bench-ade ...)
#   3. kernels    the kernel benchmark (sr_attention, mixffn, layer_norm, linear vs eager and compile): ~3-5 min.
#      ceilings   copy bandwidth and a bf16 GEMM: < 1 min.
#
# A failing stage is reported with its log's last lines and the next stages still run (the exit status is that of
# the first failure); `check` failing stops the session.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/segformer-fast-out}"
STAGES="${STAGES:-check build test}"
VARIANTS="${VARIANTS:-b0 b2 b5}"
DTYPES="${DTYPES:-fp16}"
RUNNERS="${RUNNERS:-engine reference transformers compile}"
PYTHON="${PYTHON:-python3}"
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

check_prerequisites() {
    local missing=()
    command -v "$PYTHON" >/dev/null || missing+=("$PYTHON")
    command -v nvcc >/dev/null || missing+=("nvcc (the CUDA extension cannot be built)")
    for module in torch triton ninja pybind11 pytest transformers numpy PIL safetensors tqdm huggingface_hub; do
        "$PYTHON" -c "import $module" 2>/dev/null || missing+=("python module $module")
    done
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
        || missing+=("a CUDA build of torch that sees a GPU")
    "$PYTHON" -c "import hypothesis" 2>/dev/null || echo "   note: hypothesis missing: the property tests skip"
    "$PYTHON" - <<'EOF'
import torch, triton
print(f"   torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")
EOF
    if [ ${#missing[@]} -gt 0 ]; then
        printf '   missing: %s\n' "${missing[@]}"
        return 1
    fi
}

run_bench() {  # $1: stage name, $2: resolution, $3: batch sizes
    # shellcheck disable=SC2086
    run_stage "$1" "$PYTHON" benchmarks/bench_model.py --variants $VARIANTS --resolutions "$2" --batch $3 \
        --dtype $DTYPES --runners $RUNNERS --repeats 30 --max-seconds-per-row 5 --out "$OUT/h200-$1-$DATE.json"
    if [ -f "$OUT/h200-$1-$DATE.json" ]; then
        "$PYTHON" benchmarks/make_table.py "$OUT/h200-$1-$DATE.json" | tee "$OUT/table-$1.md"
    fi
}

for stage in $STAGES; do
    case "$stage" in
        check)
            echo "== check"
            if ! check_prerequisites; then
                echo "   prerequisites missing: nothing else runs"
                exit 3
            fi ;;
        build)
            run_stage build env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
                "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
            "$PYTHON" -c "from segformer_fast import ops; print('   extension kernels:', ops._kernel_devices())" ;;
        test)
            # run from tests/: `python -m pytest` from the repository root would put its kernels/ folder on
            # sys.path, where it shadows Hugging Face's kernels package that transformers imports
            run_stage test bash -c "cd tests && '$PYTHON' -m pytest -ra -q -p no:cacheprovider kernels test_engine.py \
                test_graph_cache.py test_ops.py test_fp16_safety.py test_inference.py test_decoder_fold.py"
            grep -h -E "passed|failed" "$OUT/test.log" | tail -n 1 ;;
        bench-ade)
            run_bench bench-ade ade "1 16" ;;
        bench-cityscapes)
            run_bench bench-cityscapes cityscapes "1 8" ;;
        kernels)
            run_stage kernels "$PYTHON" benchmarks/bench_kernels.py --out "$OUT/kernels-$DATE.json"
            tail -n 25 "$OUT/kernels.log" ;;
        ceilings)
            run_stage ceilings "$PYTHON" benchmarks/ceilings.py --out "$OUT/ceilings.json"
            tail -n 5 "$OUT/ceilings.log" ;;
        *)
            echo "unknown stage $stage (stages: check build test bench-ade bench-cityscapes kernels ceilings)"
            status=2 ;;
    esac
done
exit "$status"

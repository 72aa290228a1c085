#!/usr/bin/env bash
# The device check on a lent GPU machine (no network; its python, torch and Triton are used as they are). Every
# call lands on a bare machine, so every stage installs what it needs itself (seconds when it is already there).
# Logs and JSON go to $OUT; each stage ends with a short table or summary.
#
#   OUT=$OUT bash benchmarks/gpu_session.sh first               # the first call: at most 8 min on a cold machine
#   bash benchmarks/gpu_session.sh first --dry-run              # the plan with each step's estimate; runs nothing
#   OUT=$OUT bash benchmarks/gpu_session.sh bench-cityscapes    # a later, optional call
#   OUT=$OUT STAGES="check build test" bash benchmarks/gpu_session.sh   # stages from the environment
#
# Stages. Estimates are for one H200 and are not measured yet (the first GPU run replaces them):
#   first        one call, at most 8 minutes of wall time on a cold machine, in this order, each step capped by
#                `timeout` at its estimate, the later caps shortened when an earlier step overran (the caps add up to
#                at most FIRST_BUDGET_S = 480 s, asserted by tests/benchmarks/test_gpu_session.py on the dry run):
#                check (one Python process), build (sm_90 only; where torch's CUDA and nvcc disagree or the
#                extension fails to build, the Triton path alone with SEGFORMER_FAST_NO_CUDA=1 and one line
#                saying so), the trimmed CUDA tests (benchmarks/first_tests.txt: Triton kernels at the engine's
#                real shapes in fp16/bf16/fp32, the engine for B0 and B5 at 512² fp16 against the reference, the
#                graph cache, the CUDA ops), then the ADE bench for B0 and B5 (fp16, batch 1: engine, eager
#                reference, torch.compile default and reduce-overhead; each row saved as it finishes). At most 8
#                files under $OUT (the device returns no more): first.log, build.log, test.log, bench.log,
#                first-ade.json, first-table.md.
#   check        prerequisites in one Python process: seconds; stops the session with the list of what is missing.
#   build        pip install -e (no deps) + the CUDA extension for sm_90 (TORCH_CUDA_ARCH_LIST=9.0): ~1-2 min.
#   test         the full CUDA correctness suite (tests/kernels, engines B0-B5, graph cache, ops, fp16 safety):
#                ~6-9 min, over one call's budget on a cold machine; `first` runs the trimmed set instead.
#   bench-ade, bench-cityscapes   the model benchmark, fp16, $VARIANTS, batch 1 and 16 (8 at 1024x2048): ~5-7 min.
#   paper        the paper's protocol: IEEE fp32 (TF32 off), batch 1, through full-resolution labels on the host,
#                B0/B4 at 512², B5 at 640² (ADE) and B0/B4/B5 at 1024x2048 (Cityscapes): ~6-8 min.
#   kernels      the kernel benchmark (do_bench_cudagraph at every stage's shapes): ~3-5 min.
#   ceilings     copy bandwidth and a bf16 GEMM: < 1 min.
#
# A failing stage is reported with its log's last lines and the next stages still run (the exit status is that of
# the first failure); `check` failing stops the session.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/segformer-fast-out}"
VARIANTS="${VARIANTS:-b0 b2 b5}"
DTYPES="${DTYPES:-fp16}"
RUNNERS="${RUNNERS:-engine reference transformers compile compile-ro}"
PYTHON="${PYTHON:-python3}"
DATE="$(date +%F)"
export PYTHONUNBUFFERED=1
# the whole `first` stage and each of its steps' caps (seconds); the caps add up to at most FIRST_BUDGET_S
FIRST_BUDGET_S=480
CAP_CHECK=15
CAP_BUILD=150
CAP_TEST=140
CAP_BENCH=165
CAP_TABLE=5

DRY_RUN=0
ARG_STAGES=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
        *) ARG_STAGES+=("$arg") ;;
    esac
done
if [ ${#ARG_STAGES[@]} -gt 0 ]; then
    STAGES="${ARG_STAGES[*]}"
else
    STAGES="${STAGES:-first}"
fi
status=0

first_plan() {  # one line per step: name, cap in seconds, what it does (the dry run prints these)
    cat <<EOF
check $CAP_CHECK one Python process: torch (CUDA, a GPU), triton, nvcc vs torch's CUDA, ninja, pybind11, pytest
build $CAP_BUILD pip install -e --no-deps, extension for sm_90 only; Triton path alone (SEGFORMER_FAST_NO_CUDA=1) where it cannot build
test $CAP_TEST pytest $(grep -c -v -e '^#' -e '^$' benchmarks/first_tests.txt) node ids of benchmarks/first_tests.txt
bench $CAP_BENCH bench_model.py --variants b0 b5 --resolutions ade --batch 1 --dtype fp16 --runners engine reference compile compile-ro
table $CAP_TABLE make_table.py first-ade.json
EOF
}

say_first_plan() {
    local total=0
    echo "== first: plan (caps are estimates for one H200, not measured; build, test and bench are stopped at their"
    echo "   caps, and a step that overruns shortens the caps of test and bench so the total stays in the budget)"
    while read -r name cap what; do
        printf '   %-6s %4d s  %s\n' "$name" "$cap" "$what"
        total=$((total + cap))
    done < <(first_plan)
    printf '   total  %4d s  (budget %d s = %d min)\n' "$total" "$FIRST_BUDGET_S" "$((FIRST_BUDGET_S / 60))"
    echo "   files under \$OUT: first.log build.log test.log bench.log first-ade.json first-table.md"
}

run_stage() {  # name, cap in seconds (0: none), command...
    local name="$1" cap="$2"; shift 2
    echo "== $name: $*"
    local start=$SECONDS
    local rc=0
    if [ "$cap" -gt 0 ]; then
        timeout --signal=INT --kill-after=10 "$cap" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    else
        "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    fi
    if [ "$rc" -eq 0 ]; then
        echo "   ok ($((SECONDS - start)) s)"
    else
        [ "$rc" -eq 124 ] && echo "   stopped at its cap of $cap s"
        echo "   FAILED rc=$rc ($((SECONDS - start)) s); last lines:"
        tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
        [ "$status" -eq 0 ] && status=$rc
    fi
    return "$rc"
}

# The prerequisites in one Python process. Prints one line per finding; the last line is EXT=1 (build the CUDA
# extension) or EXT=0 (the Triton path alone, with the reason). Exits 1 when something required is missing.
check_prerequisites() {
    local nvcc_version=""
    if command -v nvcc >/dev/null; then
        nvcc_version="$(nvcc --version | sed -n 's/.*release \([0-9][0-9.]*\).*/\1/p')"
    fi
    NVCC_VERSION="$nvcc_version" "$PYTHON" - <<'EOF'
import importlib, os, shutil, sys
missing = []
for module in ("torch", "triton", "ninja", "pybind11", "pytest", "numpy", "PIL", "safetensors", "tqdm",
               "huggingface_hub", "transformers"):
    try:
        importlib.import_module(module)
    except Exception as err:
        missing.append(f"python module {module} ({type(err).__name__})")
import torch
if not torch.cuda.is_available():
    missing.append("a CUDA build of torch that sees a GPU")
try:
    import hypothesis  # noqa: F401
except ImportError:
    print("   note: hypothesis missing: the property tests skip")
triton_version = sys.modules["triton"].__version__ if "triton" in sys.modules else "missing"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"   python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton_version}, {gpu}")
nvcc = os.environ.get("NVCC_VERSION", "")
ext, reason = 1, ""
if not nvcc:
    ext, reason = 0, "no nvcc"
elif torch.version.cuda is None:
    ext, reason = 0, "torch has no CUDA"
elif nvcc.split(".")[0] != torch.version.cuda.split(".")[0]:
    ext, reason = 0, f"nvcc {nvcc} and torch's CUDA {torch.version.cuda} disagree"
else:
    print(f"   nvcc {nvcc} matches torch's CUDA {torch.version.cuda}")
if missing:
    print("   missing: " + "; ".join(missing))
print(f"EXT={ext} {reason}".rstrip())
sys.exit(1 if missing else 0)
EOF
}

installed() {  # the package importable with its kernels (and, when $1 is "ext", the extension's CUDA kernels)
    if [ "${1:-}" = "ext" ]; then
        "$PYTHON" -c "import segformer_fast.kernels.sr_attention; from segformer_fast.ops import extension as ops; assert 'cuda' in ops._kernel_devices()" 2>/dev/null
    else
        "$PYTHON" -c "import segformer_fast.kernels.sr_attention" 2>/dev/null
    fi
}

# Install the package (editable, no dependencies: nothing to download). $1: the cap for the CUDA build in seconds
# (0: none); $2: EXT=1 to build the CUDA extension. A failed or refused CUDA build falls back to the C++ part only.
install_package() {
    local cap="$1" want_ext="$2" reason="${3:-}"  # $4: the cap of the fallback install (seconds)
    if installed "$([ "$want_ext" = 1 ] && echo ext)"; then
        echo "   package already installed"
        return 0
    fi
    if [ "$want_ext" = 1 ]; then
        if run_stage build "$cap" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" \
                "$PYTHON" -m pip install --no-build-isolation --no-deps -e .; then
            return 0
        fi
        reason="the CUDA extension did not build (build.log)"
    fi
    echo "   the CUDA extension is not built ($reason): SEGFORMER_FAST_NO_CUDA=1, the Triton path alone runs" \
         "(decoder ops on their C++/eager fallbacks)"
    SEGFORMER_FAST_NO_CUDA=1 MAX_JOBS="$(nproc)" timeout "${4:-600}" \
        "$PYTHON" -m pip install --no-build-isolation --no-deps -e . >>"$OUT/build.log" 2>&1
}

EXT=1
EXT_REASON=""
do_check() {
    echo "== check"
    local report
    report="$(check_prerequisites)"
    local rc=$?
    echo "$report" | grep -v '^EXT='
    local ext_line
    ext_line="$(echo "$report" | grep '^EXT=' | tail -n 1)"
    EXT="${ext_line#EXT=}"; EXT="${EXT%% *}"; EXT="${EXT:-0}"
    EXT_REASON="${ext_line#EXT=? }"
    if [ "$rc" -ne 0 ]; then
        echo "   prerequisites missing: nothing else runs"
        exit 3
    fi
}

ensure_installed() {  # every stage after check: install what is missing (seconds when installed)
    if ! installed; then
        [ -z "${CHECKED:-}" ] && do_check && CHECKED=1
        install_package 0 "$EXT" "$EXT_REASON"
    fi
}

run_bench() {  # $1: stage name, $2: cap, then bench_model.py arguments; writes $OUT/$1.json and $OUT/$1-table.md
    local name="$1" cap="$2"; shift 2
    run_stage "$name" "$cap" "$PYTHON" benchmarks/bench_model.py "$@" --out "$OUT/$name.json"
    if [ -f "$OUT/$name.json" ]; then
        "$PYTHON" benchmarks/make_table.py "$OUT/$name.json" | tee "$OUT/$name-table.md"
    fi
}

FIRST_START=$SECONDS
left() {  # the cap of a step: its own cap ($1), or less where a slow earlier step left less (keeping $2 s for later)
    local remaining=$((FIRST_BUDGET_S - (SECONDS - FIRST_START) - $2))
    [ "$remaining" -lt "$1" ] && echo $((remaining > 1 ? remaining : 1)) || echo "$1"
}

first_stage() {
    say_first_plan
    FIRST_START=$SECONDS
    local start=$SECONDS
    do_check
    CHECKED=1
    [ $((SECONDS - start)) -gt "$CAP_CHECK" ] && echo "   check took over its estimate of $CAP_CHECK s"
    install_package "$CAP_BUILD" "$EXT" "$EXT_REASON" "$(left 90 $((CAP_BENCH + CAP_TABLE + 60)))"
    "$PYTHON" -c "from segformer_fast.ops import extension as ops; print('   extension kernels:', ops._kernel_devices())" \
        || echo "   the package does not import (build.log)"
    local tests=()
    while read -r node; do  # node ids relative to tests/ (brackets and all, passed as they are)
        tests+=("${node#tests/}")
    done < <(grep -v -e '^#' -e '^$' benchmarks/first_tests.txt)
    # run from tests/: `python -m pytest` from the repository root would put its kernels/ folder on sys.path,
    # where it shadows Hugging Face's kernels package that transformers imports
    run_stage test "$(left "$CAP_TEST" $((CAP_BENCH + CAP_TABLE)))" \
        bash -c 'cd tests && exec "$0" -m pytest -ra -q -p no:cacheprovider "$@"' "$PYTHON" "${tests[@]}"
    grep -h -E "passed|failed|error" "$OUT/test.log" | tail -n 1
    run_stage bench "$(left "$CAP_BENCH" "$CAP_TABLE")" "$PYTHON" benchmarks/bench_model.py --variants b0 b5 \
        --resolutions ade --batch 1 --dtype fp16 --runners engine reference compile compile-ro --repeats 30 --max-seconds-per-row 5 \
        --out "$OUT/first-ade.json"
    if [ -f "$OUT/first-ade.json" ]; then
        timeout "$CAP_TABLE" "$PYTHON" benchmarks/make_table.py "$OUT/first-ade.json" | tee "$OUT/first-table.md"
    fi
    echo "== first: $((SECONDS - start)) s of the $FIRST_BUDGET_S s budget"
    return "$status"
}

if [ "$DRY_RUN" = 1 ]; then  # the plan only: nothing runs, nothing is written
    for stage in $STAGES; do
        case "$stage" in
            first) say_first_plan ;;
            *) echo "== $stage (see the header for its estimate)" ;;
        esac
    done
    exit 0
fi
mkdir -p "$OUT"
for stage in $STAGES; do
    case "$stage" in
        first)
            first_stage 2>&1 | tee "$OUT/first.log"
            [ "${PIPESTATUS[0]}" -ne 0 ] && [ "$status" -eq 0 ] && status=1 ;;
        check)
            do_check; CHECKED=1 ;;
        build)
            [ -z "${CHECKED:-}" ] && do_check && CHECKED=1
            install_package 0 "$EXT" "$EXT_REASON"
            "$PYTHON" -c "from segformer_fast.ops import extension as ops; print('   extension kernels:', ops._kernel_devices())" ;;
        test)
            ensure_installed
            run_stage test 0 bash -c "cd tests && '$PYTHON' -m pytest -ra -q -p no:cacheprovider kernels engine/test_engine.py \
                engine/test_graph_cache.py ops/test_decode_ops.py engine/test_fp16_safety.py inference/test_slide.py \
                inference/test_segment.py inference/test_memory.py prepared/test_decoder_fold.py"
            grep -h -E "passed|failed" "$OUT/test.log" | tail -n 1 ;;
        bench-ade)
            ensure_installed
            # shellcheck disable=SC2086
            run_bench "bench-ade" 0 --variants $VARIANTS --resolutions ade --batch 1 16 --dtype $DTYPES \
                --runners $RUNNERS --repeats 30 --max-seconds-per-row 5 ;;
        bench-cityscapes)
            ensure_installed
            # shellcheck disable=SC2086
            run_bench "bench-cityscapes" 0 --variants $VARIANTS --resolutions cityscapes --batch 1 8 --dtype $DTYPES \
                --runners $RUNNERS --repeats 30 --max-seconds-per-row 5 ;;
        paper)
            ensure_installed
            run_bench "paper" 0 --paper --runners engine reference transformers compile compile-ro \
                --repeats 20 --max-seconds-per-row 5 ;;
        kernels)
            ensure_installed
            run_stage kernels 0 "$PYTHON" benchmarks/bench_kernels.py --out "$OUT/kernels-$DATE.json"
            tail -n 25 "$OUT/kernels.log" ;;
        ceilings)
            ensure_installed
            run_stage ceilings 0 "$PYTHON" benchmarks/ceilings.py --out "$OUT/ceilings.json"
            tail -n 5 "$OUT/ceilings.log" ;;
        *)
            echo "unknown stage $stage (stages: first check build test bench-ade bench-cityscapes paper kernels ceilings)"
            status=2 ;;
    esac
done
exit "$status"

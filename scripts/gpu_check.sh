#!/usr/bin/env bash
# The GPU checks of issue 25 on a machine with an NVIDIA GPU and the GPU stack but without this project's pins:
# `pytest -m gpu tests/gpu`, then the benchmarks with `--device cuda` (their `gpu_` figures). Within 8 minutes on
# one H200 (each stage has its own time limit; a stage that fails or runs out is reported and the next one runs).
#
#   scripts/gpu_check.sh [--wheels DIR] [--skip-tests] [--skip-bench] [--compile] [--full]
#
# torch.compile (model.compile / fit.compile / train.compile) is checked only with --compile or --full: its
# warm-up alone is minutes at SD 1.5 size, beyond the 8 minutes. With it, the budget grows by COMPILE_BUDGET_S
# (default 750 s): the compile tests of tests/gpu (marked slow), then bench_pipeline and bench_fit_loop --compile.
#
# What it must find there (platform-facts.md, "An NVIDIA H200 GPU machine"): Python with torch (CUDA build),
# transformers 5 + huggingface_hub < 2, tokenizers, accelerate, safetensors, numpy, scikit-image, pandas, pyarrow,
# opencv, tqdm, typer, PyYAML.
# What it installs: the wheels of scripts/gpu_wheels.sh (diffusers, pydantic + pydantic_core, annotated-types,
# typing-inspection, typing_extensions, importlib_metadata, zipp, pytest, pluggy, iniconfig, Pygments, packaging),
# with `pip install --no-index --no-deps --target` into a private folder that goes first on PYTHONPATH: nothing
# the machine has is upgraded or replaced for other programs. The project itself is not pip-installed: it runs
# from this checkout (PYTHONPATH), as `pip install --no-deps -e .` would give (its metadata pins Python 3.11 and
# torch's CPU build, neither of which is what a GPU image has).
# What it may skip: mlflow, DVC, mediapipe, dlib, insightface, Prefect, Great Expectations, Streamlit, boto3 and
# SQLAlchemy: nothing on the model path, in tests/gpu or in these benchmarks imports them (tracking is off).
# Outputs: the log of each stage under $OUT (when set, e.g. by a remote runner) or outputs/gpu_check/.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${MAGICID_WHEELS:-shared/wheels}
RUN_TESTS=1
RUN_BENCH=1
QUICK=--quick
RUN_COMPILE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS=$2; shift 2 ;;
        --skip-tests) RUN_TESTS=0; shift ;;
        --skip-bench) RUN_BENCH=0; shift ;;
        --compile) RUN_COMPILE=1; shift ;;
        --full) QUICK=; RUN_COMPILE=1; shift ;;  # the benchmarks' full repetitions and compile (longer than 8 minutes)
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
PY=${PY:-python3}
LOGS=${OUT:-outputs/gpu_check}
DEPS=${GPU_DEPS_DIR:-/tmp/magicid-gpu-deps}
mkdir -p "$LOGS"
started=$(date +%s)

"$PY" - <<'PY' || exit 2
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device: run this on a GPU machine")
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
PY

# Install what is missing (only what is missing: an import that works is left alone).
missing=$("$PY" - <<'PY'
import importlib.util
needed = {"diffusers": "diffusers", "pydantic": "pydantic", "pytest": "pytest"}
print(" ".join(name for name, module in needed.items() if importlib.util.find_spec(module) is None))
PY
)
if [ -n "$missing" ]; then
    ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "missing $missing and no wheels in $WHEELS: run scripts/gpu_wheels.sh where an index is reachable, then copy $WHEELS here" >&2; exit 2; }
    echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $DEPS (missing here: $missing)"
    "$PY" -m pip install --quiet --no-index --no-deps --target "$DEPS" "$WHEELS"/*.whl || exit 2
fi
export PYTHONPATH="$DEPS:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false
"$PY" -c "import magicid, diffusers, pydantic, pytest; print('magicid from', magicid.__file__, '| diffusers', diffusers.__version__, '| pydantic', pydantic.__version__)" || exit 2

status=0
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}  # the whole run, install included, stays under 8 minutes
[ "$RUN_COMPILE" = 0 ] || BUDGET_S=$(( BUDGET_S + ${COMPILE_BUDGET_S:-750} ))
stage() {  # stage NAME LIMIT_S COMMAND...: run with a time limit, log to $LOGS/NAME.log, keep going on failure
    local name=$1 limit=$2; shift 2
    local t0=$(date +%s)
    local left=$(( BUDGET_S - (t0 - started) ))
    if [ "$left" -lt 20 ]; then
        echo "== $name: skipped (${left}s left of the ${BUDGET_S}s budget)"; status=1; return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log" | grep -E "^(gpu_|[0-9]+ (passed|failed)|FAILED|ERROR|SKIPPED)|passed|failed|Error" 
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $(( $(date +%s) - t0 ))s (total $(( $(date +%s) - started ))s)"
    [ "$rc" = 0 ] || status=1
}

if [ "$RUN_TESTS" = 1 ]; then
    stage tests_gpu 150 "$PY" -m pytest -q -m "gpu and not slow" tests/gpu -p no:cacheprovider -s
fi
if [ "$RUN_BENCH" = 1 ]; then
    cd benchmarks
    stage bench_attention 45 "$PY" bench_attention.py --device cuda $QUICK
    stage bench_backbone 25 "$PY" bench_backbone.py --device cuda $QUICK
    stage bench_pipeline 75 "$PY" bench_pipeline.py --device cuda $QUICK
    stage bench_diir 75 "$PY" bench_diir.py --device cuda $QUICK
    stage bench_train 75 "$PY" bench_train.py --device cuda $QUICK
    stage bench_fit_loop 40 "$PY" bench_fit_loop.py --device cuda $QUICK
    cd ..
fi
if [ "$RUN_COMPILE" = 1 ]; then
    [ "$RUN_TESTS" = 0 ] || stage tests_gpu_compile 240 "$PY" -m pytest -q -m "gpu and slow" tests/gpu -p no:cacheprovider -s
    if [ "$RUN_BENCH" = 1 ]; then
        cd benchmarks
        stage bench_fit_loop_compile 200 "$PY" bench_fit_loop.py --device cuda $QUICK --compile unet unet_cudagraphs
        stage bench_pipeline_compile 300 "$PY" bench_pipeline.py --device cuda $QUICK --compile unet
        cd ..
    fi
fi
echo "gpu_check: $( [ $status = 0 ] && echo all stages passed || echo some stages failed ) in $(( $(date +%s) - started ))s; logs in $LOGS"
exit $status

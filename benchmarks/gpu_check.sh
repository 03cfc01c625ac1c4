#!/usr/bin/env bash
# One-shot GPU check: everything a lent GPU should confirm, in one run, into one JSON and one markdown table.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # default OUT_DIR=gpu_check; from any folder
#
# On a CUDA machine (about 8 minutes on one H100/H200):
#   1. the GPU tests              pytest -m gpu
#   2. the kernel benchmark       every op forward + backward in bf16: Triton, Triton under torch.compile, eager
#                                 twin, compiled twin, liger-kernel when importable (time, GB/s, % of peak), and
#                                 the fused linear cross-entropy's memory against the naive loss at vocab 128256
#   3. the pretrain benchmark     Llama-3.2-1B shapes: tokens/s, MFU, peak memory; Triton vs twins vs --compile
# Without a GPU the same steps run end to end at small shapes (the kernels through the Triton interpreter), which
# is how tests/test_gpu_check.py keeps this script working. Missing Python packages are installed when pip can
# reach an index; nothing already installed (torch, triton) is replaced.
#
# GPU_CHECK_KERNELS (space-separated benchmarks.kernels names) and GPU_CHECK_STEPS shorten a run.
set -uo pipefail

OUT=${1:-gpu_check}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute: the steps below run in the repository root
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
PY=${PYTHON:-python}
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# Only what is missing: the device may carry an older torch/triton than the CPU machines, and that is the point.
"$PY" - <<'PYEOF' >"$OUT/packages.log" 2>&1 || echo "warning: some packages are missing, see $OUT/packages.log"
import importlib.util, subprocess, sys
need = {"pytest": "pytest", "lightning": "lightning", "litdata": "litdata", "tokenizers": "tokenizers",
        "safetensors": "safetensors", "yaml": "pyyaml", "jsonargparse": "jsonargparse[signatures]"}
missing = [pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None]
print("missing:", missing or "none")
if missing and subprocess.call([sys.executable, "-m", "pip", "install", "-q", *missing]):
    sys.exit(1)
PYEOF

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    MODE=gpu
    KERNELS=${GPU_CHECK_KERNELS:-}
    STEPS=${GPU_CHECK_STEPS:-20}
    PRETRAIN=(--model_name Llama-3.2-1B --seq 2048 --micro_batch 4 --steps "$STEPS" --log_interval 5
              --backends auto,torch,auto+compile --precision bf16-true)
    BENCH=()
    TESTS=(tests)
else
    MODE=cpu
    export TRITON_INTERPRET=1
    KERNELS=${GPU_CHECK_KERNELS:-rms_norm}
    STEPS=${GPU_CHECK_STEPS:-3}
    # On a CPU "auto" runs the twins, so one pretrain row says all; the kernel table is the interpreter's.
    PRETRAIN=(--model_name debug-llama --seq 64 --micro_batch 2 --steps "$STEPS" --log_interval 1 --backends auto)
    BENCH=(--interpreter --tiny-only --reps 2 --skip-memory)
    TESTS=(tests/test_kernels_glu.py)
fi
echo "gpu_check: mode=$MODE out=$OUT"
STATUS=0

echo "== 1/3 pytest -m gpu"
"$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" "${TESTS[@]}" >"$OUT/pytest_gpu.log" 2>&1
PYTEST_RC=$?
# 5: nothing selected/ran (no GPU: every gpu test skips, which is not a failure here)
if [ "$PYTEST_RC" -ne 0 ] && [ "$PYTEST_RC" -ne 5 ]; then STATUS=1; fi
tail -1 "$OUT/pytest_gpu.log"

echo "== 2/3 kernel benchmark"
# shellcheck disable=SC2086
"$PY" -m benchmarks.kernels ${KERNELS:+--kernels $KERNELS} "${BENCH[@]}" --out "$OUT/bench_kernels.json" \
    >"$OUT/bench_kernels.log" 2>&1 || STATUS=1
tail -3 "$OUT/bench_kernels.log"

echo "== 3/3 pretrain benchmark"
"$PY" -m benchmarks.pretrain "${PRETRAIN[@]}" --out "$OUT/bench_pretrain.json" >"$OUT/bench_pretrain.log" 2>&1 \
    || STATUS=1
tail -4 "$OUT/bench_pretrain.log"

"$PY" -m benchmarks.gpu_check_summary "$OUT" --mode "$MODE" --pytest-rc "$PYTEST_RC" || STATUS=1
exit $STATUS

#!/usr/bin/env bash
# The device check: one prepared run on a lent GPU machine (Python 3.12 and torch there, no
# network), under 8 minutes: every step has its own `timeout` (470 s together), so nothing hangs:
#   1. install .whl/*.whl (benchmarks/device_wheels.sh builds them here) into a scratch
#      site-packages, on PYTHONPATH;
#   2. report the environment (versions, the GPU) and stop if an import fails;
#   3. the gpu-marked tests (pytest -m gpu, the test files that have any);
#   4. the suite (python -m benchmarks --device cuda) on mobile_sam, vit_b and vit_h, one process
#      each; vit_b / vit_h have random weights, MobileSAM its real ones when given.
# The log and one JSON per model go to $OUT (a folder; a temporary one when unset).
#
#     bash benchmarks/device_check.sh [--checkpoint mobile_sam.pt] [--smoke]
#
# The checkpoint is --checkpoint, else $SUM_MOBILE_SAM_CHECKPOINT, else .whl/mobile_sam.pt.
# --smoke: a dry run on this CPU (device cpu, the tiny random model, gpu tests skipped by their
# own marks); tests/test_benchmarks.py runs it. $PYTHON picks the interpreter (default python3).
# Exit code: 0 when every step passed, 1 when one failed or timed out, 2 when the environment
# is unusable.
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
CHECKPOINT=${SUM_MOBILE_SAM_CHECKPOINT:-}
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --checkpoint) CHECKPOINT=${2:?--checkpoint needs a path}; shift ;;
        *) echo "device_check.sh: unknown argument $1 (expected --smoke, --checkpoint PATH)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$CHECKPOINT" ] && [ -f .whl/mobile_sam.pt ]; then CHECKPOINT=.whl/mobile_sam.pt; fi
if [ -n "$CHECKPOINT" ]; then
    [ -f "$CHECKPOINT" ] || { echo "device_check.sh: checkpoint $CHECKPOINT: no such file" >&2; exit 2; }
    export SUM_MOBILE_SAM_CHECKPOINT=$(realpath "$CHECKPOINT")
fi

OUT=${OUT:-$(mktemp -d -t sum-device-check-XXXX)}
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
SUMMARY="$OUT/summary.txt"
: > "$LOG"
: > "$SUMMARY"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
FAILED=0

say() { echo "$*" | tee -a "$LOG"; }

# step NAME SECONDS CMD...: run CMD under `timeout`, its output to the log and the terminal; a
# smoke run on a shared CPU gets 4 times the limits (importing torch alone can take 30 s there)
step() {
    local name=$1 limit=$(( $2 * (SMOKE ? 4 : 1) )) t0 rc
    shift 2
    say "=== $name (limit ${limit}s): $*"
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local msg="$name: rc $rc in $(( $(date +%s) - t0 ))s"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && msg="$msg (timed out)"
    say "=== $msg"
    echo "$msg" >> "$SUMMARY"
    [ "$rc" -eq 0 ] || FAILED=1
    return "$rc"
}

say "device_check: smoke=$SMOKE out=$OUT python=$PY checkpoint=${SUM_MOBILE_SAM_CHECKPOINT:-none} $(date -u +%FT%TZ)"
if [ "$SMOKE" -eq 1 ]; then
    # the wheels are Python 3.12's (pycocotools is compiled for it): not for this interpreter
    say "smoke run: no wheels installed, $PY's own packages"
elif ls .whl/*.whl > /dev/null 2>&1; then
    SITE=$(mktemp -d -t sum-site-XXXX)
    # sum's wheel says Python <3.12 (the locked environment); the GPU machine has 3.12
    step install 45 "$PY" -m pip install -q --no-index --no-deps --no-compile --ignore-requires-python \
        --disable-pip-version-check --target "$SITE" .whl/*.whl || { say "wheels did not install"; exit 2; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    say "no .whl/*.whl: run benchmarks/device_wheels.sh on the CPU machine first and carry .whl"
    exit 2
fi

step environment 45 "$PY" - <<'EOF' || { say "environment unusable"; exit 2; }
import importlib, os
import torch
for name in ("segment_anything", "mobile_sam", "hydra", "omegaconf", "pycocotools", "cv2", "timm", "sum"):
    m = importlib.import_module(name)
    print(name, getattr(m, "__version__", ""), os.path.dirname(m.__file__))
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), round(torch.cuda.get_device_properties(0).total_memory / 2**30), "GiB")
print("cpus", os.cpu_count(), "load", os.getloadavg())
EOF
command -v nvidia-smi > /dev/null && step nvidia-smi 10 nvidia-smi

GPU_TESTS=$(grep -l "mark.gpu" tests/test_*.py | tr '\n' ' ')
# shellcheck disable=SC2086
step gpu-tests 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" $GPU_TESTS

if [ "$SMOKE" -eq 1 ]; then
    step suite-tiny 60 "$PY" -m benchmarks --smoke --device cpu --model tiny --out "$OUT/suite-tiny.json"
else
    step suite-mobile_sam 70 "$PY" -m benchmarks --device cuda --model mobile_sam --out "$OUT/suite-mobile_sam.json"
    step suite-vit_b 75 "$PY" -m benchmarks --device cuda --model vit_b --out "$OUT/suite-vit_b.json"
    step suite-vit_h 135 "$PY" -m benchmarks --device cuda --model vit_h --out "$OUT/suite-vit_h.json"
fi

say "=== summary"
cat "$SUMMARY" | tee -a "$LOG"
{
    echo "| benchmark | model | reference | time | ours | time | ratio | unit | check |"
    echo "|---|---|---|---:|---|---:|---:|---|---|"
    grep -h "^| " "$LOG" | grep -v "^| benchmark"
    grep -h "^encoder .*TFLOP" "$LOG"
} | tee "$OUT/tables.md"
exit "$FAILED"

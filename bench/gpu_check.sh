#!/usr/bin/env bash
# One run on a GPU machine (H100/H200; torch 2.11, triton 3.6; no internet, no `datasets`):
#   1. the test suite with the CUDA tests on      (LEGO_TEST_CUDA=1, not the slow ones; both
#                                                  schedules, and the determinism test with
#                                                  CUBLAS_WORKSPACE_CONFIG=:4096:8)
#   2. the pytest-benchmark suite                 (bench/test_*.py; compared with the stored
#                                                  baseline of this card when there is one)
#   3. python -m bench.compare                    (lego_kernels, by default and with each schedule
#                                                  forced, vs eager, torch.compile, Liger, CCE)
# Each step has a time limit (TESTS_LIMIT=150, BENCH_LIMIT=140, COMPARE_LIMIT=280 seconds), so
# the whole run stays under about 10 minutes; a step that fails or runs out of time does not stop
# the next one (compare rewrites its outputs after each case, so a cut-off run keeps what it
# measured). Run from anywhere:
#
#   OUT=/some/dir bash bench/gpu_check.sh     # OUT defaults to bench/results/run-<date>
#
# It writes five files under $OUT: gpu_check.log (everything printed), benchmark.json
# (pytest-benchmark), compare.json, compare.md and compare.png. bench/results/README.md says
# how to store them as the next baseline.
#
# Liger-Kernel and Cut Cross-Entropy are optional peers: where they are not installed, carry
# them as wheels in .whl/ (pure-Python wheels; from a machine with the internet):
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl \
#       liger-kernel==0.8.5 cut-cross-entropy==25.1.1
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

PY="${PYTHON:-python3}"
TESTS_LIMIT="${TESTS_LIMIT:-150}"
BENCH_LIMIT="${BENCH_LIMIT:-140}"
COMPARE_LIMIT="${COMPARE_LIMIT:-280}"
OUT="${OUT:-bench/results/run-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/lego-bench-site .whl/*.whl &&
    export PYTHONPATH="/tmp/lego-bench-site${PYTHONPATH:+:$PYTHONPATH}"
fi

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU visible to $PY; this script is for a GPU machine" >&2
  exit 1
fi

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
"$PY" -c "from bench.common import machine_info; print(machine_info('cuda'))"

declare -A STATUS

echo "== 1. tests with CUDA (limit ${TESTS_LIMIT} s)"
LEGO_TEST_CUDA=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 timeout -k 10 "$TESTS_LIMIT" "$PY" -m pytest tests -q \
  -m "not slow" -p no:cacheprovider \
  --durations=5
STATUS[tests]=$?

echo "== 2. pytest-benchmark suite (limit ${BENCH_LIMIT} s)"
CARD="$("$PY" -c "from bench.compare import card_slug; print(card_slug('cuda'))")"
MACHINE_ID="$("$PY" -c "from pytest_benchmark.utils import get_machine_id; print(get_machine_id())")"
echo "card folder: $CARD, machine id: $MACHINE_ID"
BASELINE=()
if compgen -G "bench/results/$CARD/$MACHINE_ID/*.json" >/dev/null; then
  BASELINE=(--benchmark-storage="file://$PWD/bench/results/$CARD" --benchmark-compare
    --benchmark-compare-fail=median:15%)
  echo "comparing with the latest of bench/results/$CARD/$MACHINE_ID/"
else
  echo "no stored baseline in bench/results/$CARD/$MACHINE_ID/: nothing to compare with"
fi
timeout -k 10 "$BENCH_LIMIT" "$PY" -m pytest bench -p no:cacheprovider --benchmark-json="$OUT/benchmark.json" \
  --benchmark-columns=min,median,iqr,rounds,iterations --benchmark-sort=name "${BASELINE[@]}"
STATUS[benchmarks]=$?

echo "== 3. python -m bench.compare (limit ${COMPARE_LIMIT} s)"
timeout -k 10 "$COMPARE_LIMIT" "$PY" -m bench.compare --device cuda --shapes seed,gpt2,llama3,seed:fp32 \
  --ops confidence,cross_entropy,routing --out "$OUT"
STATUS[compare]=$?

echo "== summary"
if [ -s "$OUT/benchmark.json" ]; then
  "$PY" - "$OUT/benchmark.json" <<'EOF'
import json, sys

for bench in json.load(open(sys.argv[1]))["benchmarks"]:
    info = bench["extra_info"]
    if "host_sync" in info:
        sync = info["host_sync"] or "none"
        print(f"3. {bench['name']}: host synchronization in capacity mode: {sync}")
    if "saving_ratio" in info:
        print(
            f"4. early_exit: {info['exit_ratio']:.0%} exited, wall-clock saving "
            f"{info['wall_saving']:.1%} vs analytic FLOPs saving {info['flops_saving']:.1%}: "
            f"ratio {info['saving_ratio']:.2f} (target >= 0.8)"
        )
EOF
fi
[ -f "$OUT/compare.md" ] && cat "$OUT/compare.md"
for step in tests benchmarks compare; do
  echo "$step: exit status ${STATUS[$step]}"
done
ls -l "$OUT"

#!/usr/bin/env bash
# On the GPU machine (see ../shared/GPU.md): build with that machine's torch, run every test (CUDA tests
# included) and every benchmark, then print a summary table. Logs go to $OUT when it is set.
# Usage: [BENCHES="benchmarks/bench_moe.py ..."] [BENCH_TIMEOUT=300] bash benchmarks/gpu_check.sh [pytest-args...]
# (BENCHES="" skips the benchmarks; SKIP_TESTS=1 skips pytest; PYTEST_TARGETS picks test files.)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ringkern-gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
start=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start ))s"
python3 -m ringkern info | tee "$OUT/info.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee -a "$OUT/info.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$OUT/info.txt"

status=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest ${PYTEST_TARGETS:-python_tests} -q -ra "$@" 2>&1 | tee "$OUT/pytest.txt" | grep -vE "^SKIPPED" | tail -25
  status=${PIPESTATUS[0]}
fi
for bench in ${BENCHES-benchmarks/bench_*.py}; do
  echo "== $bench"
  timeout "${BENCH_TIMEOUT:-300}" python3 "$bench" 2>&1 | tee "$OUT/$(basename "$bench" .py).txt" | tail -30
done
[ -f "$OUT/pytest.txt" ] && { echo "== summary"; grep -hE "passed|failed" "$OUT/pytest.txt" | tail -1; }
exit "$status"

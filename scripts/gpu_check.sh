#!/usr/bin/env bash
# The first GPU run, prepared (issue 25): one command, nothing to fetch, every step under
# its own time limit (a hang in one still returns the rest), the report in OUT_DIR:
#   gpu_check.md (summary), gpu_check.json (steps), gpu_bench.json, gpu_check.png,
#   steps.log (every step's output), selftest/ (selftest.md, .json, .png).
# Without a GPU it checks its own plumbing (install, imports, info, the quick CPU
# selftest and the benchmark script on tiny CPU shapes), says so, and exits 0.
#
#   scripts/gpu_check.sh OUT_DIR          # about 6-8 minutes on an H200
set -u
out="${1:-gpu-report}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
log="$out/steps.log"
: >"$log"
steps_json="$out/gpu_check.json"
echo "[" >"$steps_json"
first=1
failed=0
bench_md="$(mktemp)"
trap 'rm -f "$bench_md"' EXIT

step() {  # step NAME SECONDS COMMAND...: run under a limit, log, record the outcome
  local name="$1" limit="$2"
  shift 2
  local start end status
  start=$(date +%s)
  echo "==== $name (limit ${limit}s): $*" >>"$log"
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1
  status=$?
  end=$(date +%s)
  local verdict=pass
  [ "$status" -eq 0 ] || verdict=FAIL
  [ "$status" -eq 124 ] && verdict="TIMEOUT"
  [ "$verdict" = pass ] || failed=1
  echo "==== $name: $verdict (exit $status, $((end - start)) s)" >>"$log"
  [ $first -eq 1 ] || echo "," >>"$steps_json"
  first=0
  printf '{"step": "%s", "verdict": "%s", "exit": %d, "seconds": %d}' \
    "$name" "$verdict" "$status" "$((end - start))" >>"$steps_json"
  echo "| $name | $verdict | $((end - start)) s |" >>"$out/gpu_check.md"
  echo "$name: $verdict ($((end - start)) s)"
}

has_gpu=$("$py" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
{
  echo "# fastcompress GPU check"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  "$py" - <<'PY' 2>/dev/null || echo "(torch not importable)"
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
PY
  echo
  echo "| step | verdict | time |"
  echo "|---|---|---|"
} >"$out/gpu_check.md"

step install 240 "$py" -m pip install -q --no-deps --no-build-isolation -e .
step info 300 "$py" -m fastcompress info
if [ "$has_gpu" = "1" ]; then
  # The kernels compiled for the device, not interpreted.
  step gpu-tests 300 env TRITON_INTERPRET=0 "$py" -m pytest -q -p no:cacheprovider \
    tests/test_gpu.py tests/test_autocast.py::test_cuda_autocast_matches_float32
  step selftest 240 env TRITON_INTERPRET=0 "$py" -m fastcompress selftest --device cuda \
    --quick --out "$out/selftest"
  step benchmarks 300 env TRITON_INTERPRET=0 "$py" scripts/gpu_bench.py "$out" --markdown "$bench_md"
else
  echo "no GPU here (torch.cuda.is_available() is False): plumbing only" | tee -a "$log"
  step selftest-cpu 300 env -u TRITON_INTERPRET "$py" -m fastcompress selftest --device cpu \
    --quick --n 2048 --out "$out/selftest"
  step benchmark-plumbing 300 "$py" scripts/gpu_bench.py "$out" --device cpu --quick \
    --markdown "$bench_md"
  echo >>"$out/gpu_check.md"
  echo "No GPU on this machine: only the plumbing was checked (the benchmark numbers below" \
    "are tiny CPU shapes and mean nothing)." >>"$out/gpu_check.md"
fi
cat "$bench_md" >>"$out/gpu_check.md"
echo "]" >>"$steps_json"
echo "report: $out/gpu_check.md"
exit "$failed"

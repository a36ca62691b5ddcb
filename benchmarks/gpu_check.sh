#!/usr/bin/env bash
# The GPU check of issue 17, in ONE script for the moments a GPU is lent: the CUDA tests, then the TTFT
# benchmark on the default model's shape and on a Llama-7B shape (random weights: latency does not
# depend on them), 2k/8k/32k-token documents plus the persona case, module placement device and host,
# bf16, and a compiled bf16 column when this checkout's engine has compile=. Everything it prints goes to
# OUT/gpu_check.txt, and a summary (environment, each step's status and the benchmark rows) to
# OUT/gpu_check.json.
#
# It needs nothing but this working tree and a Python that has torch: no network (none is assumed),
# no model files. The Python is $PYTHON, else .venv/bin/python when it imports torch, else python3 (on the
# lent H200 box: the image's python3 with its own torch/transformers; their versions are printed and may
# differ from requirements.txt). The repository runs from PYTHONPATH, nothing is installed; missing
# packages can come as wheels (--wheels DIR, default ./.whl when present: pip install --no-index into a
# temporary folder). The default model's weights ship as a 98 MB GGUF that does not travel: its shape
# is used with random weights, with its real tokenizer when `resolve("smollm2")` works there, else the
# tests' character tokenizer.
#
# Steps run in priority order under a total budget (--budget, default 290 s; 900 s with --dry-run, whose
# timeouts are 3x); each gets a timeout and is skipped, with the reason recorded, when the budget cannot
# cover it. Exit status: 0 when every step
# that ran passed, 1 otherwise, 2 for a usage error or no CUDA device (without --dry-run).
#
#   bash benchmarks/gpu_check.sh                       # on the GPU box (writes results/gpu_check/)
#   bash benchmarks/gpu_check.sh --out "$OUT"          # from the device tool: the two files come back
#   bash benchmarks/gpu_check.sh --dry-run             # here, on CPU: tiny sizes, proves the script works
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$ROOT/results/gpu_check"
BUDGET=""
DRY=0
WHEELS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run|--cpu) DRY=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    --wheels) WHEELS="$2"; shift ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
# The timeouts are sized for the GPU; a CPU dry run (tiny model, but compiles and a busy machine) gets 3x.
if [ "$DRY" = 1 ]; then SCALE=3; BUDGET="${BUDGET:-900}"; else SCALE=1; BUDGET="${BUDGET:-290}"; fi
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_check.txt"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/pc-gpu-check.XXXXXX")"
STEPS="$WORK/steps.jsonl"
: > "$LOG"; : > "$STEPS"
START=$(date +%s)
say() { echo "$*" | tee -a "$LOG"; }

# ------------------------------------------------------------------ python and packages
pick_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  if [ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "$ROOT/.venv/bin/python"; return
  fi
  echo python3
}
PY="$(pick_python)"
[ -z "$WHEELS" ] && [ -d "$ROOT/.whl" ] && WHEELS="$ROOT/.whl"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$WHEELS" ]; then
  say "installing wheels from $WHEELS into $WORK/site (no index)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WHEELS"/*.whl >>"$LOG" 2>&1 \
    && export PYTHONPATH="$WORK/site:$PYTHONPATH" || say "wheel install failed (see above); going on without"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PROMPTCACHE_HOME="${PROMPTCACHE_HOME:-$HOME/.cache/promptcache}"

say "== gpu_check $(date -u +%FT%TZ) in $ROOT (git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none)), budget ${BUDGET}s, dry-run $DRY"
"$PY" - >"$WORK/env.json" 2>>"$LOG" <<'EOF'
import importlib, json, os, platform, sys
env = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
       "cpus": os.cpu_count(), "load_average": os.getloadavg()}
missing = []
for name in ("torch", "transformers", "tokenizers", "safetensors", "lxml", "numpy", "filelock", "tqdm", "pytest",
             "matplotlib", "gguf"):
    try:
        env[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as exc:  # noqa: BLE001 - any import failure is reported, not raised
        missing.append(f"{name} ({type(exc).__name__})")
env["missing"] = missing
try:
    import torch
    env["cuda"] = torch.cuda.is_available()
    env["torch_cuda"] = torch.version.cuda
    if env["cuda"]:
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
except Exception as exc:  # noqa: BLE001
    env["cuda"] = False
    env["torch_error"] = repr(exc)
try:
    from promptcache.loading import resolve
    env["default_model"] = resolve("smollm2")
except BaseException as exc:  # noqa: BLE001 - ModelLoadError, SystemExit, missing gguf...
    env["default_model"] = None
    env["default_model_error"] = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
print(json.dumps(env))
EOF
cat "$WORK/env.json" | tee -a "$LOG"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm --format=csv 2>&1 | tee -a "$LOG"
env_get() { "$PY" -c "import json,sys; v=json.load(open('$WORK/env.json')).get('$1'); print('' if v in (None, False) else v)"; }
if [ -z "$(env_get torch)" ]; then say "FAIL: $PY has no torch: set PYTHON=/path/to/python (or bring wheels)"; exit 2; fi
if [ "$DRY" = 0 ] && [ -z "$(env_get cuda)" ]; then
  say "FAIL: no CUDA device visible to $PY's torch; use --dry-run for the CPU mode"; exit 2
fi

# ------------------------------------------------------------------ steps
# run_step NAME MIN_S MAX_S CMD...: runs CMD with timeout min(MAX_S, what is left), records status and time.
FAILED=0
run_step() {
  local name="$1" min="$2" max="$(( $3 * SCALE ))"; shift 3
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt "$min" ]; then
    say "-- $name: SKIPPED (budget: ${left}s left, needs ${min}s)"
    echo "{\"step\": \"$name\", \"status\": \"skipped\", \"why\": \"budget: ${left}s left, needs ${min}s\"}" >> "$STEPS"
    return
  fi
  local limit=$(( left < max ? left : max ))
  say "-- $name (timeout ${limit}s): $*"
  local t0=$(date +%s)
  ( cd "$ROOT" && timeout --kill-after=10 "$limit" "$@" ) 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - t0 ))
  local status=passed
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status=timeout; elif [ "$rc" != 0 ]; then status=failed; fi
  [ "$status" = passed ] || FAILED=1
  say "-- $name: $status (rc $rc, ${took}s)"
  echo "{\"step\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $took}" >> "$STEPS"
}

if [ "$DRY" = 1 ]; then
  DEVICE=cpu; LENGTHS=64,256; REPEATS=1; SMALL=(--random-weights tiny --tokenizer char); BIG=(--random-weights tiny --tokenizer char)
  THREADS=(--threads 1); COMPILED=(--lengths 64 --no-persona)
else
  # Compiled runs: fewer lengths, each new cache bucket costs a compile (warm-up, reported apart).
  DEVICE=cuda; LENGTHS=2048,8192,32768; REPEATS=3; THREADS=(); COMPILED=(--lengths 2048,8192)
  BIG=(--random-weights llama-7b --tokenizer char)
  if [ -n "$(env_get default_model)" ]; then SMALL=(--model smollm2 --random-weights smollm2)  # its real tokenizer
  else SMALL=(--random-weights smollm2 --tokenizer char); fi
fi
TTFT=("$PY" benchmarks/ttft.py --device "$DEVICE" --dtype bfloat16 --lengths "$LENGTHS" --repeats "$REPEATS" "${THREADS[@]}")
CUDA_TESTS=$(cd "$ROOT" && ls tests/test_*cuda*.py 2>/dev/null | tr '\n' ' ')

run_step cuda-tests 20 60 "$PY" -m pytest -q -p no:cacheprovider $CUDA_TESTS
run_step ttft-smollm2-device 20 45 "${TTFT[@]}" "${SMALL[@]}" --placement device --out "$WORK/ttft-smollm2-device"
run_step ttft-7b-device 30 80 "${TTFT[@]}" "${BIG[@]}" --only scaffold --placement device --out "$WORK/ttft-7b-device"
run_step ttft-7b-host 30 80 "${TTFT[@]}" "${BIG[@]}" --only scaffold --placement host --out "$WORK/ttft-7b-host"
run_step ttft-smollm2-host 20 40 "${TTFT[@]}" "${SMALL[@]}" --only scaffold --placement host --out "$WORK/ttft-smollm2-host"
run_step ttft-smollm2-compiled 30 70 "${TTFT[@]}" "${SMALL[@]}" "${COMPILED[@]}" --only scaffold \
  --variants bf16+compile --placement device --out "$WORK/ttft-smollm2-compiled"
run_step ttft-7b-compiled 30 90 "${TTFT[@]}" "${BIG[@]}" "${COMPILED[@]}" --only scaffold --variants bf16+compile \
  --placement device --out "$WORK/ttft-7b-compiled"

# ------------------------------------------------------------------ summary
"$PY" - "$WORK" "$OUT_DIR/gpu_check.json" "$START" <<'EOF'
import json, sys, time
from pathlib import Path
work, out, start = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines() if line.strip()]
for step in steps:
    result = work / f"{step['step']}.json"
    if result.is_file():
        step["ttft"] = json.loads(result.read_text())
summary = {"env": json.loads((work / "env.json").read_text()), "total_seconds": int(time.time()) - start,
           "steps": steps}
out.write_text(json.dumps(summary, indent=1, default=str))
print(f"wrote {out}")
EOF
say "== done in $(( $(date +%s) - START ))s: $(grep -c '"passed"' "$STEPS") passed, $(grep -c '"failed"\|"timeout"' "$STEPS") failed or timed out, $(grep -c '"skipped"' "$STEPS") skipped; log $LOG"
rm -rf "$WORK"
exit $FAILED

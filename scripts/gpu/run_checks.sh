#!/usr/bin/env bash
# bash scripts/gpu/run_checks.sh STAGE... [-- BENCHMARK_ARGS...]
#
# Run ON THE GPU MACHINE through the device tool, from the repository root, with the wheels of
# scripts/gpu/fetch_wheels.sh carried along (docs/GPU_CHECKS.md has the exact calls). Stages run in the order given:
#
#   tests       pytest tests/test_gpu_hybrid.py tests/test_gpu_vlm.py tests/test_gpu.py: hybrid decoders and VLMs (fp32 exact, bf16 bounded) and
#               every GPU attention path vs an fp64 reference, bf16 and fp32   (.gpu_wheels)
#   deepspeed   pytest tests/test_gpu_deepspeed.py: ZeRO-2/3 GRPO steps, grouped vs GRPOTrainer vs fp32   (.gpu_wheels)
#   bench       python -m benchmarks.bench_logprob --device cuda --out-dir $OUT/bench BENCHMARK_ARGS      (.gpu_wheels)
#   fa4         unpack flash-attn 4 aside, run scripts/gpu/fa4_check.py (torch + this checkout only)    (.gpu_fa4)
#
# Before the first stage it prints the machine (GPU, python, torch, transformers, whether torch has
# torch.nn.attention.varlen) and installs .gpu_wheels (and .gpu_wheels_wandb) into the image's python when they
# were carried, once per machine. Each stage has its own time limit, cut so that the whole command ends before
# PG_GPU_DEADLINE_S (default 570 s, under the tool's 600 s), and writes its log to $OUT/<stage>.log; $OUT/summary.txt
# gets the machine report and one status line per stage. The exit status is the number of failed stages.
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)
START=$(date +%s)
DEADLINE_S=${PG_GPU_DEADLINE_S:-570}
OUT=${OUT:-/tmp/pg_gpu_out}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
PY=${PYTHON:-python3}

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export WANDB_MODE=offline WANDB_SILENT=true PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# This checkout first: what runs is the code here, not the copy in the carried wheel.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

STAGES=()
BENCH_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; BENCH_ARGS=("$@"); break ;;
    tests|deepspeed|bench|fa4) STAGES+=("$1") ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown stage: $1 (tests, deepspeed, bench, fa4)" >&2; exit 2 ;;
  esac
  shift
done
[ ${#STAGES[@]} -gt 0 ] || { sed -n '2,16p' "$0"; exit 2; }

say() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $(( $(date +%s) - START )); }
# budget WANTED: seconds a stage may take, cut to what is left before the deadline (at least 10).
budget() {
  local left=$(( DEADLINE_S - $(elapsed) - 5 ))
  if [ "$left" -lt "$1" ]; then echo $(( left > 10 ? left : 10 )); else echo "$1"; fi
}

FAILED=0
record() {  # record STAGE STATUS SECONDS DETAIL
  local verdict=PASS
  if [ "$2" = 124 ] || [ "$2" = 137 ]; then verdict="TIMEOUT"; elif [ "$2" != 0 ]; then verdict="FAIL($2)"; fi
  [ "$2" != 0 ] && FAILED=$((FAILED + 1))
  say "[$verdict] $1 (${3}s) $4"
}

# ---------------------------------------------------------------------------------------------------------------------
machine_report() {  # machine_report LABEL
  say "== machine, $1 ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/gpu: /' \
    | tee -a "$SUMMARY"
  "$PY" - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import importlib.metadata as md, importlib.util, platform, sys
import torch
print(f"python {platform.python_version()} at {sys.executable}")
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, device "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE'}")
print(f"torch.nn.attention.varlen: {importlib.util.find_spec('torch.nn.attention.varlen') is not None}; "
      f"flex_attention: {importlib.util.find_spec('torch.nn.attention.flex_attention') is not None}")
names = ["transformers", "trl", "accelerate", "datasets", "deepspeed", "peft", "huggingface-hub", "tokenizers",
         "safetensors", "pyarrow", "pandas", "fsspec", "regex", "tqdm", "pydantic", "protobuf", "wandb",
         "prefix_grouper", "prefix_grouper_trl", "flash_attn", "flash-attn-4", "triton"]
found = []
for name in names:
    try:
        found.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        found.append(f"{name} -")
print("packages: " + ", ".join(found))
EOF
}

install_wheels() {
  local marker=/var/tmp/pg_gpu_installed stamp
  stamp=$(ls .gpu_wheels .gpu_wheels_wandb 2>/dev/null | md5sum | cut -d' ' -f1)
  if [ -f "$marker" ] && [ "$(cat "$marker")" = "$stamp" ]; then
    say "== wheels already installed on this machine (warm from an earlier call)"
    return 0
  fi
  if [ ! -f .gpu_wheels/requirements.txt ]; then
    say "== no .gpu_wheels/ carried: nothing installed (tests, deepspeed and bench need it; fa4 does not)"
    return 2
  fi
  local links=(--find-links .gpu_wheels) reqs=(-r .gpu_wheels/requirements.txt) start=$(date +%s) status
  if [ -f .gpu_wheels_wandb/requirements.txt ]; then
    links+=(--find-links .gpu_wheels_wandb); reqs+=(-r .gpu_wheels_wandb/requirements.txt)
  fi
  # First with pip's resolver against the image's packages: only what is missing or too old is installed.
  "$PY" -m pip install -q --no-index --no-cache-dir --no-compile "${links[@]}" "${reqs[@]}" > "$OUT/install.log" 2>&1
  status=$?
  if [ $status != 0 ]; then
    say "resolver install failed (tail below); installing every carried wheel with --no-deps instead"
    tail -5 "$OUT/install.log" | tee -a "$SUMMARY"
    local wheels=(.gpu_wheels/*.whl)
    [ -d .gpu_wheels_wandb ] && wheels+=(.gpu_wheels_wandb/*.whl)
    "$PY" -m pip install -q --no-index --no-cache-dir --no-compile --no-deps "${wheels[@]}" >> "$OUT/install.log" 2>&1
    status=$?
  fi
  "$PY" -m pip check 2>&1 | grep -v "^No broken" | sed 's/^/pip check: /' | head -20 | tee -a "$SUMMARY"
  record install $status $(( $(date +%s) - start )) "(pip log: install.log)"
  [ $status = 0 ] && echo "$stamp" > "$marker"
  # A short log needs no file of its own: the tool brings back at most 8 files.
  if [ $status = 0 ]; then rm -f "$OUT/install.log"; fi
  return $status
}

# ---------------------------------------------------------------------------------------------------------------------
stage_tests() {
  # The hybrid decoders first: they are short, and a time-out still brings back the attention paths' results so far.
  timeout -k 10 "$(budget 330)" "$PY" -m pytest tests/test_gpu_hybrid.py tests/test_gpu_vlm.py tests/test_gpu.py -q -rfEs --durations=15 \
    -p no:cacheprovider > "$OUT/tests.log" 2>&1
}

stage_deepspeed() {
  # The workers are subprocesses; -s shows the per-step comparison the test prints.
  timeout -k 10 "$(budget 330)" "$PY" -m pytest tests/test_gpu_deepspeed.py -q -s -rfEs --durations=10 \
    -p no:cacheprovider > "$OUT/deepspeed.log" 2>&1
}

stage_fa4() {
  local site=/var/tmp/pg_fa4_site
  if [ ! -f "$site/.complete" ]; then
    if [ ! -f .gpu_fa4/cutlass_cu13.tar.xz ]; then
      echo "no .gpu_fa4/ carried: run scripts/gpu/fetch_wheels.sh --fa4 and carry .gpu_fa4 (alone: it is ~60 MiB)"
      return 1
    fi
    (cd .gpu_fa4 && sha256sum -c cutlass_cu13.tar.xz.sha256) || return 1
    rm -rf "$site" && mkdir -p "$site"
    # Aside from the image's site-packages: flash-attn 4's `flash_attn` package must not look like flash-attn 2 to
    # the other stages. nvidia-cutlass-dsl puts its dsl_packages on the path through a .pth, which --target skips.
    # The wheels first: pip --target skips a top-level folder that already exists (nvidia_cutlass_dsl/, which the
    # runtime archive also fills), while unpacking the archive afterwards merges into it.
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" .gpu_fa4/wheels/*.whl || return 1
    "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1], 'r:xz').extractall(sys.argv[2], filter='data')" \
      .gpu_fa4/cutlass_cu13.tar.xz "$site" || return 1
    touch "$site/.complete"
  fi
  PYTHONPATH="$site:$site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH" \
    timeout -k 10 "$(budget 240)" "$PY" scripts/gpu/fa4_check.py
}

stage_bench() {
  if [ ! -f benchmarks/bench_logprob.py ] || ! grep -q -- '"--device"' benchmarks/bench_logprob.py; then
    echo "TODO: benchmarks/bench_logprob.py with --device cuda is not in this checkout; nothing measured."
    return 4
  fi
  mkdir -p "$OUT/bench"
  # The harness appends each point to its CSV as soon as it is measured: a timeout still brings the points done.
  timeout -k 20 "$(budget 540)" "$PY" -m benchmarks.bench_logprob --device cuda --out-dir "$OUT/bench" \
    ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"}
}

# ---------------------------------------------------------------------------------------------------------------------
: > "$SUMMARY"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo '?')
say "== run_checks.sh ${STAGES[*]} ${BENCH_ARGS[@]+-- ${BENCH_ARGS[*]}} (commit $commit)"
machine_report "as found"
install_wheels
case $? in
  0) machine_report "after installing the carried wheels" > /dev/null ;;  # into the summary only
  2) ;;
  *) say "(install failed: the stages below run on whatever the image has)" ;;
esac

for stage in "${STAGES[@]}"; do
  if [ $(( DEADLINE_S - $(elapsed) )) -lt 20 ]; then
    record "$stage" 124 0 "skipped: the ${DEADLINE_S}s deadline is reached"
    continue
  fi
  say "== $stage (at $(elapsed)s)"
  stage_start=$(date +%s)
  case "$stage" in
    tests) stage_tests; status=$?; detail="$(tail -1 "$OUT/tests.log")" ;;
    deepspeed) stage_deepspeed; status=$?; detail="$(tail -1 "$OUT/deepspeed.log")" ;;
    fa4) stage_fa4 > "$OUT/fa4.log" 2>&1; status=$?; detail="$(tail -1 "$OUT/fa4.log")" ;;
    bench) stage_bench >> "$OUT/bench.log" 2>&1; status=$?
           # The harness's target verdicts (the lines under "Targets:"), else its last line.
           detail="$(awk '/^Targets:/ {t = 1; next} t && /^ *\[(PASS|FAIL|INFO)\]/' "$OUT/bench.log" | tr -s ' ' \
                     | paste -sd';' -)"
           [ -n "$detail" ] || detail="$(tail -1 "$OUT/bench.log")" ;;
  esac
  record "$stage" "$status" $(( $(date +%s) - stage_start )) "$detail"
done
files=$(cd "$OUT" && find . -type f | sed 's|^\./||' | paste -sd' ' -)
say "== done in $(elapsed)s, $FAILED failed stage(s); files in \$OUT: $files"
exit $FAILED

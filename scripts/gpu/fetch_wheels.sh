#!/usr/bin/env bash
# bash scripts/gpu/fetch_wheels.sh [--fa4] [--wandb]
#
# Run HERE (a machine with the package index), before a GPU session: fetches the Python packages the GPU image lacks,
# for its Python 3.12 on x86-64, into ignored folders that the device tool's `carry` sends along. docs/GPU_CHECKS.md
# says which folder goes with which call; scripts/gpu/run_checks.sh installs them there.
#
#   .gpu_wheels/        always (~20.4 MiB): trl, transformers (the image has 5.17, we need >= 5.20), datasets and the
#                       deps of these the image lacks, deepspeed (built here from its sdist with DS_BUILD_OPS=0: a
#                       pure-Python wheel, ops would JIT-build on first use) and its deps, the paper's prefix_grouper
#                       (benchmark baseline), this package. requirements.txt names what run_checks.sh installs.
#   .gpu_fa4/           --fa4 (~60 MiB; a call of its own): flash-attn 4 and its CuTe DSL runtime. The runtime wheel,
#                       nvidia-cutlass-dsl-libs-cu13, is 92 MB around one 193 MB x86-64 library: unpacked here and
#                       packed again with xz's x86 filter it is ~52 MB, which fits one call beside the small wheels.
#                       Takes 10-20 minutes here (xz, single-threaded); kept while its versions do not change.
#   .gpu_wheels_wandb/  --wandb (~20.8 MiB): wandb and its deps, for an offline-logging check beside .gpu_wheels.
#
# Everything else the code needs is in the image (the device page's package list): torch 2.11+cu130, accelerate 1.15,
# huggingface_hub 1.33, tokenizers 0.23.2, safetensors 0.8.0, peft, pyarrow, pandas, numpy, einops, msgpack, ninja,
# py-cpuinfo, psutil, pytest. The pins below are the versions this repository is tested with.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)

WITH_FA4=0
WITH_WANDB=0
for arg in "$@"; do
  case "$arg" in
    --fa4) WITH_FA4=1 ;;
    --wandb) WITH_WANDB=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The GPU image: CPython 3.12 on x86-64, glibc manylinux.
PLATFORM_ARGS=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp
  --abi cp312 --abi abi3 --abi none
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)

# Top-level requirements run_checks.sh installs (pip resolves them against the image's packages plus these wheels).
TOP_LEVEL=(
  trl==1.16.0
  transformers==5.23.0
  datasets==5.2.0
  deepspeed==0.19.8
  prefix_grouper==0.0.1.post1
  prefix_grouper_trl
)
# Wheels fetched as they are. Beyond the top level: what datasets, deepspeed and transformers need that the image
# does not have (dill, multiprocess, hjson, pydantic and its three) or may have too old (regex >= 2025.10.22 and
# tqdm >= 4.66.3 are checked when transformers/datasets import; fsspec <= 2026.9.0 is datasets' cap).
CORE_WHEELS=(
  trl==1.16.0
  transformers==5.23.0
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
  fsspec==2026.9.0
  regex==2026.11.15
  tqdm==4.70.1
  hjson==3.1.0
  pydantic==2.14.3
  pydantic-core==2.50.4
  annotated-types==0.8.0
  typing-inspection==0.4.5
  prefix_grouper==0.0.1.post1
)
DEEPSPEED=deepspeed==0.19.8
WANDB_WHEELS=(
  wandb==0.31.0
  cwevals==0.0.1b1
  distro==1.9.0
  sniffio==1.3.1
  opentelemetry-api==1.45.2
  opentelemetry-sdk==1.45.2
  opentelemetry-proto==1.45.2
  opentelemetry-exporter-otlp-proto-http==1.45.2
  opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-exporter-http-transport==0.66b2
  opentelemetry-exporter-otlp-common==0.66b2
  opentelemetry-semantic-conventions==0.66b2
  googleapis-common-protos==1.76.0
  protobuf==7.36.2
  platformdirs==4.14.7
)  # pydantic and its three come with .gpu_wheels
# flash-attn 4's needs beyond the image (which has torch, einops, typing-extensions, cuda-bindings, protobuf).
FA4_SMALL_WHEELS=(
  flash-attn-4==4.0.0b36
  nvidia-cutlass-dsl==4.8.1
  nvidia-cutlass-dsl-libs-base==4.8.1
  nvidia-cutlass-dsl-libs-core==4.8.1
  apache-tvm-ffi==0.1.15.post2
  torch-c-dlpack-ext==0.1.5
  quack-kernels==0.6.5
)
FA4_BIG_WHEEL=nvidia-cutlass-dsl-libs-cu13==4.8.1

fetch() {  # fetch DEST SPEC...
  local dest=$1; shift
  # (the filter drops pip's notes about this machine's configured local mirrors that do not list a package)
  "$PYTHON" -m pip download -q "${PLATFORM_ARGS[@]}" -d "$dest" "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}

ensure_ignored() {
  local path=$1
  mkdir -p "$path"
  if ! git check-ignore -q "$path"; then
    echo "$path/ is not ignored by git: add it to .gitignore" >&2
    exit 1
  fi
}

# ---------------------------------------------------------------------------------------------------------------------
echo "== .gpu_wheels/"
ensure_ignored .gpu_wheels
rm -rf .gpu_wheels && mkdir -p .gpu_wheels
fetch .gpu_wheels "${CORE_WHEELS[@]}"

# deepspeed publishes only an sdist. Built here without ops it is a py3-none-any wheel; the accelerator it records
# ('cpu' here) only matters for prebuilt ops, of which it has none: on the GPU machine it detects CUDA at run time.
build=$(mktemp -d)
"$PYTHON" -m pip download -q --no-deps --no-binary=:all: -d "$build" "$DEEPSPEED" \
  2> >(grep -v "is ignored: it is neither" >&2)
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w .gpu_wheels "$build"/deepspeed-*.tar.gz
rm -rf "$build"

# This repository, as a wheel (run_checks.sh also puts the checkout first on PYTHONPATH, so edits made after this
# script ran are what runs).
build=$(mktemp -d)
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$build" "$REPO"
cp "$build"/prefix_grouper_trl-*.whl .gpu_wheels/
rm -rf "$build" "$REPO/build"

printf '%s\n' "${TOP_LEVEL[@]}" > .gpu_wheels/requirements.txt

# ---------------------------------------------------------------------------------------------------------------------
if [ "$WITH_WANDB" = 1 ]; then
  echo "== .gpu_wheels_wandb/"
  ensure_ignored .gpu_wheels_wandb
  rm -rf .gpu_wheels_wandb && mkdir -p .gpu_wheels_wandb
  fetch .gpu_wheels_wandb "${WANDB_WHEELS[@]}"
  echo "wandb==0.31.0" > .gpu_wheels_wandb/requirements.txt
fi

# ---------------------------------------------------------------------------------------------------------------------
if [ "$WITH_FA4" = 1 ]; then
  echo "== .gpu_fa4/"
  ensure_ignored .gpu_fa4
  rm -rf .gpu_fa4/wheels && mkdir -p .gpu_fa4/wheels
  fetch .gpu_fa4/wheels "${FA4_SMALL_WHEELS[@]}"
  stamp="$FA4_BIG_WHEEL xz-x86-9e"
  if [ -f .gpu_fa4/STAMP ] && [ "$(cat .gpu_fa4/STAMP)" = "$stamp" ] && [ -f .gpu_fa4/cutlass_cu13.tar.xz ]; then
    echo "   cutlass_cu13.tar.xz is up to date (delete .gpu_fa4/STAMP to build it again)"
  else
    echo "   packing the 193 MB CuTe DSL library with xz: 10-20 minutes"
    rm -f .gpu_fa4/STAMP .gpu_fa4/cutlass_cu13.tar.xz*
    work=$(mktemp -d)
    fetch "$work" "$FA4_BIG_WHEEL"
    mkdir "$work/tree"
    (cd "$work/tree" && "$PYTHON" -m zipfile -e "$work"/nvidia_cutlass_dsl_libs_cu13-*.whl .)
    # Only the x86-64 library travels: the aarch64/QNX stubs are of no use on the device machine.
    rm -rf "$work"/tree/nvidia_cutlass_dsl/cu13/lib/stubs
    # The x86 branch filter makes the machine code ~20% more compressible (52 MB instead of 64 MB); one thread,
    # so that the whole library is one block with one dictionary.
    tar -C "$work/tree" -cf - . | xz --x86 --lzma2=preset=9e,dict=256MiB -T1 > .gpu_fa4/cutlass_cu13.tar.xz
    (cd .gpu_fa4 && sha256sum cutlass_cu13.tar.xz > cutlass_cu13.tar.xz.sha256)
    rm -rf "$work"
    echo "$stamp" > .gpu_fa4/STAMP
  fi
fi

# ---------------------------------------------------------------------------------------------------------------------
echo
echo "== what travels (limit: 64 MiB = 67108864 bytes per call: the working tree plus the carried paths)"
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null \
  | awk '{s+=$1} END {print s+0}')
if [ -d shared ]; then
  tree_bytes=$((tree_bytes + $(du -sb shared | cut -f1)))
fi
size() { if [ -e "$1" ]; then du -sb "$1" | cut -f1; else echo 0; fi; }
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
status=0
check_call() {  # check_call NAME BYTES
  local verdict=fits
  if [ "$2" -gt 67108864 ]; then verdict="DOES NOT FIT"; status=1; fi
  printf '  %-48s %10d bytes (%s)  %s\n' "$1" "$2" "$(mib "$2")" "$verdict"
}
for folder in .gpu_wheels .gpu_wheels_wandb .gpu_fa4 .gpu_fa4/wheels; do
  [ -d "$folder" ] || continue
  echo "$folder/:"
  find "$folder" -maxdepth 1 -type f -printf '  %10s  %f\n' | sort -k2
done
core=$(size .gpu_wheels); fa4=$(size .gpu_fa4); wandb=$(size .gpu_wheels_wandb)
echo "working tree: $tree_bytes bytes ($(mib "$tree_bytes"))"
check_call "call with .gpu_wheels" $((tree_bytes + core))
[ "$wandb" -gt 0 ] && check_call "call with .gpu_wheels + .gpu_wheels_wandb" $((tree_bytes + core + wandb))
[ "$fa4" -gt 0 ] && check_call "call with .gpu_fa4 alone" $((tree_bytes + fa4))
exit $status

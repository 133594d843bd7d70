#!/usr/bin/env bash
# make setup: a pinned uv, .venv (Python 3.11), the locked stack, flash-attn from a prebuilt wheel on GPU hosts
# (sdpa otherwise), then the self-check. Idempotent: a second run takes seconds.
#
# Environment:
#   FLASH_ATTN_BUILD=1     compile flash-attn from source if no wheel is found (20-40 minutes; off by default)
#   FLASH_ATTN_WHEEL=PATH  install this flash-attn wheel file instead of downloading one
#   SKIP_CHECK=1           do not run scripts/check_env.py at the end
#   UV_NATIVE_TLS=1        let uv use the system's TLS roots (uv's own defaults work too)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

UV_VERSION="${UV_VERSION:-0.13.9}"
PYTHON_VERSION=3.11
VENV=.venv
FLASH_ATTN_VERSION=2.5.8
FLASH_ATTN_RELEASES="${FLASH_ATTN_RELEASES:-https://github.com/Dao-AILab/flash-attention/releases/download}"
LOCKS=(requirements/base.txt requirements/dev.txt requirements/eval.txt requirements/tracking.txt)
T0=$(date +%s.%N)

step() {  # step "label" command...: run it and print the elapsed time
  local label=$1 start end
  shift
  start=$(date +%s.%N)
  "$@"
  end=$(date +%s.%N)
  awk -v l="$label" -v s="$start" -v e="$end" 'BEGIN { printf "[setup] %-34s %6.1fs\n", l, e - s }'
}

ensure_uv() {
  if command -v uv >/dev/null && [ "$(uv --version | cut -d' ' -f2)" = "$UV_VERSION" ]; then
    UV=(uv)
    return
  fi
  if ! python3 -m uv --version 2>/dev/null | grep -q " $UV_VERSION"; then
    python3 -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
  fi
  UV=(python3 -m uv)
}

ensure_venv() {
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import sys; sys.exit(sys.version_info[:2] != (3, 11))"; then
    return
  fi
  [ -e "$VENV" ] && echo "[setup] $VENV is not Python $PYTHON_VERSION: recreating it"
  "${UV[@]}" venv --quiet --clear --python "$PYTHON_VERSION" "$VENV"
}

sync_lock() {
  # sync (not install): the venv ends up exactly the lock, stale packages removed; hashes are required.
  local locks=()
  for f in "${LOCKS[@]}"; do [ -f "$f" ] && locks+=("$f"); done
  "${UV[@]}" pip sync --quiet --require-hashes --python "$VENV/bin/python" "${locks[@]}"
}

has_nvidia_gpu() {
  command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q GPU
}

flash_attn_wheel_name() {
  # The v2.5.8 release publishes wheels per torch minor, CUDA major (cu122 serves every 12.x torch), Python and
  # C++11 ABI; pick the one matching the installed torch.
  "$VENV/bin/python" - "$FLASH_ATTN_VERSION" <<'PY'
import sys
import torch
version = sys.argv[1]
torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
cuda_major = (torch.version.cuda or "").split(".")[0]
if cuda_major != "12":
    sys.exit(f"torch {torch.__version__} is not a CUDA 12 build")
abi = "TRUE" if torch._C._GLIBCXX_USE_CXX11_ABI else "FALSE"
py = f"cp{sys.version_info.major}{sys.version_info.minor}"
print(f"flash_attn-{version}+cu122torch{torch_mm}cxx11abi{abi}-{py}-{py}-linux_x86_64.whl")
PY
}

install_flash_attn() {
  if ! has_nvidia_gpu; then
    echo "[setup] flash-attn: no NVIDIA GPU here; attention uses sdpa"
    return
  fi
  local wheel name url
  wheel="${FLASH_ATTN_WHEEL:-}"
  if [ -z "$wheel" ]; then
    name=$(flash_attn_wheel_name) || { echo "[setup] flash-attn: no prebuilt wheel fits ($name); using sdpa"; return; }
    wheel=".cache/wheels/$name"
    url="$FLASH_ATTN_RELEASES/v$FLASH_ATTN_VERSION/${name/+/%2B}"
    mkdir -p .cache/wheels
    # Bounded: a missing or unreachable wheel must never turn into a 40-minute compile (ISSUES_LOG.md).
    if [ ! -s "$wheel" ] && ! curl -fsSL --connect-timeout 10 --max-time 300 -o "$wheel.part" "$url"; then
      rm -f "$wheel.part"
      if [ "${FLASH_ATTN_BUILD:-0}" = 1 ]; then
        echo "[setup] flash-attn: no wheel; FLASH_ATTN_BUILD=1 given, compiling (this takes 20-40 minutes)"
        MAX_JOBS="${MAX_JOBS:-4}" "${UV[@]}" pip install --python "$VENV/bin/python" --no-build-isolation \
          -r requirements/gpu.txt
        return
      fi
      echo "[setup] flash-attn: prebuilt wheel unreachable ($url); using sdpa (FLASH_ATTN_BUILD=1 compiles it)"
      return
    fi
    [ -f "$wheel.part" ] && mv "$wheel.part" "$wheel"
  fi
  "${UV[@]}" pip install --quiet --python "$VENV/bin/python" --no-deps "$wheel" "einops==0.8.0"
}

install_liger() {
  # Liger's fused Triton kernels (the fast training path) are pure Python: installed from the GPU lock with hashes.
  has_nvidia_gpu || return 0
  local req=.cache/liger-kernel.txt
  mkdir -p .cache
  awk '/^liger-kernel==/ {p=1} p && /^[a-z]/ && !/^liger-kernel==/ {p=0} p' requirements/gpu.txt > "$req"
  "${UV[@]}" pip install --quiet --python "$VENV/bin/python" --no-deps --require-hashes -r "$req"
}

main() {
  step "uv $UV_VERSION" ensure_uv
  step "venv (Python $PYTHON_VERSION)" ensure_venv
  step "sync locked stack" sync_lock
  step "flash-attn (GPU hosts only)" install_flash_attn
  step "liger-kernel (GPU hosts only)" install_liger
  if [ "${SKIP_CHECK:-0}" != 1 ]; then
    step "self-check (make check)" "$VENV/bin/python" scripts/check_env.py
  fi
  awk -v s="$T0" -v e="$(date +%s.%N)" \
    'BEGIN { printf "[setup] done in %.1fs. Next: make demo (CPU, minutes) or make train PHASE=1a (GPU).\n", e - s }'
}

# Sourcing this file (the tests do) defines the steps without running them.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main
fi

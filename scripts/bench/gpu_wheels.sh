#!/usr/bin/env bash
# The pinned pure-Python stack as wheels, for a GPU image whose torch differs from the lock's (say a rented box
# with torch 2.11 / CUDA 13 preinstalled and no network for pip). Run from the repo root where pip can reach PyPI:
#
#   bash scripts/bench/gpu_wheels.sh                  # -> .whl/ (about 55 MB), for the image's Python 3.12
#   PY_VERSION=3.11 bash scripts/bench/gpu_wheels.sh  # another Python on the image
#
# Versions come from the locks (requirements/base.txt, gpu.txt), so the carried stack is the one the tests ran.
# On the GPU image, from the repo root, install them over its own packages without touching its torch:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD/scripts
# pyarrow is carried too: datasets 2.20.0's pyarrow-hotfix breaks on newer pyarrow. bitsandbytes (137 MB) is left
# out (`make quantize` needs it installed there), and flash-attn has no wheel for other torch builds: sdpa runs.
# The figures measured this way say so in docs/PERFORMANCE.md (torch 2.11 image, pinned stack from these wheels).
set -euo pipefail
DEST=${DEST:-.whl}
PY_VERSION=${PY_VERSION:-3.12}
PACKAGES=(transformers tokenizers peft trl accelerate huggingface-hub datasets dill multiprocess fsspec pyarrow
  pyarrow-hotfix liger-kernel)

pins=()
for name in "${PACKAGES[@]}"; do
  pin=$(grep -h -m1 -E "^${name}==" requirements/base.txt requirements/gpu.txt | cut -d' ' -f1 | head -n1)
  [ -n "$pin" ] || { echo "gpu_wheels: ${name} is not pinned in requirements/base.txt or gpu.txt" >&2; exit 2; }
  pins+=("$pin")
done

mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" \
  "${pins[@]}"
echo "gpu_wheels: ${#pins[@]} pinned wheels in $DEST ($(du -sh "$DEST" | cut -f1)): ${pins[*]}"

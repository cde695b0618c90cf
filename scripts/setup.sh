#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the package with pinned versions.
#
#   source scripts/setup.sh [demo|dev|bench]   # sets $MLDBG_PY to the environment's python
#   (bench = dev + the [bench] extra: W&B for benchmarks/wandb_compare.py)
#
# The environment lives outside the checkout (keyed by a hash of the files that define it), so a fresh
# clone on the same machine (CI) reuses it instead of reinstalling ~6 GB; a new machine builds it.
# Override the location with MLDBG_VENV=<dir>.
set -euo pipefail
profile="${1:-dev}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
key="$(cat "$repo/pyproject.toml" "$repo/constraints.txt" "$repo/scripts/setup.sh" | sha256sum | cut -c1-12)"
venv="${MLDBG_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mldbg-callbacks/venv-$key}"
python="${PYTHON:-python3}"

case "$profile" in
  demo) extras="torch,plot" ;;
  dev) extras="dev,all" ;;
  bench) extras="dev,all,bench" ;;
  *) echo "usage: scripts/setup.sh [demo|dev|bench]" >&2; exit 2 ;;
esac

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$python" -m venv "$venv"
fi
stamp="$venv/.installed-$profile"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing .[$extras] with constraints.txt (first time on this machine: a few minutes)"
  # (this machine's pip configuration names local indexes that warn once per package: filtered out)
  quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
  quiet "$venv/bin/python" -m pip install -q --upgrade setuptools wheel -c "$repo/constraints.txt"
  quiet "$venv/bin/python" -m pip install -q -c "$repo/constraints.txt" -e "$repo[$extras]"
  if [ "$profile" != demo ]; then
    # Installed without dependencies (pinned in constraints): KerasHub's detectors run on Keras' torch
    # backend, but it declares tensorflow-text (which pulls in TensorFlow); nuscenes-devkit (the reference
    # of the 3D metrics in tests) declares numpy<2, and its evaluation code runs on numpy 2.
    quiet "$venv/bin/python" -m pip install -q --no-deps -c "$repo/constraints.txt" keras-hub kagglehub kagglesdk \
      protobuf nuscenes-devkit pyquaternion cachetools shapely
  fi
  touch "$stamp"
fi
# Point the editable install at this checkout (the environment may be shared by several clones).
"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$repo" >/dev/null
export MLDBG_PY="$venv/bin/python"
export PATH="$venv/bin:$PATH"
echo "[setup] ready: $MLDBG_PY"

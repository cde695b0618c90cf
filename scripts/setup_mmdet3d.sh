#!/usr/bin/env bash
# Create (or reuse) the SECOND virtual environment, for the tests and examples that need mmdet3d.
#
#   source scripts/setup_mmdet3d.sh      # sets $MLDBG_MMDET3D_PY to the environment's python
#   bash scripts/setup_mmdet3d.sh        # just build / check it
#
# mmdet3d 1.4.0 needs mmcv 2.1.0 with its compiled ops (mmcv-lite lacks `mmcv._ext`), and no prebuilt
# mmcv 2.1.0 wheel exists for this torch / Python, so mmcv is compiled from PyPI's source distribution
# (about 9 minutes on 2 cores) against the CPU torch 2.13.0 wheel and numpy < 2. The compiled wheel is
# cached per machine, keyed by the mmcv / torch / Python versions, so later environments skip the build:
#   ${XDG_CACHE_HOME:-~/.cache}/mldbg-callbacks/wheels/mmcv-<ver>-torch<ver>-cp<ver>-<arch>/   (MLDBG_WHEEL_CACHE)
# The environment itself lives in ${XDG_CACHE_HOME:-~/.cache}/mldbg-callbacks/mmdet3d-<hash of this script and
# constraints-mmdet3d.txt>/ (override with MLDBG_MMDET3D_VENV). Without a C++ compiler the build fails, and
# so does this script: it never silently skips.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
constraints="$repo/constraints-mmdet3d.txt"
key="$(cat "$repo/scripts/setup_mmdet3d.sh" "$constraints" | sha256sum | cut -c1-12)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/mldbg-callbacks"
venv="${MLDBG_MMDET3D_VENV:-$cache/mmdet3d-$key}"
python="${PYTHON:-python3}"
log() { echo "[setup-mmdet3d] $*"; }
die() { echo "[setup-mmdet3d] ERROR: $*" >&2; exit 1; }
pin() { sed -n "s/^$1==\([^ ]*\).*/\1/p" "$constraints"; }   # the pinned version of a package

stamp="$venv/.installed"
if [ ! -f "$stamp" ]; then
  "$python" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null \
    || die "$python is not Python 3.11 (the pinned torch wheel is cp311): set PYTHON=<python3.11>"
  if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv"
    "$python" -m venv "$venv"
  fi
  py="$venv/bin/python"
  # (this machine's pip configuration names local indexes that warn once per package: filtered out)
  quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
  pip_c() { quiet "$py" -m pip install -q -c "$constraints" "$@"; }

  log "installing the build requirements (torch $(pin torch), numpy $(pin numpy), setuptools, wheel, ninja, mmengine)"
  pip_c --upgrade pip setuptools wheel ninja
  pip_c torch numpy mmengine

  # ---- mmcv: built once per machine, then reused from the wheel cache --------------------------------
  mmcv_ver="$(pin mmcv)"; torch_ver="$(pin torch)"
  pytag="$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
  wheels="${MLDBG_WHEEL_CACHE:-$cache/wheels}/mmcv-$mmcv_ver-torch$torch_ver-$pytag-$(uname -m)"
  mkdir -p "$wheels"
  (
    flock 9   # several checkouts / sessions on one machine: one build, the others wait for it
    if ! ls "$wheels"/mmcv-"$mmcv_ver"-*.whl >/dev/null 2>&1; then
      command -v "${CXX:-g++}" >/dev/null || die "no C++ compiler (${CXX:-g++}): mmcv $mmcv_ver must be compiled; install one (e.g. apt-get install g++)"
      buildlog="$wheels/build.log"
      log "building mmcv $mmcv_ver with its CPU ops from source (first time on this machine: ~9 min on 2 cores; log: $buildlog)"
      tmp="$(mktemp -d "$wheels/tmp.XXXXXX")"
      start=$SECONDS
      if ! MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" quiet "$py" -m pip wheel --no-build-isolation \
          --no-deps -w "$tmp" "mmcv==$mmcv_ver" >"$buildlog" 2>&1; then
        tail -30 "$buildlog" >&2
        rm -rf "$tmp"
        die "building mmcv $mmcv_ver failed (full log: $buildlog)"
      fi
      mv "$tmp"/mmcv-*.whl "$wheels"/ && rm -rf "$tmp"
      log "mmcv built in $((SECONDS - start)) s: $(ls "$wheels"/mmcv-*.whl)"
    else
      log "mmcv $mmcv_ver: reusing the cached wheel in $wheels"
    fi
  ) 9>"$wheels/.lock"
  pip_c "$(ls "$wheels"/mmcv-"$mmcv_ver"-*.whl | head -1)"

  log "installing mmdet, mmdet3d's requirements, mmdet3d (without its open3d visualisation extra) and test tools"
  pip_c mmdet
  pip_c lyft-dataset-sdk networkx numba nuscenes-devkit plyfile scikit-image tensorboard trimesh spconv \
    pyarrow pandas scikit-learn rich scipy requests pytest pytest-timeout
  pip_c --no-deps mmdet3d
  "$py" -c 'import mmcv.ops, mmdet, mmdet3d, pyarrow, pandas, sklearn; from mmcv.ops import Voxelization' \
    || die "mmdet3d or a dependency does not import in $venv (see above)"
  touch "$stamp"
fi
# This checkout, editable and without dependencies (the package's own light dependencies are pinned above);
# the build backend's deprecation notices are shown only if the install fails.
if ! out="$("$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$repo" 2>&1)"; then
  echo "$out" >&2
  die "installing $repo into $venv failed"
fi
export MLDBG_MMDET3D_PY="$venv/bin/python"
log "ready: $MLDBG_MMDET3D_PY"

#!/usr/bin/env bash
# Set up the environments and run the full test suite: the main suite, then the MMDetection3D suite
# (tests/mmdet3d) in its own environment (scripts/setup_mmdet3d.sh; mmdet3d needs numpy<2 and a compiled
# mmcv 2.1.0). Extra arguments go to the main pytest run; MLDBG_MMDET3D_PYTEST_ARGS to the second one.
# Both suites always run; the script fails if either fails, collects no tests, or if the mmdet3d
# environment cannot be built.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh dev
bash scripts/setup_system.sh   # Chromium and PostgreSQL for the web UI and server tests
export KERAS_BACKEND=torch HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
unset MLD_API_ENDPOINT MLD_API_KEY MLD_HOME

run_pytest() {  # run_pytest <label> <python> <args...>: pytest's status, with "no tests collected" a failure
  local label="$1" py="$2" status
  shift 2
  set +e
  "$py" -m pytest "$@"
  status=$?
  set -e
  if [ "$status" -eq 5 ]; then
    echo "$label: pytest collected no tests: treating that as a failure" >&2
    status=1
  fi
  return "$status"
}

main_status=0
run_pytest "main suite" "$MLDBG_PY" "$@" || main_status=$?   # (pyproject's addopts ignore tests/mmdet3d)

echo "[test] main suite exit status: $main_status; now the mmdet3d suite (tests/mmdet3d)"
source scripts/setup_mmdet3d.sh   # builds the second environment the first time; fails loudly if it cannot
mmdet3d_status=0
# shellcheck disable=SC2086 - MLDBG_MMDET3D_PYTEST_ARGS is a list of words on purpose
run_pytest "mmdet3d suite" "$MLDBG_MMDET3D_PY" tests/mmdet3d ${MLDBG_MMDET3D_PYTEST_ARGS:--q} || mmdet3d_status=$?

echo "[test] main suite: exit $main_status; mmdet3d suite: exit $mmdet3d_status"
if [ "$main_status" -ne 0 ]; then exit "$main_status"; fi
exit "$mmdet3d_status"

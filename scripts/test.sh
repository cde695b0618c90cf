#!/usr/bin/env bash
# Set up the environment and run the full test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh dev
export KERAS_BACKEND=torch HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
unset MLD_API_ENDPOINT MLD_API_KEY MLD_HOME
set +e
"$MLDBG_PY" -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: treating that as a failure" >&2
  exit 1
fi
exit "$status"

#!/usr/bin/env bash
# Set up the environment (with the [bench] extra) and run every benchmark: benchmarks/run_all.py writes one
# JSON file per benchmark and a summary (summary.json, summary.md: the README's Performance table) into
# benchmarks/results/. Arguments go to run_all.py (--quick, --only NAME,..., --list). About 40 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh bench
export KERAS_BACKEND=torch HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
unset MLD_API_ENDPOINT MLD_API_KEY MLD_HOME
exec "$MLDBG_PY" benchmarks/run_all.py "$@"

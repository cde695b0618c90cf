#!/usr/bin/env bash
# Set up the environment and run the demo: train a small classifier on scikit-learn's digits with
# ClassificationTracer, evaluate it, print the summary and write reports/demo.html.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh demo
export MLD_HOME="${MLD_HOME:-$PWD/mldbg}"
"$MLDBG_PY" examples/classification_sdk.py --epochs 8 --version-name "demo-$(date +%Y%m%d-%H%M%S)" --report reports/demo.html "$@"

#!/usr/bin/env bash
# One-call GPU verification of genflow (issue 18): build with GENFLOW_BUILD_CUDA=1, the CUDA tests,
# compute-sanitizer (memcheck, racecheck, synccheck) over the CUDA op tests, `genflow bench --device
# cuda` and the DESIGN.md §6 GPU targets, each stage within a time budget (under 9 minutes on an
# H100); writes OUT/report.json and OUT/report.md (bench/gpu_check.py has the details).
#
#   bash bench/gpu_check.sh OUT             # on a CUDA machine
#   bash bench/gpu_check.sh --dry-run OUT   # anywhere: runs what a CPU can, reports the rest as skipped
set -euo pipefail
cd "$(dirname "$0")/.."
dry=()
if [ "${1:-}" = "--dry-run" ]; then dry=(--dry-run); shift; fi
if [ $# -ne 1 ]; then
  echo "usage: bash bench/gpu_check.sh [--dry-run] OUT" >&2
  exit 2
fi
python=$(command -v python3 || command -v python)
PYTHONUNBUFFERED=1 exec "$python" bench/gpu_check.py run "$1" "${dry[@]}"

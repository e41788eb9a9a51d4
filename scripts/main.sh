#!/usr/bin/env bash
# Set up everything (venv, pinned stack, extension) and run the main job:
# vanilla TorchRec, LAIA and ESD train the same DLRM on the same batches, on
# 4 heterogeneous workers (1000/100/50/10 Mbit/s) + 1 parameter server, and a
# table shows each method's iteration time with the link time that really
# applies: over tc-shaped links in network namespaces when run as root with
# iproute2, otherwise measured compute + modelled link time (labelled so).
# Extra flags go to benchmarks/main_job.py (--steps, --bandwidths, --no-netns, --out).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
exec python benchmarks/main_job.py "$@"

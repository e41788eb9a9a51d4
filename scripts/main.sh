#!/usr/bin/env bash
# Set up everything (venv, pinned stack, extension) and run the main job: a
# small torchrun run of a DLRM on the embedded synthetic Criteo-like workload,
# vanilla TorchRec side by side with ESD (de-duplicated local search, HybridDis, LAIA-style greedy, random
# dispatch) on 4 heterogeneous workers (1000/100/50/10 Mbit/s) + 1 parameter server.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
exec torchrun --nproc_per_node 5 --master_port "${MASTER_PORT:-29517}" examples/dlrm_esd.py \
  --num-ps 1 --compare-vanilla --dispatchers esd,hybrid,laia,random --steps 20 --out results_main.json "$@"

#!/usr/bin/env bash
# Creates (or reuses) the local virtual environment, installs the pinned stack
# and builds/installs torchrec_esd in editable mode.  Sourced by scripts/main.sh
# and scripts/test.sh; idempotent and fast when nothing changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TORCHREC_ESD_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
PIP="python -m pip --disable-pip-version-check"

stack_id=$(cat "$ROOT/requirements.txt" "$ROOT/scripts/bootstrap.sh" | sha1sum | cut -c1-16)
if [ ! -f "$VENV/.esd-stack-$stack_id" ]; then
  echo "[bootstrap] installing the pinned stack (torch 2.13.0, fbgemm-gpu 1.8.0, torchrec 1.9.2)"
  $PIP install -q torch==2.13.0
  if python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    $PIP install -q fbgemm-gpu==1.8.0
  else
    $PIP install -q fbgemm-gpu-cpu==1.8.0
  fi
  # torchrec's metadata asks for the CUDA fbgemm-gpu: install it without deps
  # and its real runtime deps from requirements.txt.
  $PIP install -q --no-deps torchrec==1.9.2
  $PIP install -q -r "$ROOT/requirements.txt"
  rm -f "$VENV"/.esd-stack-*
  touch "$VENV/.esd-stack-$stack_id"
fi

ext_id=$( (cat "$ROOT/setup.py" "$ROOT/pyproject.toml"; find "$ROOT/csrc" -type f | sort | xargs cat) | sha1sum | cut -c1-16)
if [ ! -f "$VENV/.esd-ext-$ext_id" ] || ! (cd "$ROOT" && python -c 'import torch, torchrec_esd._C' 2>/dev/null); then
  echo "[bootstrap] building the torchrec_esd C++ extension (about a minute on 2 cores)"
  (cd "$ROOT" && MAX_JOBS="${MAX_JOBS:-2}" $PIP install -q --no-deps --no-build-isolation -e .)
  # editable installs may leave the built library only in build/: put it next to the sources
  (cd "$ROOT" && MAX_JOBS="${MAX_JOBS:-2}" python setup.py -q build_ext --inplace >/dev/null)
  rm -f "$VENV"/.esd-ext-*
  touch "$VENV/.esd-ext-$ext_id"
fi
python -c 'import torch, torchrec_esd._C' || { echo "[bootstrap] the extension does not load" >&2; exit 1; }

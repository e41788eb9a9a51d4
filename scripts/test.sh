#!/usr/bin/env bash
# Set up everything (venv, pinned stack, extension) and run the test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec python -m pytest -q -p no:cacheprovider tests "$@"

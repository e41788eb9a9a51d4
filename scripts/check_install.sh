#!/usr/bin/env bash
# Check that torchrec_esd installs as a package the documented way
# (pip install --no-build-isolation), without downloading anything:
#   1. build a wheel with `pip wheel --no-build-isolation --no-deps` and check
#      that it holds the package and its compiled extension torchrec_esd/_C;
#   2. install that wheel with --no-index into a throw-away virtual environment
#      that sees the project venv's packages (torch, torchrec, ... through a
#      .pth file), so pip must find every declared runtime dependency there;
#   3. import it from outside the source tree and run one C++ operator.
# Usage: bash scripts/check_install.sh   (after scripts/bootstrap.sh; about a
# minute on 2 cores, most of it compiling the extension)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TORCHREC_ESD_VENV:-$ROOT/.venv}"
[ -x "$VENV/bin/python" ] || { echo "no venv at $VENV: run scripts/bootstrap.sh first" >&2; exit 1; }
TMP="$(mktemp -d /tmp/esd_install_check.XXXXXX)"
trap 'rm -rf "$TMP"' EXIT
t0=$(date +%s)

SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# the source tree is copied so that no build/ or egg-info of the checkout is reused
mkdir "$TMP/src"
(cd "$ROOT" && git ls-files -z | xargs -0 -I{} cp --parents {} "$TMP/src/")
echo "[check_install] building the wheel (pip wheel --no-build-isolation --no-deps)"
(cd "$TMP/src" && MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/python" -m pip --disable-pip-version-check wheel -q \
   --no-build-isolation --no-deps -w "$TMP/dist" .)
WHEEL=$(ls "$TMP"/dist/torchrec_esd-*.whl)
"$VENV/bin/python" - "$WHEEL" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
ext = [n for n in names if n.startswith("torchrec_esd/_C") and n.endswith(".so")]
assert ext, f"no compiled extension torchrec_esd/_C*.so in {sys.argv[1]}"
for must in ("torchrec_esd/__init__.py", "torchrec_esd/distributed/runtime.py", "torchrec_esd/apps/trainer.py"):
    assert must in names, f"{must} missing from the wheel"
meta = [n for n in names if n.endswith("METADATA")][0]
reqs = [l for l in zipfile.ZipFile(sys.argv[1]).read(meta).decode().splitlines() if l.startswith("Requires-Dist")]
assert any("torchrec" in r for r in reqs) and any("torch" in r for r in reqs), reqs
print(f"[check_install] wheel ok: {ext[0]}, {len(names)} files, {len(reqs)} Requires-Dist")
PY

echo "[check_install] installing it into a throw-away venv that sees the project venv's packages"
"$VENV/bin/python" -m venv --without-pip "$TMP/venv"
TSITE=$("$TMP/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$SITE" > "$TSITE/_esd_shared_venv.pth"
# every runtime dependency the wheel declares must be satisfied by what is installed
"$TMP/venv/bin/python" - "$WHEEL" <<'PY'
import sys, zipfile
from importlib.metadata import PackageNotFoundError, version
from packaging.requirements import Requirement
z = zipfile.ZipFile(sys.argv[1])
meta = z.read([n for n in z.namelist() if n.endswith("METADATA")][0]).decode()
missing = []
for line in meta.splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    req = Requirement(line.split(":", 1)[1].strip())
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an optional extra
    try:
        have = version(req.name)
    except PackageNotFoundError:
        missing.append(f"{req} (not installed)")
        continue
    if not req.specifier.contains(have, prereleases=True):
        missing.append(f"{req} (have {have})")
assert not missing, f"declared runtime dependencies not satisfied: {missing}"
print("[check_install] every declared runtime dependency is installed")
PY
# --no-deps: torchrec's own metadata asks for the CUDA fbgemm-gpu, which a CPU
# machine replaces by fbgemm-gpu-cpu (README, "Install"); --no-index: nothing is downloaded
"$VENV/bin/python" -m pip --disable-pip-version-check --python "$TMP/venv/bin/python" install -q --no-index \
   --no-deps "$WHEEL"
(cd "$TMP" && "$TMP/venv/bin/python" - "$TSITE" <<'PY'
import sys
import torch
import torchrec_esd
from torchrec_esd import ops
where = torchrec_esd.__file__
assert where.startswith(sys.argv[1]), f"imported {where}, not the installed copy under {sys.argv[1]}"
assert ops.EXTENSION_LOADED, ops.EXTENSION_ERROR
import torchrec_esd._C  # noqa: F401  the compiled extension of the wheel
keys = torch.tensor([5, 3, 9], dtype=torch.int64)
slots = ops.id_table_lookup(ops.id_table_build(keys), torch.tensor([9, 4, 5]))
assert slots.tolist()[1] < 0 and slots.tolist()[0] >= 0 and slots.tolist()[2] >= 0, slots
print(f"[check_install] import ok from {where}")
PY
)
echo "[check_install] ok in $(( $(date +%s) - t0 )) s"

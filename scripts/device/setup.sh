# Sourced by the device scripts: $OUT exists, the carried wheels are installed into /tmp/site, and Python finds
# them, the project's sources and the repository root (for tests/ and bench/).
set -uo pipefail
OUT="${OUT:-/tmp/device-out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD/src:$PWD" PYTHONUNBUFFERED=1 MESH_LOG_LEVEL=warning

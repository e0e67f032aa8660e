#!/usr/bin/env bash
# Fetch the wheels that scripts/device/check.sh installs on the device machine, into .whl/ (git-ignored).
# Usage: scripts/device/wheels.sh [PYTHON_VERSION]   (default 3.12, the device image's Python)
set -euo pipefail
cd "$(dirname "$0")/../.."
version="${1:-3.12}"
dest=.whl
rm -rf "$dest" && mkdir -p "$dest"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pins=()
while read -r name; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  pin=$(cat requirements.lock requirements-dev.lock | grep -i -E "^${name//[-_]/[-_]}==") \
    || { echo "not in requirements.lock or requirements-dev.lock: $name" >&2; exit 1; }
  pins+=("$pin")
done < scripts/device/carried.txt
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  platforms+=(--platform "$tag")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
  "${platforms[@]}" -d "$dest" "${pins[@]}"
du -sh "$dest"

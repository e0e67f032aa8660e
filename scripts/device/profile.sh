#!/usr/bin/env bash
# Nsight Compute on the image kernels that miss their targets (the separable filters, the lookup table,
# grayscale), for the lent device machine; the report lands in $OUT/ncu.txt. Call the device tool's run with
#   command: bash scripts/device/profile.sh      timeout_s: 240
#   carry:   as for scripts/device/check.sh
# KERNELS (optional): an ncu kernel-name regex, default the three above.
source "$(dirname "$0")/setup.sh"
cat > /tmp/profile_kernels.py <<'PY'
"""One launch of each kernel under study on 4K frames (after a warm-up that compiles everything)."""
import cupy
import numpy as np
from mesh.services.image_processing.gpu_backend import GpuBackend
from mesh.services.image_processing.registry import validate_pipeline

backend = GpuBackend()
backend.warm_up()
rgb = np.random.default_rng(0).integers(0, 256, (2160, 3840, 3), dtype=np.uint8)
cupy.cuda.profiler.start()  # ncu runs with --profile-from-start off: the warm-up's small launches are left out
for image, pipeline in (
    (rgb[:, :, :1].copy(), [("gaussian_blur", {"sigma": 3.0})]),
    (rgb, [("gaussian_blur", {"sigma": 3.0})]),
    (rgb, [("invert", {})]),
    (rgb, [("grayscale", {})]),
):
    session = backend.start(image)
    session.run(validate_pipeline(pipeline))
    session.result()
cupy.cuda.profiler.stop()
PY
timeout 200 ncu --target-processes all --kernel-name "regex:${KERNELS:-sep_fused_r9|lut_apply|grayscale}" \
  --profile-from-start off --launch-count 8 --section SpeedOfLight --section MemoryWorkloadAnalysis \
  --section Occupancy --section LaunchStats --section WarpStateStats \
  python3 /tmp/profile_kernels.py > "$OUT/ncu.txt" 2>&1
echo "ncu rc=$?"
grep -E "sep_fused|lut_apply|grayscale|Duration|Memory Throughput|Compute \(SM\)|Achieved Occupancy|Registers|Stall" "$OUT/ncu.txt" | head -80

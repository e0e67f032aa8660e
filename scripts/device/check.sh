#!/usr/bin/env bash
# The GPU checks in one pass, for the lent device machine (its image has CuPy, NumPy and OpenCV; the rest
# travels as wheels). Results land in $OUT. From this machine, after `make proto` and
# `scripts/device/wheels.sh`, call the device tool's run with
#   command: bash scripts/device/check.sh      timeout_s: 470
#   carry:   [".whl", "src/mesh/common", "src/mesh/file", "src/mesh/image", "src/mesh/inference", "src/mesh/queue"]
# Every step has its own time limit, most important first, so that a slow step cannot starve the others
# (the device time of a session is 15 minutes, the machine's start included). STEPS="pytest-gpu bench-image"
# runs only the steps named. On 2026-12-04 an H200 machine started in about 30 s; pytest-gpu took 40-70 s,
# bench-image 7-11 s, bench-strip 23 s, bench-inference 25-36 s, eval 37 s; bench-gateway with every
# operation did not finish in 100 s (its results print only at the end), so it now measures predict alone.
source "$(dirname "$0")/setup.sh"

# STEPS (optional): the names of the steps to run, space-separated; all of them by default.
step() {  # step NAME SECONDS COMMAND...: run with a limit, output to $OUT/NAME.txt, a summary line here
  local name=$1 limit=$2
  shift 2
  if [[ -n "${STEPS:-}" && " $STEPS " != *" $name "* ]]; then return 0; fi
  local started=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - started)) s"
  tail -n 4 "$OUT/$name.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import cupy, numpy, cv2; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'cv2', cv2.__version__, 'devices', cupy.cuda.runtime.getDeviceCount())"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
# 1. Correctness: the CuPy paths against the CPU paths (filters, pipelines, strip reader verdicts, serving).
step pytest-gpu 100 python3 -m pytest -q -rfE --tb=short -m gpu -p no:cacheprovider \
  tests/image_processing/test_gpu.py tests/inference_strip/test_gpu.py tests/inference/test_strip_reader_serving.py
# 2. The image benchmarks on the GPU (kernels vs device copy, pipeline vs OpenCV, ProcessImage vs echo); the
#    CPU filters against OpenCV are measured on the development machine instead.
MESH_BENCH_IMAGE_SKIP_CPU=1 step bench-image 100 python3 -m bench image
# 3. The strip reader: one 1080p read, batches, and the served model's worker processes, on CPU and GPU.
step bench-strip 60 python3 -m bench strip
# 4. Serving: Predict at batch 1 and with dynamic batching, CPU and GPU; the strip reader's instances are
#    worker processes (models/strip-reader). Then the same with them as one thread of the server, for the
#    comparison (a copy of the model repository with instance_kind: thread).
step bench-inference 70 python3 -m bench inference
threads_models="$(mktemp -d)/models"
cp -r models "$threads_models"
sed -i 's/^instance_kind: process/instance_kind: thread/; s/^instance_count: auto/instance_count: 1/' \
  "$threads_models/strip-reader/1/config.yaml"
MESH_MODEL_DIR="$threads_models" step bench-inference-threads 70 python3 -m bench inference
# 5. Held-out accuracy and latency with the GPU reader beside the CPU one (a small split: the time is short).
step eval 45 python3 -m mesh.services.inference.evaluate --count 100
# 6. The gateway's added latency with cores to spare (the development machine has two); no PostgreSQL there,
#    so the file service is the test suite's fake, which the results name.
MESH_BENCH_GATEWAY_FAKES=file MESH_BENCH_GATEWAY_OPERATIONS=predict MESH_BENCH_GATEWAY_REQUESTS=100 \
  MESH_BENCH_GATEWAY_SECONDS=2 step bench-gateway 120 python3 -m bench gateway

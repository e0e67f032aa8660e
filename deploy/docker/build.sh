#!/usr/bin/env bash
# Build every mesh image from deploy/docker/Dockerfile and tag it as deploy/k8s expects.
#   deploy/docker/build.sh [REGISTRY] [VERSION]   (defaults: ghcr.io/mesh-project 0.1.0)
set -euo pipefail
registry=${1:-ghcr.io/mesh-project}
version=${2:-0.1.0}
cd "$(dirname "$0")/../.."
for target in file queue gateway image-processing inference; do
  docker build -f deploy/docker/Dockerfile --target "$target" -t "$registry/mesh-$target:$version" .
done
for target in image-processing inference; do
  docker build -f deploy/docker/Dockerfile --target "$target-cuda" -t "$registry/mesh-$target:$version-cuda12.6" .
done

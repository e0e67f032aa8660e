"""``make k8s-check``: render every overlay in deploy/k8s, validate it against a pinned Kubernetes version and
check the mesh's deployment policies, then lint deploy/docker/Dockerfile. Exits 1 with one line per violation.

kustomize renders when it is installed (``--renderer auto``); otherwise the project's renderer does, for the
subset of kustomize the manifests use (:mod:`mesh.tools.k8s_check.render`).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from mesh.tools.k8s_check import dockerfile, schema
from mesh.tools.k8s_check.checks import check_overlay
from mesh.tools.k8s_check.policy import Overlay, Violation
from mesh.tools.k8s_check.render import Manifest, RenderError, render

KUBERNETES_VERSION = "1.31.0"
DEFAULT_ROOT = Path("deploy/k8s")
DEFAULT_DOCKERFILE = Path("deploy/docker/Dockerfile")
# Overlays whose GPU-capable workloads must be scheduled on GPUs.
GPU_OVERLAYS = frozenset({"prod-gpu"})


def render_overlay(directory: Path, renderer: str) -> list[Manifest]:
    """The objects of one overlay, rendered by kustomize or by the built-in renderer."""
    kustomize = shutil.which("kustomize")
    if renderer == "kustomize" or (renderer == "auto" and kustomize):
        if not kustomize:
            raise RenderError("kustomize is not installed")
        output = subprocess.run(
            [kustomize, "build", str(directory)], check=True, capture_output=True, text=True, timeout=60
        ).stdout
        return [doc for doc in yaml.safe_load_all(output) if doc]
    return render(directory)


def check_directory(
    directory: Path, *, kubernetes_version: str, renderer: str = "builtin"
) -> list[Violation]:
    """Every schema error and policy violation of the overlay in ``directory``."""
    try:
        objects = render_overlay(directory, renderer)
    except (RenderError, subprocess.CalledProcessError) as error:
        return [Violation(str(directory), f"does not render: {error}")]
    violations = schema.validate_all(objects, kubernetes_version)
    overlay = Overlay(name=directory.name, objects=objects, gpu=directory.name in GPU_OVERLAYS)
    return [*violations, *check_overlay(overlay)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mesh.tools.k8s_check", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="directory holding overlays/")
    parser.add_argument("--overlay", action="append", help="check only this overlay (repeatable)")
    parser.add_argument("--kubernetes-version", default=KUBERNETES_VERSION)
    parser.add_argument("--renderer", choices=["auto", "builtin", "kustomize"], default="auto")
    parser.add_argument("--dockerfile", type=Path, default=DEFAULT_DOCKERFILE)
    args = parser.parse_args(argv)

    overlays_dir = args.root / "overlays"
    found = (
        sorted(p.name for p in overlays_dir.iterdir() if (p / "kustomization.yaml").is_file())
        if overlays_dir.is_dir()
        else []
    )
    if not found:
        print(f"k8s-check: no overlays under {overlays_dir}", file=sys.stderr)
        return 1
    unknown = [name for name in args.overlay or [] if name not in found]
    if unknown:
        parser.error(
            f"no overlay {', '.join(unknown)} under {overlays_dir}; the overlays are {', '.join(found)}"
        )
    names = args.overlay or found
    started = time.perf_counter()
    failed = False
    for name in names:
        violations = check_directory(
            overlays_dir / name, kubernetes_version=args.kubernetes_version, renderer=args.renderer
        )
        if violations:
            failed = True
            print(f"k8s-check: overlay {name}: {len(violations)} violation(s)", file=sys.stderr)
            for violation in violations:
                print(f"  - {violation}", file=sys.stderr)
        else:
            print(f"k8s-check: overlay {name}: ok (Kubernetes {args.kubernetes_version})")
    docker_violations = dockerfile.check(args.dockerfile, args.dockerfile.parent / "requirements-cuda.txt")
    if docker_violations:
        failed = True
        print(f"k8s-check: {args.dockerfile}: {len(docker_violations)} violation(s)", file=sys.stderr)
        for violation in docker_violations:
            print(f"  - {violation}", file=sys.stderr)
    else:
        print(f"k8s-check: {args.dockerfile}: ok")
    print(f"k8s-check: {len(names)} overlay(s) in {time.perf_counter() - started:.1f}s")
    return 1 if failed else 0

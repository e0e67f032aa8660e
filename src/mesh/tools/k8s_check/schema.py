"""Schema validation against a pinned Kubernetes version, offline (kubernetes-validate ships the schemas)."""

from __future__ import annotations

import kubernetes_validate

from mesh.tools.k8s_check.policy import Violation, ref
from mesh.tools.k8s_check.render import Manifest


def validate_all(objects: list[Manifest], kubernetes_version: str) -> list[Violation]:
    """One violation per object that the strict schema of ``kubernetes_version`` rejects."""
    violations = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, kubernetes_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path) or "(root)"
            violations.append(
                Violation(ref(obj), f"schema ({kubernetes_version}) at {path}: {error.message}")
            )
        except kubernetes_validate.SchemaNotFoundError as error:
            violations.append(Violation(ref(obj), f"schema: {error.message}"))
    return violations

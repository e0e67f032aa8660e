"""The rules for an image's labels, shared by the file service (which stores them) and the services that
store images through it (image processing's ``output.labels``), so that a bad label is refused, under the
caller's own field name, before any work is done.
"""

from __future__ import annotations

from collections.abc import Mapping

from mesh.kit import errors
from mesh.kit.text_fields import shown, text_problem

MAX_LABELS = 64
MAX_LABEL_KEY_CHARS = 128
MAX_LABEL_VALUE_CHARS = 1024


def label_violations(labels: Mapping[str, str], where: str) -> list[errors.FieldViolation]:
    """Every broken rule in ``labels``, each naming ``where[key]``."""
    if len(labels) > MAX_LABELS:
        return [errors.FieldViolation(where, f"has {len(labels)} entries; at most {MAX_LABELS} are allowed")]
    violations = []
    for key, value in sorted(labels.items()):
        field = f"{where}[{shown(key)!r}]"
        if not key:
            violations.append(
                errors.FieldViolation(
                    field, f"the key is empty; keys are 1 to {MAX_LABEL_KEY_CHARS} characters"
                )
            )
        elif problem := text_problem(key, MAX_LABEL_KEY_CHARS):
            violations.append(errors.FieldViolation(field, f"the key {problem}"))
        if len(value) > MAX_LABEL_VALUE_CHARS:
            violations.append(
                errors.FieldViolation(
                    field,
                    f"the value is {len(value)} characters; at most {MAX_LABEL_VALUE_CHARS} are allowed",
                )
            )
        elif "\x00" in value:
            # Values may hold any other text (a newline in a note is fine); PostgreSQL refuses NUL.
            violations.append(errors.FieldViolation(field, "the value holds NUL ('\\x00'); remove it"))
    return violations


def check_labels(labels: Mapping[str, str], where: str) -> dict[str, str]:
    """``labels`` as a dict, or INVALID_ARGUMENT naming every broken rule."""
    violations = label_violations(labels, where)
    if violations:
        raise errors.InvalidArgument(
            f"invalid labels: {errors.listing(violations)}", field_violations=violations
        )
    return dict(labels)

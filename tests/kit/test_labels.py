"""The label rules that the file service stores by and image processing checks its outputs against."""

from __future__ import annotations

import grpc
import pytest

from mesh.kit import errors
from mesh.kit.labels import MAX_LABELS, check_labels, label_violations


def test_good_labels_pass_and_come_back_as_a_dict() -> None:
    """Printable keys up to 128 characters and values up to 1024 (newlines allowed) pass unchanged."""
    labels = {"batch": "7", "k" * 128: "v" * 1024, "note": "line one\nline two"}
    assert check_labels(labels, "metadata.labels") == labels


@pytest.mark.parametrize(
    ("labels", "field", "words"),
    [
        ({"": "x"}, "metadata.labels['']", "the key is empty"),
        ({"k" * 129: "x"}, f"metadata.labels[{'k' * 40 + '…'!r}]", "the key is 129 characters"),
        ({"a\x00": "x"}, "metadata.labels['a\\x00']", "the key holds the control character"),
        ({"a\tb": "x"}, "metadata.labels['a\\tb']", "the key holds the control character '\\t'"),
        ({"a": "v" * 1025}, "metadata.labels['a']", "the value is 1025 characters"),
        ({"a": "b\x00"}, "metadata.labels['a']", "the value holds NUL"),
    ],
)
def test_each_broken_rule_is_named_under_the_callers_field(
    labels: dict[str, str], field: str, words: str
) -> None:
    """Each refusal names the label under the caller's field and says which rule it broke."""
    [violation] = label_violations(labels, "metadata.labels")
    assert violation.field == field
    assert words in violation.description


def test_every_bad_label_is_listed_in_one_invalid_argument() -> None:
    """All bad labels are named at once, in the message too, so a client fixes them in one round."""
    with pytest.raises(errors.InvalidArgument) as caught:
        check_labels({"": "x", "b": "\x00", "good": "yes"}, "output.labels")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in caught.value.field_violations] == ["output.labels['']", "output.labels['b']"]
    assert "output.labels['']: the key is empty" in caught.value.message


def test_too_many_labels_is_one_violation_on_the_map() -> None:
    """More than 64 labels is named on the map itself, not once per label."""
    violations = label_violations({f"k{i}": "v" for i in range(MAX_LABELS + 1)}, "metadata.labels")
    assert [(v.field, v.description) for v in violations] == [
        ("metadata.labels", "has 65 entries; at most 64 are allowed")
    ]

"""The kustomize-subset renderer."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.tools.k8s_check.render import Manifest, RenderError, render, split_image, strategic_merge


def _deployment(**container: object) -> Manifest:
    return {
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "template": {"spec": {"containers": [{"name": "x", **container}], "tolerations": [{"key": "a"}]}}
        },
    }


def test_strategic_merge_merges_containers_and_env_by_name() -> None:
    """Containers and env entries merge by name: a patch adds one variable and keeps the others."""
    base = _deployment(env=[{"name": "A", "value": "1"}, {"name": "B", "value": "2"}])
    patch = _deployment(env=[{"name": "B", "value": "3"}, {"name": "C", "value": "4"}])
    merged = strategic_merge(base, patch)
    env = merged["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env == [{"name": "A", "value": "1"}, {"name": "B", "value": "3"}, {"name": "C", "value": "4"}]


def test_strategic_merge_replaces_lists_without_merge_key_and_deletes_on_null() -> None:
    """Lists with no merge key (tolerations) are replaced; a null deletes the key."""
    base = _deployment(args=["--x"])
    patch: Manifest = {
        "spec": {
            "template": {"spec": {"tolerations": [{"key": "b"}], "containers": [{"name": "x", "args": None}]}}
        }
    }
    merged = strategic_merge(base, patch)
    spec = merged["spec"]["template"]["spec"]
    assert spec["tolerations"] == [{"key": "b"}]
    assert "args" not in spec["containers"][0]
    assert base["spec"]["template"]["spec"]["containers"][0]["args"] == ["--x"], "the base is not mutated"


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("mesh/file", ("mesh/file", None, None)),
        ("registry:5000/mesh/file:1.2", ("registry:5000/mesh/file", "1.2", None)),
        ("registry:5000/mesh/file", ("registry:5000/mesh/file", None, None)),
        ("ghcr.io/m/f:1@sha256:ab", ("ghcr.io/m/f", "1", "sha256:ab")),
    ],
)
def test_split_image_does_not_mistake_a_registry_port_for_a_tag(
    image: str, expected: tuple[str, str | None, str | None]
) -> None:
    """Image references split into name, tag and digest, with host:port registries intact."""
    assert split_image(image) == expected


def test_overlay_sets_namespace_labels_and_image_tags(prod_gpu: list[Manifest]) -> None:
    """prod-gpu renders namespaced objects with the part-of label and the CUDA image tag on the GPU services."""
    assert all(o["metadata"]["namespace"] == "mesh" for o in prod_gpu)
    deployments = [o for o in prod_gpu if o["kind"] == "Deployment"]
    assert all(o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mesh" for o in deployments)
    assert all(
        o["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mesh"
        for o in deployments
    )
    images = {
        o["metadata"]["name"]: o["spec"]["template"]["spec"]["containers"][0]["image"]
        for o in prod_gpu
        if o["kind"] == "Deployment"
    }
    assert images["inference"] == "ghcr.io/mesh-project/mesh-inference:0.1.0-cuda12.6"
    assert images["file"] == "ghcr.io/mesh-project/mesh-file:0.1.0"


def test_unsupported_kustomization_field_is_refused(tmp_path: Path) -> None:
    """A kustomization field the renderer does not implement fails loudly instead of being ignored."""
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(RenderError, match="namePrefix"):
        render(tmp_path)


def test_patch_without_target_is_refused(tmp_path: Path) -> None:
    """A patch naming an object that is not rendered is an error, as in kustomize."""
    (tmp_path / "kustomization.yaml").write_text("resources: [a.yaml]\npatches:\n  - path: p.yaml\n")
    (tmp_path / "a.yaml").write_text("kind: ConfigMap\napiVersion: v1\nmetadata: {name: a}\n")
    (tmp_path / "p.yaml").write_text("kind: ConfigMap\napiVersion: v1\nmetadata: {name: b}\n")
    with pytest.raises(RenderError, match="ConfigMap/b not found"):
        render(tmp_path)

"""A kustomize renderer for the subset of kustomize that ``deploy/k8s`` uses.

kustomize is a Go binary that cannot be installed everywhere the tests run, so ``make k8s-check`` falls back
to this renderer. It understands exactly these Kustomization fields and refuses any other, so the manifests
cannot drift into features it would silently ignore:

- ``resources``: YAML files (one or more documents) and directories holding a ``kustomization.yaml``;
- ``namespace``: set on every namespaced object;
- ``labels`` (``pairs``, ``includeTemplates``; ``includeSelectors`` must be false): added to every object's
  labels and, with ``includeTemplates``, to pod template labels;
- ``images`` (``name``, ``newName``, ``newTag``, ``digest``): container image overrides;
- ``patches`` with ``path`` only: strategic-merge patches matched by kind and name.

Transformers run in kustomize's order for these fields: the sub-kustomizations first, then this level's
patches, namespace, labels and images.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

Manifest = dict[str, Any]

KUSTOMIZATION_FILE = "kustomization.yaml"
SUPPORTED_FIELDS = frozenset({"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"})
CLUSTER_SCOPED_KINDS = frozenset(
    {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume"}
)
# Merge keys of the lists that strategic merge patches merge element-wise (from the Kubernetes API's
# patchMergeKey); every other list is replaced, as the API server and kustomize do.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}


class RenderError(Exception):
    """A kustomization this renderer cannot render (unsupported field, missing file or patch target)."""


def load_documents(path: Path) -> list[Manifest]:
    """Every non-empty YAML document in ``path``."""
    try:
        with path.open(encoding="utf-8") as handle:
            docs = [doc for doc in yaml.safe_load_all(handle) if doc is not None]
    except (OSError, yaml.YAMLError) as error:
        raise RenderError(f"{path}: {error}") from error
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "metadata" not in doc:
            raise RenderError(f"{path}: every document must be a Kubernetes object with kind and metadata")
    return docs


def render(directory: Path) -> list[Manifest]:
    """Render the kustomization in ``directory`` into a list of objects."""
    kustomization_path = directory / KUSTOMIZATION_FILE
    if not kustomization_path.is_file():
        raise RenderError(f"{directory}: no {KUSTOMIZATION_FILE}")
    with kustomization_path.open(encoding="utf-8") as handle:
        kustomization = yaml.safe_load(handle) or {}
    unsupported = sorted(set(kustomization) - SUPPORTED_FIELDS)
    if unsupported:
        raise RenderError(f"{kustomization_path}: unsupported fields {unsupported}")

    objects: list[Manifest] = []
    for entry in kustomization.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            objects.extend(render(target))
        else:
            objects.extend(load_documents(target))
    _reject_duplicates(objects, kustomization_path)

    for patch in kustomization.get("patches", []):
        if set(patch) != {"path"}:
            raise RenderError(f"{kustomization_path}: only `patches: - path: FILE` is supported, got {patch}")
        for patch_doc in load_documents(directory / patch["path"]):
            _apply_patch(objects, patch_doc, directory / patch["path"])

    namespace = kustomization.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED_KINDS:
                obj["metadata"]["namespace"] = namespace

    for label_set in kustomization.get("labels", []):
        _apply_labels(objects, label_set, kustomization_path)

    for image in kustomization.get("images", []):
        _apply_image(objects, image)
    return objects


def key_of(obj: Manifest) -> tuple[str, str]:
    """(kind, name): how patches find their target."""
    return obj["kind"], obj["metadata"]["name"]


def _reject_duplicates(objects: list[Manifest], where: Path) -> None:
    seen: set[tuple[str, str]] = set()
    for obj in objects:
        key = key_of(obj)
        if key in seen:
            raise RenderError(f"{where}: {key[0]}/{key[1]} is defined twice")
        seen.add(key)


def _apply_patch(objects: list[Manifest], patch: Manifest, where: Path) -> None:
    for index, obj in enumerate(objects):
        if key_of(obj) == key_of(patch):
            objects[index] = strategic_merge(obj, patch)
            return
    raise RenderError(f"{where}: patch target {patch['kind']}/{patch['metadata']['name']} not found")


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """Merge ``patch`` into a copy of ``base``: maps recursively, keyed lists by merge key, other lists replaced.

    A ``null`` in the patch deletes the key, as in a strategic merge patch.
    """
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        merge_key = MERGE_KEYS[field]
        merged_list = copy.deepcopy(base)
        for item in patch:
            match = next(
                (
                    i
                    for i, existing in enumerate(merged_list)
                    if existing.get(merge_key) == item.get(merge_key)
                ),
                None,
            )
            if match is None:
                merged_list.append(copy.deepcopy(item))
            else:
                merged_list[match] = strategic_merge(merged_list[match], item, field)
        return merged_list
    return copy.deepcopy(patch)


def _apply_labels(objects: list[Manifest], label_set: dict[str, Any], where: Path) -> None:
    if label_set.get("includeSelectors", False):
        raise RenderError(
            f"{where}: labels with includeSelectors are not supported (selectors are immutable)"
        )
    pairs = label_set.get("pairs", {})
    for obj in objects:
        obj["metadata"].setdefault("labels", {}).update(pairs)
        template = obj.get("spec", {}).get("template")
        if label_set.get("includeTemplates", False) and isinstance(template, dict):
            template.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of an image reference; a registry port is not mistaken for a tag."""
    name, _, digest = image.partition("@")
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    tag = None
    if colon > last_slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest or None


def containers_of(obj: Manifest) -> Iterable[Manifest]:
    """Every container and init container of a workload's pod template."""
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    yield from pod.get("initContainers", [])
    yield from pod.get("containers", [])


def _apply_image(objects: list[Manifest], override: dict[str, str]) -> None:
    for obj in objects:
        for container in containers_of(obj):
            name, tag, digest = split_image(container.get("image", ""))
            if name != override["name"]:
                continue
            name = override.get("newName", name)
            if "digest" in override:
                container["image"] = f"{name}@{override['digest']}"
                continue
            tag = override.get("newTag", tag)
            reference = f"{name}:{tag}" if tag else name
            container["image"] = f"{reference}@{digest}" if digest else reference

"""A small kustomize renderer for the subset of kustomize that deploy/k8s uses, so that the tests can
render the overlays offline with no kustomize binary (CI installs only from PyPI).

Supported, with kustomize's semantics (v5):
- ``resources``: YAML files inside the kustomization's directory, and directories holding a
  kustomization (rendered first, with their own transformations);
- ``configMapGenerator``: ``name``, ``files`` (``path`` or ``key=path``), ``literals`` (``KEY=value``)
  and ``options`` with ``labels`` and ``disableNameSuffixHash: true`` (hashed names are refused:
  rewriting the references to them is not implemented);
- ``patches``: JSON 6902 patches (inline ``patch`` or ``path``) with a ``target`` naming ``kind`` and
  ``name`` exactly (optionally ``group``/``version``); ops ``add``, ``remove``, ``replace`` and ``test``.
  A target that matches nothing is an error (kustomize ignores it; a typo should not pass here);
- ``namespace``: set on every namespaced resource (a Namespace object must already carry that name);
- ``labels``: ``pairs`` added to ``metadata.labels`` only (``includeSelectors``/``includeTemplates``
  must be false);
- ``replicas``: ``name`` + ``count`` on Deployments, StatefulSets, ReplicaSets;
- ``images``: ``name`` + ``newName`` and/or ``newTag`` or ``digest`` on every container and init
  container of a pod template.

Transformations run in kustomize's order: patches, namespace, labels, replicas, images.
Anything else in a kustomization raises :class:`UnsupportedKustomization`, so the manifests cannot
drift into features this renderer would get wrong. ``tests/deploy/test_kustomize.py`` checks the
renderer on its own and, where ``kubectl`` is installed, against ``kubectl kustomize``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "configMapGenerator",
    "patches",
    "namespace",
    "labels",
    "replicas",
    "images",
}
CLUSTER_SCOPED_KINDS = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "IngressClass",
    "RuntimeClass",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "APIService",
}
# Kinds whose namespace handling in kustomize goes beyond metadata.namespace: refused.
REFUSED_KINDS = {
    "RoleBinding",
    "ClusterRoleBinding",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
}
SCALABLE_KINDS = {"Deployment", "StatefulSet", "ReplicaSet", "ReplicationController"}
REGEX_CHARS = re.compile(r"[\\^$.*+?()\[\]{}|]")


class UnsupportedKustomization(Exception):
    """Raised when a kustomization uses something outside the supported subset, or is invalid."""


def render(directory: Path | str) -> list[dict[str, Any]]:
    """The resources ``kustomize build DIRECTORY`` would print, as dicts."""
    return _build(Path(directory).resolve(), stack=())


def resource_id(resource: dict[str, Any]) -> tuple[str, str, str, str]:
    meta = resource.get("metadata", {})
    return (resource.get("apiVersion", ""), resource["kind"], meta.get("namespace", ""), meta["name"])


def _build(root: Path, stack: tuple[Path, ...]) -> list[dict[str, Any]]:
    if root in stack:
        raise UnsupportedKustomization(f"kustomization cycle through {root}")
    kustomization = _load_kustomization(root)
    unknown = set(kustomization) - SUPPORTED_FIELDS
    if unknown:
        raise UnsupportedKustomization(f"{root}: unsupported kustomization fields {sorted(unknown)}")
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (root / entry).resolve()
        if path.is_dir():
            resources.extend(_build(path, (*stack, root)))
        else:
            _require_inside(root, path, "resource")
            resources.extend(_load_documents(path))
    resources.extend(_generate_configmaps(root, kustomization.get("configMapGenerator", [])))
    _check_unique(root, resources)
    for patch in kustomization.get("patches", []):
        _apply_patch(root, resources, patch)
    if "namespace" in kustomization:
        _set_namespace(resources, kustomization["namespace"])
    for entry in kustomization.get("labels", []):
        _add_labels(resources, entry)
    for entry in kustomization.get("replicas", []):
        _set_replicas(resources, entry)
    for entry in kustomization.get("images", []):
        _set_image(resources, entry)
    _check_unique(root, resources)
    return resources


def _load_kustomization(root: Path) -> dict[str, Any]:
    for name in KUSTOMIZATION_FILES:
        path = root / name
        if path.is_file():
            data = yaml.safe_load(path.read_text())
            if not isinstance(data, dict):
                raise UnsupportedKustomization(f"{path} is not a mapping")
            if data.get("kind", "Kustomization") != "Kustomization":
                raise UnsupportedKustomization(f"{path}: kind must be Kustomization")
            return data
    raise UnsupportedKustomization(f"no kustomization file in {root}")


def _require_inside(root: Path, path: Path, what: str) -> None:
    # kustomize's default load restrictor: files must be in or below the kustomization's directory.
    if not path.is_relative_to(root):
        raise UnsupportedKustomization(f"{what} {path} is not in or below {root}")
    if not path.is_file():
        raise UnsupportedKustomization(f"{what} {path} does not exist")


def _load_documents(path: Path) -> list[dict[str, Any]]:
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for doc in documents:
        if not isinstance(doc, dict) or "kind" not in doc or "name" not in doc.get("metadata", {}):
            raise UnsupportedKustomization(f"{path}: every document needs kind and metadata.name")
        if doc["kind"] in REFUSED_KINDS:
            raise UnsupportedKustomization(f"{path}: kind {doc['kind']} is not supported")
        if doc["kind"].endswith("List"):
            raise UnsupportedKustomization(f"{path}: List kinds are not supported")
    return documents


def _generate_configmaps(root: Path, generators: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    generated = []
    for generator in generators:
        unknown = set(generator) - {"name", "files", "literals", "options"}
        if unknown:
            raise UnsupportedKustomization(f"configMapGenerator fields {sorted(unknown)} are not supported")
        options = generator.get("options", {})
        if set(options) - {"disableNameSuffixHash", "labels"}:
            raise UnsupportedKustomization(f"configMapGenerator options {sorted(options)} are not supported")
        if options.get("disableNameSuffixHash") is not True:
            raise UnsupportedKustomization("configMapGenerator needs options.disableNameSuffixHash: true")
        data: dict[str, str] = {}
        for entry in generator.get("files", []):
            key, _, source = entry.partition("=") if "=" in entry else (Path(entry).name, "", entry)
            path = (root / source).resolve()
            _require_inside(root, path, "configMapGenerator file")
            data[key] = path.read_text()
        for entry in generator.get("literals", []):
            key, sep, value = entry.partition("=")
            if not sep:
                raise UnsupportedKustomization(f"literal {entry!r} is not KEY=value")
            data[key] = value
        metadata: dict[str, Any] = {"name": generator["name"]}
        if options.get("labels"):
            metadata["labels"] = dict(options["labels"])
        generated.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    return generated


def _check_unique(root: Path, resources: list[dict[str, Any]]) -> None:
    seen = set()
    for resource in resources:
        key = (resource["kind"], resource["metadata"].get("namespace", ""), resource["metadata"]["name"])
        if key in seen:
            raise UnsupportedKustomization(f"{root}: resource {key} is defined twice")
        seen.add(key)


# --- patches ----------------------------------------------------------------------------------------


def _apply_patch(root: Path, resources: list[dict[str, Any]], patch: dict[str, Any]) -> None:
    unknown = set(patch) - {"patch", "path", "target"}
    if unknown or ("patch" in patch) == ("path" in patch):
        raise UnsupportedKustomization(f"a patch needs exactly one of patch/path and a target: {patch}")
    if "path" in patch:
        path = (root / patch["path"]).resolve()
        _require_inside(root, path, "patch")
        text = path.read_text()
    else:
        text = patch["patch"]
    operations = yaml.safe_load(text)
    if not isinstance(operations, list):
        raise UnsupportedKustomization("only JSON 6902 patches (a list of operations) are supported")
    target = patch.get("target")
    if not isinstance(target, dict) or not {"kind", "name"} <= set(target):
        raise UnsupportedKustomization(f"patch target needs kind and name: {target}")
    if set(target) - {"kind", "name", "group", "version"}:
        raise UnsupportedKustomization(f"patch target fields {sorted(target)} are not supported")
    if REGEX_CHARS.search(target["name"]):
        raise UnsupportedKustomization(
            f"patch target name {target['name']!r}: regular expressions unsupported"
        )
    matched = [r for r in resources if _matches(r, target)]
    if not matched:
        raise UnsupportedKustomization(f"patch target {target} matches no resource")
    for resource in matched:
        for operation in operations:
            json_patch(resource, operation)


def _matches(resource: dict[str, Any], target: dict[str, Any]) -> bool:
    group, _, version = resource.get("apiVersion", "").rpartition("/")
    return (
        resource["kind"] == target["kind"]
        and resource["metadata"]["name"] == target["name"]
        and target.get("group", group) == group
        and target.get("version", version) == version
    )


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise UnsupportedKustomization(f"JSON pointer {path!r} must start with /")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _child(node: Any, token: str, path: str) -> Any:
    if isinstance(node, dict):
        if token not in node:
            raise UnsupportedKustomization(f"path {path}: no {token!r}")
        return node[token]
    if isinstance(node, list):
        index = _index(node, token, path)
        return node[index]
    raise UnsupportedKustomization(f"path {path}: {token!r} under a scalar")


def _index(node: list[Any], token: str, path: str, *, insert: bool = False) -> int:
    if token == "-" and insert:
        return len(node)
    if not token.isdigit():
        raise UnsupportedKustomization(f"path {path}: {token!r} is not a list index")
    index = int(token)
    if index > len(node) or (index == len(node) and not insert):
        raise UnsupportedKustomization(f"path {path}: index {index} out of range")
    return index


def json_patch(document: dict[str, Any], operation: dict[str, Any]) -> None:
    """Apply one RFC 6902 operation (add, remove, replace, test) in place."""
    op, path = operation.get("op"), operation.get("path", "")
    if op not in ("add", "remove", "replace", "test"):
        raise UnsupportedKustomization(f"JSON patch op {op!r} is not supported")
    tokens = _pointer(path)
    parent: Any = document
    for token in tokens[:-1]:
        parent = _child(parent, token, path)
    last = tokens[-1]
    if op == "test":
        if _child(parent, last, path) != operation["value"]:
            raise UnsupportedKustomization(f"test failed at {path}: {_child(parent, last, path)!r}")
        return
    if op == "remove":
        _child(parent, last, path)
        if isinstance(parent, dict):
            del parent[last]
        else:
            del parent[_index(parent, last, path)]
        return
    value = copy.deepcopy(operation["value"])
    if isinstance(parent, dict):
        if op == "replace" and last not in parent:
            raise UnsupportedKustomization(f"replace at {path}: nothing there")
        parent[last] = value
    elif isinstance(parent, list):
        if op == "add":
            parent.insert(_index(parent, last, path, insert=True), value)
        else:
            parent[_index(parent, last, path)] = value
    else:
        raise UnsupportedKustomization(f"path {path}: parent is a scalar")


# --- transformers -----------------------------------------------------------------------------------


def _set_namespace(resources: list[dict[str, Any]], namespace: str) -> None:
    for resource in resources:
        if resource["kind"] == "Namespace":
            if resource["metadata"]["name"] != namespace:
                raise UnsupportedKustomization("a Namespace resource must be named like the namespace field")
            continue
        if resource["kind"] in CLUSTER_SCOPED_KINDS:
            continue
        resource["metadata"]["namespace"] = namespace


def _add_labels(resources: list[dict[str, Any]], entry: dict[str, Any]) -> None:
    if set(entry) - {"pairs", "includeSelectors", "includeTemplates"}:
        raise UnsupportedKustomization(f"labels fields {sorted(entry)} are not supported")
    if entry.get("includeSelectors") or entry.get("includeTemplates"):
        raise UnsupportedKustomization("labels: includeSelectors/includeTemplates must be false")
    for resource in resources:
        labels = resource["metadata"].setdefault("labels", {})
        labels.update({str(k): str(v) for k, v in entry.get("pairs", {}).items()})


def _set_replicas(resources: list[dict[str, Any]], entry: dict[str, Any]) -> None:
    matched = [r for r in resources if r["kind"] in SCALABLE_KINDS and r["metadata"]["name"] == entry["name"]]
    if not matched:
        raise UnsupportedKustomization(f"replicas: no workload named {entry['name']}")
    for resource in matched:
        resource.setdefault("spec", {})["replicas"] = int(entry["count"])


def pod_specs(resource: dict[str, Any]) -> list[dict[str, Any]]:
    """The pod specs inside a resource (Pod, workloads, CronJob)."""
    spec = resource.get("spec", {})
    if resource["kind"] == "Pod":
        return [spec]
    if resource["kind"] == "CronJob":
        return [spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {})]
    template = spec.get("template", {})
    return [template["spec"]] if isinstance(template, dict) and "spec" in template else []


def split_image(image: str) -> tuple[str, str, str]:
    """``(name, tag, digest)`` of an image reference."""
    name, _, digest = image.partition("@")
    tag = ""
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest


def _set_image(resources: list[dict[str, Any]], entry: dict[str, Any]) -> None:
    if set(entry) - {"name", "newName", "newTag", "digest"}:
        raise UnsupportedKustomization(f"images fields {sorted(entry)} are not supported")
    if "newTag" in entry and "digest" in entry:
        raise UnsupportedKustomization("images: give newTag or digest, not both")
    for resource in resources:
        for spec in pod_specs(resource):
            for container in [*spec.get("containers", []), *spec.get("initContainers", [])]:
                name, tag, digest = split_image(container["image"])
                if name != entry["name"]:
                    continue
                new = str(entry.get("newName", name))
                if "digest" in entry:
                    container["image"] = f"{new}@{entry['digest']}"
                elif "newTag" in entry:
                    container["image"] = f"{new}:{entry['newTag']}"
                else:
                    suffix = (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
                    container["image"] = new + suffix

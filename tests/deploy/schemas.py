"""Offline schema validation of deployment files.

- Kubernetes built-in kinds: the JSON schemas bundled in the PyPI package ``kubernetes-validate``
  (strict variants: unknown fields are errors), with one validator per (version, kind) cached,
  which is what ``kubernetes_validate.validate`` does uncached.
- Custom resources (KEDA, Prometheus Operator): minimal schemas written for Kiln in
  ``data/crds/`` (strict on every field Kiln uses; the CRDs themselves are not on PyPI).
- Compose: ``data/compose-spec.json``, the Compose specification's schema.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import referencing
from kubernetes_validate import utils as kv

DATA = Path(__file__).parent / "data"
# The oldest Kubernetes Kiln supports (autoscaling/v2, policy/v1 PDBs, native sidecars unused) and
# the newest whose schemas the installed kubernetes-validate bundles.
K8S_VERSIONS = ("1.29", kv.major_minor(kv.latest_version()))


class SchemaNotFound(Exception):
    """Raised when neither Kubernetes nor data/crds has a schema for a resource's kind."""


@functools.cache
def _k8s_definitions(version: str) -> Any:
    return kv.schema_contents(
        f"kubernetes-json-schema/v{_schema_version(version)}-local-strict/_definitions.json", version
    )


@functools.cache
def _schema_version(version: str) -> str:
    return [v for v in kv.all_versions() if kv.major_minor(v) <= version][-1]


@functools.cache
def _k8s_validator(version: str, kind: str, api_version: str) -> jsonschema.Draft202012Validator:
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    filename = (
        f"kubernetes-json-schema/v{_schema_version(version)}-local-strict/{kind.lower()}-{group_version}.json"
    )
    try:
        schema = kv.schema_contents(filename, version)
    except FileNotFoundError as exc:
        raise SchemaNotFound(f"{kind} {api_version}") from exc
    definitions = referencing.Resource.from_contents(_k8s_definitions(version))
    registry = referencing.Resource.from_contents(schema) @ (definitions @ referencing.Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


@functools.cache
def _crd_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    path = DATA / "crds" / f"{api_version.replace('/', '_')}_{kind}.json"
    if not path.is_file():
        raise SchemaNotFound(f"{kind} {api_version}")
    schema = json.loads(path.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def is_custom_resource(resource: dict[str, Any]) -> bool:
    group = resource["apiVersion"].rpartition("/")[0]
    return "." in group and not group.endswith(".k8s.io")


def validate_k8s(resource: dict[str, Any]) -> list[str]:
    """Error messages (empty when valid) for one manifest, against every supported version."""
    if is_custom_resource(resource):
        validators = [("crd", _crd_validator(resource["apiVersion"], resource["kind"]))]
    else:
        validators = [(v, _k8s_validator(v, resource["kind"], resource["apiVersion"])) for v in K8S_VERSIONS]
    errors = []
    for version, validator in validators:
        for error in validator.iter_errors(resource):
            where = "/".join(str(p) for p in error.absolute_path)
            errors.append(
                f"{resource['kind']}/{resource['metadata']['name']} ({version}) at /{where}: {error.message}"
            )
    return errors


@functools.cache
def compose_validator() -> jsonschema.Draft7Validator:
    schema = json.loads((DATA / "compose-spec.json").read_text())
    return jsonschema.Draft7Validator(schema)

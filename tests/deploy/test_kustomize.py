"""The kustomize subset renderer (tests/deploy/kustomize.py): each feature, the refusals, and where a
kustomize binary exists (``kubectl kustomize``), byte-for-byte agreement on Kiln's overlays."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.deployfiles import OVERLAYS
from tests.deploy.kustomize import UnsupportedKustomization, json_patch, render, split_image

DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "web", "labels": {"app": "web"}},
    "spec": {
        "selector": {"matchLabels": {"app": "web"}},
        "template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {
                "containers": [{"name": "web", "image": "registry.example.com/web:1.0"}],
                "initContainers": [{"name": "init", "image": "busybox:1.36@sha256:" + "b" * 64}],
            },
        },
    },
}


def write(directory: Path, files: dict[str, object]) -> Path:
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        elif isinstance(content, list):
            path.write_text(yaml.safe_dump_all(content))
        else:
            path.write_text(yaml.safe_dump(content))
    return directory


def kustomization(**fields: object) -> dict[str, object]:
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", **fields}


def test_resources_namespace_labels_replicas_images(tmp_path):
    write(
        tmp_path / "base",
        {"app.yaml": [DEPLOYMENT], "kustomization.yaml": kustomization(resources=["app.yaml"])},
    )
    overlay = write(
        tmp_path / "overlay",
        {
            "ns.yaml": {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod"}},
            "kustomization.yaml": kustomization(
                resources=["../base", "ns.yaml"],
                namespace="prod",
                labels=[{"pairs": {"team": "a"}, "includeSelectors": False}],
                replicas=[{"name": "web", "count": 3}],
                images=[
                    {"name": "registry.example.com/web", "newTag": "2.0"},
                    {"name": "busybox", "newName": "mirror.example.com/busybox"},
                ],
            ),
        },
    )
    deployment, namespace = render(overlay)
    assert deployment["metadata"] == {
        "name": "web",
        "labels": {"app": "web", "team": "a"},
        "namespace": "prod",
    }
    assert deployment["spec"]["template"]["metadata"]["labels"] == {"app": "web"}, "no includeTemplates"
    assert deployment["spec"]["replicas"] == 3
    spec = deployment["spec"]["template"]["spec"]
    assert spec["containers"][0]["image"] == "registry.example.com/web:2.0"
    assert spec["initContainers"][0]["image"] == "mirror.example.com/busybox:1.36@sha256:" + "b" * 64
    assert "namespace" not in namespace["metadata"]


def test_json6902_patches(tmp_path):
    patch = """
- op: add
  path: /spec/template/spec/containers/0/args
  value: ["--x"]
- op: test
  path: /spec/template/spec/containers/0/name
  value: web
- op: replace
  path: /spec/template/spec/containers/0/image
  value: other:1
- op: remove
  path: /spec/template/spec/initContainers
- op: add
  path: /metadata/annotations
  value: {"a~b/c": "1"}
"""
    root = write(
        tmp_path,
        {
            "app.yaml": [DEPLOYMENT],
            "kustomization.yaml": kustomization(
                resources=["app.yaml"],
                patches=[{"target": {"kind": "Deployment", "name": "web"}, "patch": patch}],
            ),
        },
    )
    (deployment,) = render(root)
    spec = deployment["spec"]["template"]["spec"]
    assert spec["containers"][0]["args"] == ["--x"] and spec["containers"][0]["image"] == "other:1"
    assert "initContainers" not in spec
    document = {"a": [1, 2], "b~/c": 0}
    json_patch(document, {"op": "add", "path": "/a/-", "value": 3})
    json_patch(document, {"op": "add", "path": "/a/0", "value": 0})
    json_patch(document, {"op": "replace", "path": "/b~0~1c", "value": 1})
    assert document == {"a": [0, 1, 2, 3], "b~/c": 1}


def test_config_map_generator(tmp_path):
    root = write(
        tmp_path,
        {
            "dash.json": '{"a": 1}\n',
            "kustomization.yaml": kustomization(
                configMapGenerator=[
                    {
                        "name": "dash",
                        "files": ["dash.json", "renamed.json=dash.json"],
                        "literals": ["K=v=w"],
                        "options": {"disableNameSuffixHash": True, "labels": {"grafana_dashboard": "1"}},
                    }
                ]
            ),
        },
    )
    (config,) = render(root)
    assert config["metadata"] == {"name": "dash", "labels": {"grafana_dashboard": "1"}}
    assert config["data"] == {"dash.json": '{"a": 1}\n', "renamed.json": '{"a": 1}\n', "K": "v=w"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"commonLabels": {"a": "b"}}, "unsupported kustomization fields"),
        (
            {"patches": [{"target": {"kind": "Deployment", "name": "nope"}, "patch": "[]"}]},
            "matches no resource",
        ),
        ({"patches": [{"target": {"kind": "Deployment", "name": "web"}, "patch": "spec: {}"}]}, "JSON 6902"),
        (
            {"patches": [{"target": {"kind": "Deployment", "name": "we.*"}, "patch": "[]"}]},
            "regular expressions",
        ),
        (
            {
                "patches": [
                    {
                        "target": {"kind": "Deployment", "name": "web"},
                        "patch": "- {op: test, path: /metadata/name, value: other}",
                    }
                ]
            },
            "test failed",
        ),
        ({"labels": [{"pairs": {"a": "b"}, "includeSelectors": True}]}, "includeSelectors"),
        ({"images": [{"name": "x", "newTag": "1", "digest": "sha256:1"}]}, "not both"),
        ({"configMapGenerator": [{"name": "c", "literals": ["a=b"]}]}, "disableNameSuffixHash"),
        ({"resources": ["app.yaml", "app.yaml"]}, "defined twice"),
    ],
)
def test_refuses_what_it_does_not_support(tmp_path, fields, message):
    root = write(
        tmp_path, {"app.yaml": [DEPLOYMENT], "kustomization.yaml": kustomization(resources=["app.yaml"])}
    )
    write(root, {"kustomization.yaml": kustomization(**{"resources": ["app.yaml"], **fields})})
    with pytest.raises(UnsupportedKustomization, match=message):
        render(root)


def test_files_outside_the_kustomization_root_are_refused(tmp_path):
    write(tmp_path, {"outside.yaml": [DEPLOYMENT]})
    root = write(tmp_path / "k", {"kustomization.yaml": kustomization(resources=["../outside.yaml"])})
    with pytest.raises(UnsupportedKustomization, match="not in or below"):
        render(root)


def test_split_image():
    assert split_image("nginx") == ("nginx", "", "")
    assert split_image("localhost:5000/a/b:1.2") == ("localhost:5000/a/b", "1.2", "")
    assert split_image("r.io/x:1@sha256:ab") == ("r.io/x", "1", "sha256:ab")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl (kustomize) installed here")
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_agrees_with_kubectl_kustomize(overlay):
    result = subprocess.run(
        ["kubectl", "kustomize", str(OVERLAYS[overlay])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0 and "unknown command" in result.stderr:
        pytest.skip("this kubectl has no kustomize")
    assert result.returncode == 0, result.stderr
    theirs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    def key(resource: dict) -> tuple[str, str, str]:
        return (resource["kind"], resource["metadata"].get("namespace", ""), resource["metadata"]["name"])

    assert sorted(render(OVERLAYS[overlay]), key=key) == sorted(theirs, key=key)

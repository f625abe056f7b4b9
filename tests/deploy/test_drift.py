"""No drift between deployment files and code: every ``kiln`` command line, health check, and
environment variable in docker-compose.yml, the Dockerfiles and the rendered Kubernetes manifests is
accepted by Kiln's CLI (``kiln.cli.build_parser()``) and settings classes (``GatewaySettings``,
``WorkerSettings``, ``EngineSettings``), and their values load."""

from __future__ import annotations

import os
import re

import pytest

from tests.deploy.deployfiles import (
    DOCKERFILES,
    HEALTHCHECK_IN_IMAGE,
    KILN_EXTRA_ENV,
    OVERLAYS,
    THIRD_PARTY_ENV,
    all_settings_env,
    check_healthcheck_argv,
    check_kiln_argv,
    compose_argv,
    compose_resolved,
    compose_variables,
    container_argv,
    container_env,
    dockerfile_env,
    exec_form,
    final_stage,
    healthcheck_argv,
    kiln_containers,
    rendered,
    role_of,
    secret_values,
    settings_env,
)
from tests.deploy.dockerfile_lint import parse


def load_role_settings(role: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Build the settings ``kiln serve``/``kiln worker`` would build from this environment."""
    from api.settings import load_gateway_settings
    from engine.settings import load_settings
    from worker.settings import load_worker_settings

    for name in list(os.environ):
        if name.startswith("KILN_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("KILN_") and name not in KILN_EXTRA_ENV:
            monkeypatch.setenv(name, value)
    if role == "gateway":
        load_gateway_settings()
    else:
        load_worker_settings()
    load_settings()


def check_env_names(role: str, env: dict[str, str], where: str) -> None:
    kiln = {name for name in env if name.startswith("KILN_")}
    unknown = kiln - settings_env(role)
    assert not unknown, f"{where}: {sorted(unknown)} are not settings of the {role} (kiln {role})"
    others = set(env) - kiln - set(THIRD_PARTY_ENV)
    assert not others, f"{where}: {sorted(others)} are neither Kiln settings nor documented variables"


def test_the_checks_themselves_catch_drift():
    assert check_kiln_argv(["kiln", "worker", "--gpu", "0"]) is None
    assert check_kiln_argv(["kiln", "worker", "--gpus", "0"])
    assert check_kiln_argv(["kiln", "serve", "--gpu", "0"]), "a worker flag on the gateway"
    assert check_healthcheck_argv(["python", HEALTHCHECK_IN_IMAGE, "gateway", "--ready"]) is None
    assert check_healthcheck_argv(["python", HEALTHCHECK_IN_IMAGE, "scheduler"])
    assert "KILN_S3_PUBLIC_ENDPOINT_URL" in settings_env("gateway")
    assert "KILN_S3_PUBLIC_ENDPOINT_URL" not in settings_env("worker")
    assert "KILN_SOFT_SHUTDOWN_TIMEOUT_S" in settings_env("worker")
    with pytest.raises(AssertionError):
        check_env_names("worker", {"KILN_API_KEYS": "x"}, "probe")


# --- compose --------------------------------------------------------------------------------------


COMPOSE_SERVICES = sorted(
    name for name, service in compose_resolved()["services"].items() if "kiln-" in service["image"]
)


@pytest.mark.parametrize("name", COMPOSE_SERVICES)
def test_compose_commands_and_environment_exist_in_kiln(name, monkeypatch):
    service = compose_resolved()["services"][name]
    argv = compose_argv(service)
    assert check_kiln_argv(argv) is None, f"{name}: {check_kiln_argv(argv)}"
    role = role_of(argv)
    env = {key: str(value) for key, value in service["environment"].items()}
    check_env_names(role, env, f"docker-compose.yml {name}")
    load_role_settings(role, env, monkeypatch)
    test = healthcheck_argv(service["healthcheck"]["test"])
    assert check_healthcheck_argv(test) is None, f"{name}: {check_healthcheck_argv(test)}"
    assert test[2] == role


def test_compose_kiln_variables_are_kiln_settings():
    """A ${KILN_*} in the compose file (set in .env) must be a real setting, not a look-alike."""
    names = {name for name in compose_variables() if name.startswith("KILN_")}
    assert names and names <= all_settings_env(), names - all_settings_env()


# --- Dockerfiles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_command_healthcheck_and_env_exist_in_kiln(image, monkeypatch):
    final = final_stage(DOCKERFILES[image])
    (cmd,) = [i for i in final if i.keyword == "CMD"]
    argv = exec_form(cmd)
    assert check_kiln_argv(argv) is None
    role = role_of(argv)
    assert role == image
    (check,) = [i for i in final if i.keyword == "HEALTHCHECK"]
    assert check_healthcheck_argv(exec_form(check)) is None
    assert exec_form(check)[2] == role
    env = dockerfile_env(final)
    check_env_names(role, env, f"{DOCKERFILES[image].name}")
    load_role_settings(role, {**env, "KILN_INSECURE": "true"} if role == "gateway" else env, monkeypatch)
    copies = [i.args.split() for i in final if i.keyword == "COPY"]
    assert ["deploy/healthcheck.py", HEALTHCHECK_IN_IMAGE] in copies


def test_dockerfile_kiln_sources_match_the_packages():
    """The images copy every package pyproject.toml installs (and nothing is forgotten)."""
    from tests.deploy.deployfiles import pyproject

    packages = {p.rstrip("*") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]}
    for path in DOCKERFILES.values():
        copies = [i.args.split() for i in parse(path.read_text()) if i.keyword == "COPY"]
        sources = {
            word.rstrip("/") for words in copies if not words[0].startswith("--") for word in words[:-1]
        }
        assert packages | {"pyproject.toml", "README.md"} <= sources, f"{path.name}: {packages - sources}"


# --- Kubernetes -----------------------------------------------------------------------------------


K8S_CONTAINERS = [
    (overlay, resource["metadata"]["name"], container["name"])
    for overlay in sorted(OVERLAYS)
    for resource, container in kiln_containers(rendered(overlay))
]


@pytest.mark.parametrize(("overlay", "workload", "container_name"), K8S_CONTAINERS)
def test_k8s_commands_probes_and_environment_exist_in_kiln(overlay, workload, container_name, monkeypatch):
    resources = rendered(overlay)
    container = next(
        c
        for r, c in kiln_containers(resources)
        if r["metadata"]["name"] == workload and c["name"] == container_name
    )
    argv = container_argv(container)
    assert check_kiln_argv(argv) is None, f"{workload}: {check_kiln_argv(argv)}"
    role = role_of(argv)
    env = container_env(container, resources, secret_values(overlay))
    check_env_names(role, env, f"{overlay} {workload}")
    unexpanded = {k: v for k, v in env.items() if re.search(r"\$\(\w+\)", v)}
    assert not unexpanded, f"$(VAR) references defined too late or not at all: {unexpanded}"
    load_role_settings(role, env, monkeypatch)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = container.get(probe, {}).get("exec", {}).get("command")
        if command:
            assert check_healthcheck_argv(command) is None, f"{workload} {probe}"
            assert command[2] == role


def test_configmap_keys_are_settings_of_every_consumer():
    """A shared ConfigMap may only hold settings both roles read; gateway-only ones go elsewhere."""
    for overlay in OVERLAYS:
        resources = rendered(overlay)
        for _, container in kiln_containers(resources):
            role = role_of(container_argv(container))
            for source in container.get("envFrom", []):
                name = source["configMapRef"]["name"]
                (config,) = [
                    r for r in resources if r["kind"] == "ConfigMap" and r["metadata"]["name"] == name
                ]
                unknown = set(config["data"]) - settings_env(role)
                assert not unknown, f"{overlay}: ConfigMap {name} gives the {role} {unknown}"

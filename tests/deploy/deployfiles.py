"""Loading Kiln's deployment files, and what the code says is valid in them (commands, flags,
``KILN_*`` variables), for the drift tests."""

from __future__ import annotations

import functools
import importlib.util
import re
import shlex
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from tests.deploy.dockerfile_lint import Instruction, parse
from tests.deploy.kustomize import pod_specs, render

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_ENV_EXAMPLE = DEPLOY / "compose.env.example"
DOCKERFILES = {"gateway": DEPLOY / "Dockerfile.gateway", "worker": DEPLOY / "Dockerfile.worker"}
K8S = DEPLOY / "k8s"
OVERLAYS = {"gpu": K8S / "overlays" / "gpu", "cpu-dev": K8S / "overlays" / "cpu-dev"}
SECRET_EXAMPLE = K8S / "base" / "secret.example.yaml"
HEALTHCHECK_IN_IMAGE = "/opt/kiln/healthcheck.py"
KILN_IMAGE = re.compile(r"(^|/)kiln[-/](gateway|worker)(:|@|$)")

# Variables Kiln reads besides its settings classes' fields (kiln/cli.py, engine/settings.py).
KILN_EXTRA_ENV = {"KILN_CONFIG", "KILN_LOG_LEVEL"}
# Other variables the Kiln containers may carry, each for a documented reason (docs/deploy.md).
THIRD_PARTY_ENV = {
    "AWS_ACCESS_KEY_ID": "boto3 credentials for the object store",
    "AWS_SECRET_ACCESS_KEY": "boto3 credentials for the object store",
    "HF_HOME": "huggingface_hub cache (models fetched by name)",
    "PATH": "the image's virtual environment first",
    "PYTHONUNBUFFERED": "logs reach docker logs / kubectl logs at once",
    "PYTHONDONTWRITEBYTECODE": "no .pyc writes (read-only root file system)",
    "REDIS_PASSWORD": "Kubernetes only: expanded into KILN_REDIS_URL as $(REDIS_PASSWORD)",
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def healthcheck_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kiln_deploy_healthcheck", DEPLOY / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- what the code accepts ------------------------------------------------------------------------


def settings_env(role: str) -> set[str]:
    """Every KILN_* variable the ``kiln serve`` (role gateway) or ``kiln worker`` process reads."""
    from api.settings import GatewaySettings
    from engine.settings import EngineSettings
    from worker.settings import WorkerSettings

    classes: list[Any] = [{"gateway": GatewaySettings, "worker": WorkerSettings}[role], EngineSettings]
    if role == "gateway":
        try:  # the gateway's routing settings (api/routing.py), where that module exists
            from api.routing import RoutingSettings

            classes.append(RoutingSettings)
        except ImportError:
            pass
    fields = {name for settings_class in classes for name in settings_class.model_fields}
    return {f"KILN_{name.upper()}" for name in fields} | KILN_EXTRA_ENV


def all_settings_env() -> set[str]:
    return settings_env("gateway") | settings_env("worker")


def role_of(argv: list[str]) -> str:
    """gateway or worker, from a ``kiln`` command line."""
    assert argv[:1] == ["kiln"], f"not a kiln command: {argv}"
    subcommand = next((a for a in argv[1:] if not a.startswith("-")), "")
    return {"serve": "gateway", "worker": "worker"}[subcommand]


def check_kiln_argv(argv: list[str]) -> str | None:
    """None when ``kiln``'s parser accepts the command line, else the parser's complaint."""
    import contextlib
    import io

    from kiln.cli import build_parser

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            build_parser().parse_args(argv[1:])
    except SystemExit:
        return errors.getvalue().strip() or "rejected"
    return None


def check_healthcheck_argv(argv: list[str]) -> str | None:
    """None when argv runs the image's health check script with arguments it accepts."""
    if argv[:2] != ["python", HEALTHCHECK_IN_IMAGE]:
        return f"not {HEALTHCHECK_IN_IMAGE}: {argv}"
    import contextlib
    import io

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            healthcheck_module().build_parser().parse_args(argv[2:])
    except SystemExit:
        return errors.getvalue().strip() or "rejected"
    return None


# --- compose --------------------------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def interpolation_variables(text: str) -> dict[str, str]:
    """``${NAME...}`` references in a compose file: name -> operator (":?", ":-", "?", "-" or "")."""
    found: dict[str, str] = {}
    for match in _INTERPOLATION.finditer(text):
        expression = match.group("braced") or match.group("plain")
        if not expression:
            continue
        name, operator = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(:?[?-]|)", expression).groups()  # type: ignore[union-attr]
        if found.get(name, "") not in (":?", "?"):
            found[name] = operator
    return found


def strings(value: Any) -> list[str]:
    """Every string value in a parsed YAML document (where Compose interpolates; comments excluded)."""
    if isinstance(value, dict):
        return [s for item in value.values() for s in strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    return [value] if isinstance(value, str) else []


def compose_variables() -> dict[str, str]:
    """Variables the compose file interpolates, with their operators."""
    return interpolation_variables("\n".join(strings(compose_raw())))


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation (``$$``, ``$VAR``, ``${VAR}``, ``:-``/``-`` defaults, ``:?``/``?``)."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        expression = match.group("braced") or match.group("plain")
        parts = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[?-])(.*))?$", expression, re.S)
        assert parts, f"bad interpolation {match.group(0)}"
        name, operator, argument = parts.groups()
        current = env.get(name)
        if operator in (":-", "-"):
            empty = current is None or (operator == ":-" and current == "")
            return argument if empty else str(current)
        if operator in (":?", "?") and (current is None or (operator == ":?" and current == "")):
            raise KeyError(f"{name} is required: {argument}")
        return current or ""

    return _INTERPOLATION.sub(replace, value)


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


@functools.cache
def compose_raw() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


def compose_resolved() -> dict[str, Any]:
    """The compose file as Compose would see it with the example .env."""
    return interpolate(compose_raw(), read_env_file(COMPOSE_ENV_EXAMPLE))


def kiln_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if KILN_IMAGE.search(service.get("image", ""))
    }


def compose_argv(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command if isinstance(command, list) else shlex.split(command)


def healthcheck_argv(test: list[str] | str) -> list[str]:
    if isinstance(test, str):
        return shlex.split(test)
    assert test[0] in ("CMD", "CMD-SHELL"), test
    return test[1:] if test[0] == "CMD" else shlex.split(test[1])


# --- Dockerfiles ----------------------------------------------------------------------------------


def final_stage(path: Path) -> list[Instruction]:
    instructions = parse(path.read_text())
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def dockerfile_env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ENV":
            for word in shlex.split(instruction.args):
                name, _, value = word.partition("=")
                env[name] = value
    return env


def exec_form(instruction: Instruction) -> list[str]:
    import json

    args = instruction.args
    if instruction.keyword == "HEALTHCHECK":
        args = args[args.index("CMD") + 3 :].strip()
    value = json.loads(args)
    assert isinstance(value, list), instruction
    return value


# --- Kubernetes -----------------------------------------------------------------------------------


@functools.cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(render(OVERLAYS[overlay]))


def find(resources: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    matches = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def containers(resource: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        c
        for spec in pod_specs(resource)
        for c in [*spec.get("containers", []), *spec.get("initContainers", [])]
    ]


def kiln_containers(resources: tuple[dict[str, Any], ...]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(resource, container) for every container running a Kiln image."""
    return [(r, c) for r in resources for c in containers(r) if KILN_IMAGE.search(c["image"])]


def container_env(
    container: dict[str, Any],
    resources: tuple[dict[str, Any], ...],
    secrets: dict[str, str],
    pod_name: str = "kiln-worker-0",
) -> dict[str, str]:
    """A container's environment as the kubelet builds it: envFrom first, then env with
    secretKeyRef/configMapKeyRef/fieldRef resolved and $(VAR) expanded."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(resources, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
        else:
            env.update(secrets)
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"]
            )
            continue
        source = item["valueFrom"]
        if "secretKeyRef" in source:
            env[item["name"]] = secrets[source["secretKeyRef"]["key"]]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[item["name"]] = find(resources, "ConfigMap", ref["name"])["data"][ref["key"]]
        elif "fieldRef" in source:
            env[item["name"]] = pod_name
        else:
            raise AssertionError(f"unhandled env source {source}")
    return env


def secret_values(overlay: str) -> dict[str, str]:
    """The kiln-secrets values an overlay runs with: its own Secret, else the example's placeholders."""
    in_overlay = [
        r for r in rendered(overlay) if r["kind"] == "Secret" and r["metadata"]["name"] == "kiln-secrets"
    ]
    secret = in_overlay[0] if in_overlay else load_yaml(SECRET_EXAMPLE)
    return dict(secret["stringData"])


def container_argv(container: dict[str, Any]) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]

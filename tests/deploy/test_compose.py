"""docker-compose.yml: valid against the Compose specification, and built the way docs/deploy.md
says (durable Redis, pinned images, one worker per GPU, required secrets, health-gated start)."""

from __future__ import annotations

import re

import pytest

from tests.deploy.deployfiles import (
    COMPOSE_ENV_EXAMPLE,
    ROOT,
    compose_argv,
    compose_raw,
    compose_resolved,
    compose_variables,
    interpolate,
    kiln_services,
    read_env_file,
    role_of,
)
from tests.deploy.schemas import compose_validator

SECRET_NAME = re.compile(r"(KEY|SECRET|PASSWORD|TOKEN)")
ONE_SHOT = {"minio-init"}


def duration_s(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_file_matches_the_compose_specification_schema():
    errors = sorted(compose_validator().iter_errors(compose_raw()), key=lambda e: list(e.path))
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]


def test_compose_file_is_still_valid_after_interpolation():
    errors = list(compose_validator().iter_errors(compose_resolved()))
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]


def test_interpolation_follows_compose_rules():
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("$$HOME ${SET} $SET ${EMPTY:-d} ${EMPTY-d} ${UNSET-d}", env) == "$HOME v v d  d"
    with pytest.raises(KeyError, match="UNSET is required: give it"):
        interpolate("${UNSET:?give it}", env)
    with pytest.raises(KeyError):
        interpolate("${EMPTY:?no}", env)


def test_secrets_are_required_variables_never_defaults():
    variables = compose_variables()
    secrets = {name for name in variables if SECRET_NAME.search(name)}
    assert {"REDIS_PASSWORD", "S3_SECRET_ACCESS_KEY", "MINIO_ROOT_PASSWORD", "KILN_SIGNING_SECRET"} <= secrets
    assert "KILN_API_KEYS" in variables and variables["KILN_API_KEYS"] == ":?"
    assert {name: variables[name] for name in secrets} == dict.fromkeys(secrets, ":?")
    # Secret-looking environment entries are all filled from a required variable.
    for name, service in compose_raw()["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key) or key == "KILN_API_KEYS":
                assert re.fullmatch(r".*\$\{[A-Z_0-9]+:\?[^}]*\}.*", str(value)), (name, key, value)


def test_the_example_env_file_covers_every_required_variable():
    required = {name for name, op in compose_variables().items() if op == ":?"}
    example = read_env_file(COMPOSE_ENV_EXAMPLE)
    assert required <= set(example), required - set(example)
    documented = {
        line.lstrip("# ").partition("=")[0]
        for line in COMPOSE_ENV_EXAMPLE.read_text().splitlines()
        if re.match(r"#? ?[A-Z][A-Z0-9_]*=", line)
    }
    used = set(compose_variables()) | {"COMPOSE_PROFILES"}
    assert documented <= used, f"example variables the compose file never uses: {documented - used}"
    with pytest.raises(KeyError):
        interpolate(compose_raw(), {})


def test_every_image_is_pinned():
    for name, service in compose_raw()["services"].items():
        image = service["image"]
        assert not image.endswith(":latest") and ":" in image, (name, image)
        if name in kiln_services(compose_raw()):
            assert re.search(r":\d+\.\d+\.\d+$", image), (name, image)  # built here, versioned tag
        else:
            assert re.search(r":[\w.-]+@sha256:[0-9a-f]{64}$", image), (name, image)  # tag and digest


def test_redis_is_durable_and_never_evicts():
    redis = compose_raw()["services"]["redis"]
    command = " ".join(str(part) for part in redis["command"])
    assert "--appendonly yes" in command
    assert re.search(r"--appendfsync (always|everysec)", command)
    assert "--maxmemory-policy noeviction" in command
    assert re.search(r"--maxmemory \S+", command), "noeviction only matters with a memory limit"
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert "redis-data" in compose_raw()["volumes"]


def test_bucket_is_created_before_kiln_starts():
    services = compose_raw()["services"]
    init = services["minio-init"]
    script = init["command"][0]
    assert "mc mb --ignore-existing" in script
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert init["restart"] == "no"
    for name in kiln_services(compose_raw()):
        depends = services[name]["depends_on"]
        assert depends["minio-init"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name
        assert services[name]["environment"].get("KILN_STORAGE_CREATE_BUCKET", "false") == "false"


def test_long_running_services_have_healthchecks():
    for name, service in compose_raw()["services"].items():
        if name not in ONE_SHOT:
            assert service.get("healthcheck", {}).get("test"), name


def test_one_worker_per_gpu_with_its_own_device():
    compose = compose_resolved()
    gpu_workers = {n: s for n, s in compose["services"].items() if n.startswith("worker-gpu")}
    assert len(gpu_workers) >= 2
    seen_devices, seen_ids = set(), set()
    for name, service in gpu_workers.items():
        index = name.removeprefix("worker-gpu")
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
        assert device["device_ids"] == [index], name
        assert "count" not in device, "count and device_ids are exclusive"
        # The container sees its one GPU as index 0.
        assert compose_argv(service) == ["kiln", "worker", "--gpu", "0"], name
        seen_devices.add(index)
        seen_ids.add(service["environment"]["KILN_WORKER_ID"])
    assert len(seen_devices) == len(seen_ids) == len(gpu_workers)
    # Plain `docker compose up` starts exactly the first GPU worker; more GPUs opt in by profile.
    assert "profiles" not in gpu_workers["worker-gpu0"]
    assert all("profiles" in s for n, s in gpu_workers.items() if n != "worker-gpu0")


def test_cpu_worker_sits_behind_the_cpu_profile():
    cpu = compose_resolved()["services"]["worker-cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert "deploy" not in cpu
    assert compose_argv(cpu) == ["kiln", "worker", "--device", "cpu"]


def test_workers_share_the_models_read_only():
    compose = compose_resolved()
    for name, service in kiln_services(compose).items():
        if role_of(compose_argv(service)) != "worker":
            continue
        mounts = [v for v in service["volumes"] if v.split(":")[1] == "/models"]
        assert len(mounts) == 1 and mounts[0].endswith(":ro"), (name, service["volumes"])
        assert service["environment"]["KILN_MODELS_DIRS"] == "/models", name


def test_worker_stop_grace_outlasts_the_soft_shutdown():
    compose = compose_resolved()
    for name, service in kiln_services(compose).items():
        if role_of(compose_argv(service)) != "worker":
            continue
        env = service["environment"]
        drain = float(env["KILN_SOFT_SHUTDOWN_TIMEOUT_S"]) + float(env["KILN_CANCEL_GRACE_S"])
        assert duration_s(service["stop_grace_period"]) >= drain + 20, name


def test_only_the_gateway_and_object_store_are_published():
    published = {name for name, s in compose_raw()["services"].items() if s.get("ports")}
    assert published == {"gateway", "minio"}


def test_readme_shows_docker_compose_up():
    readme = (ROOT / "README.md").read_text()
    assert "docker compose up" in readme
    assert "docs/deploy.md" in readme

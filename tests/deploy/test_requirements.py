"""deploy/requirements/*.txt, the images' pinned package sets: complete for Kiln's dependencies,
torch-free for the gateway, consistent with pyproject.toml and the Makefile's torch pin."""

from __future__ import annotations

import re

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.deploy.deployfiles import DEPLOY, ROOT, pyproject

LOCKS = {"gateway": DEPLOY / "requirements" / "gateway.txt", "worker": DEPLOY / "requirements" / "worker.txt"}
# Runtime dependencies the gateway never imports (api/ must not import torch; celery is the workers').
WORKER_ONLY = {"torch", "torchsde", "safetensors", "huggingface-hub", "celery"}
TORCH_FAMILY = re.compile(r"^(torch.*|triton|nvidia-.*|cuda-.*|celery|kombu|billiard)$")


def pins(role: str) -> dict[str, Version]:
    result = {}
    for line in LOCKS[role].read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", line)
        assert match, f"{LOCKS[role].name}: {line!r} is not name==version"
        name = canonicalize_name(match.group(1))
        assert name not in result, f"{name} pinned twice"
        result[name] = Version(match.group(2))
    return result


def runtime_requirements() -> list[Requirement]:
    return [Requirement(spec) for spec in pyproject()["project"]["dependencies"]]


@pytest.mark.parametrize("role", sorted(LOCKS))
def test_every_line_is_an_exact_pin(role):
    assert pins(role)


@pytest.mark.parametrize("role", sorted(LOCKS))
def test_pins_satisfy_pyproject_and_cover_the_role(role):
    pinned = pins(role)
    for requirement in runtime_requirements():
        name = canonicalize_name(requirement.name)
        if role == "gateway" and name in WORKER_ONLY:
            continue
        assert name in pinned, f"{role}: {name} missing"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (name, pinned[name])
        for extra in requirement.extras:  # uvicorn[standard], celery[redis]: their extras are in too
            assert {"uvicorn": {"uvloop", "httptools", "websockets", "watchfiles"}, "celery": {"redis"}}[
                name
            ] <= set(pinned), (name, extra)


def test_gateway_lock_has_no_torch_and_no_celery():
    heavy = sorted(name for name in pins("gateway") if TORCH_FAMILY.match(name))
    assert heavy == []


def test_shared_packages_have_the_same_version_in_both_images():
    gateway, worker = pins("gateway"), pins("worker")
    differing = {
        name: (gateway[name], worker[name])
        for name in gateway.keys() & worker.keys()
        if gateway[name] != worker[name]
    }
    assert not differing


def test_worker_torch_matches_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    torch_spec = re.search(r"^TORCH_SPEC \?= torch==(\S+)", makefile, re.M)
    assert torch_spec, "TORCH_SPEC not found in the Makefile"
    assert pins("worker")["torch"] == Version(torch_spec.group(1))

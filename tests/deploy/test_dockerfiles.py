"""The Dockerfiles pass the documented lint (tests/deploy/dockerfile_lint.py, rules listed in
docs/deploy.md), and every rule of that lint catches what it is meant to catch."""

from __future__ import annotations

import re

import pytest

from tests.deploy.deployfiles import DEPLOY, DOCKERFILES, ROOT, final_stage
from tests.deploy.dockerfile_lint import RULES, lint, lint_file, parse

DIGEST = "sha256:" + "a" * 64
GOOD = f"""\
FROM python:3.11-slim@{DIGEST} AS build
WORKDIR /src
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt && pip install --no-cache-dir --no-deps .
FROM python:3.11-slim@{DIGEST}
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
HEALTHCHECK --interval=30s CMD ["python", "-c", "print(1)"]
CMD ["kiln", "serve"]
"""


def rules_of(text: str) -> set[str]:
    return {violation.rule for violation in lint(text)}


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfiles_pass_the_lint(image):
    violations = lint_file(DOCKERFILES[image])
    assert not violations, "\n".join(str(v) for v in violations)


def test_the_good_example_passes():
    assert rules_of(GOOD) == set()


@pytest.mark.parametrize(
    ("rule", "old", "new"),
    [
        ("DL3000", "WORKDIR /src", "WORKDIR src"),
        ("DL3002", "USER 10001:10001", "USER root"),
        ("DL3003", "RUN pip install", "RUN cd /src && pip install"),
        ("DL3004", "RUN pip install", "RUN sudo true && pip install"),
        ("DL3006", f"FROM python:3.11-slim@{DIGEST} AS build", "FROM python AS build"),
        ("DL3007", f"FROM python:3.11-slim@{DIGEST} AS build", f"FROM python:latest@{DIGEST} AS build"),
        ("DL3013", "--no-deps .", "--no-deps requests"),
        ("DL3020", "COPY requirements.txt ./", "ADD requirements.txt ./"),
        ("DL3025", 'CMD ["kiln", "serve"]', "CMD kiln serve"),
        ("DL3042", "pip install --no-cache-dir -r", "pip install -r"),
        ("DL3045", "WORKDIR /src\nCOPY requirements.txt ./", "COPY requirements.txt ./\nWORKDIR /src"),
        ("DL4006", "RUN pip install", "RUN echo x | tee y && pip install"),
        ("KL001", f"FROM python:3.11-slim@{DIGEST}\n", "FROM python:3.11-slim\n"),
        ("KL002", "USER 10001:10001", "USER kiln"),
        ("KL003", 'HEALTHCHECK --interval=30s CMD ["python", "-c", "print(1)"]', "HEALTHCHECK CMD curl -f x"),
    ],
)
def test_each_rule_catches_its_mistake(rule, old, new):
    assert old in GOOD
    assert rule in rules_of(GOOD.replace(old, new)), rule


@pytest.mark.parametrize(
    ("rules", "run"),
    [
        ({"DL3008", "DL3009", "DL3014", "DL3015"}, "RUN apt-get update && apt-get install curl"),
        (
            {"DL3008"},
            "RUN apt-get update && apt-get install -y --no-install-recommends curl \\\n"
            "    && rm -rf /var/lib/apt/lists/*",
        ),
        (
            set(),
            "RUN apt-get update && apt-get install -y --no-install-recommends curl=7.88.1-10 \\\n"
            "    && rm -rf /var/lib/apt/lists/*",
        ),
        (
            set(),
            "# hadolint ignore=DL3008 -- the base image's snapshot pins it\n"
            "RUN apt-get update && apt-get install -y --no-install-recommends curl \\\n"
            "    && rm -rf /var/lib/apt/lists/*",
        ),
        (set(), 'RUN python -c "import sys; print(sys.argv | 1)" || true'),
        (set(), 'SHELL ["/bin/bash", "-o", "pipefail", "-c"]\nRUN echo x | tee y'),
    ],
)
def test_apt_rules_and_ignores(rules, run):
    text = GOOD.replace("COPY --from=build", f"{run}\nCOPY --from=build")
    assert rules_of(text) == rules


def test_missing_user_healthcheck_and_single_stage():
    single = f'FROM python:3.11-slim@{DIGEST}\nCMD ["kiln"]\n'
    assert {"KL002", "KL003", "KL004"} <= rules_of(single)


def test_parser_joins_continuations_and_tracks_stages():
    instructions = parse(GOOD.replace("RUN pip install", "RUN true \\\n    && pip install"))
    runs = [i for i in instructions if i.keyword == "RUN"]
    assert runs[0].args.startswith("true && pip install")
    assert [i.stage for i in instructions if i.keyword == "FROM"] == [0, 1]


def test_the_rules_are_documented():
    docs = (ROOT / "docs" / "deploy.md").read_text()
    documented = set(re.findall(r"\b(DL\d{4}|KL\d{3})\b", docs))
    assert documented == set(RULES), (
        f"undocumented {set(RULES) - documented}, stale {documented - set(RULES)}"
    )


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_images_run_as_the_same_non_root_user_as_the_manifests(image):
    from tests.deploy.deployfiles import find, rendered

    (user,) = [i.args for i in final_stage(DOCKERFILES[image]) if i.keyword == "USER"]
    uid = int(user.split(":")[0])
    deployment = find(rendered("gpu"), "Deployment", f"kiln-{image}")
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_build_context_is_an_allow_list(image):
    ignore = (DEPLOY / f"Dockerfile.{image}.dockerignore").read_text().splitlines()
    entries = [line for line in ignore if line and not line.startswith("#")]
    assert entries[0] == "*"
    assert {"!api/", "!engine/", "!worker/", "!kiln/", "!pyproject.toml", "!README.md"} <= set(entries)
    assert "!deploy/healthcheck.py" in entries and "!deploy/requirements/" in entries

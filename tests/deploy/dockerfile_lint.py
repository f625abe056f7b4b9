"""A Dockerfile linter for Kiln's images: hadolint's main rules (same ids, same meaning) plus a few
of Kiln's own (``KL``), implemented here so that CI needs no hadolint binary. docs/deploy.md lists
the rules; a test keeps that list and :data:`RULES` equal.

Suppress a rule for one instruction the way hadolint does, with a justification after it:
``# hadolint ignore=DL3008 -- reason`` on the line before the instruction.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

RULES = {
    "DL3000": "Use absolute WORKDIR.",
    "DL3002": "The last USER of the final stage must not be root.",
    "DL3003": "Use WORKDIR to switch directory, not cd in RUN.",
    "DL3004": "Do not use sudo.",
    "DL3006": "Always tag the version of a base image explicitly.",
    "DL3007": "Do not use the latest tag.",
    "DL3008": "Pin versions in apt-get install (pkg=version), or justify the exception.",
    "DL3009": "Delete the apt lists (rm -rf /var/lib/apt/lists/*) in the RUN that installs.",
    "DL3013": "Pin versions in pip install (name==version), or install from a lock file/path.",
    "DL3014": "Use apt-get install -y.",
    "DL3015": "Use apt-get install --no-install-recommends.",
    "DL3020": "Use COPY instead of ADD for files and folders.",
    "DL3025": "Use JSON (exec form) for CMD and ENTRYPOINT.",
    "DL3042": "Use pip install --no-cache-dir.",
    "DL3045": "COPY to a relative destination needs a WORKDIR first.",
    "DL4006": "Set SHELL with -o pipefail before a RUN that pipes.",
    "KL001": "Pin external base images by digest (image:tag@sha256:...).",
    "KL002": "The final stage must set USER to a numeric non-root UID (runAsNonRoot can verify it).",
    "KL003": "The final stage must have a HEALTHCHECK in exec form.",
    "KL004": "Build in more than one stage (a build stage and a runtime stage).",
}

ROOT_USERS = {"root", "0"}


@dataclass
class Instruction:
    line: int
    keyword: str
    args: str
    stage: int
    ignored: set[str] = field(default_factory=set)


@dataclass
class Violation:
    rule: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.rule} {RULES[self.rule]} ({self.message})"


Report = Callable[["Instruction", str, str], None]


def parse(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined, comments dropped, hadolint ignores attached."""
    instructions: list[Instruction] = []
    pending_ignores: set[str] = set()
    buffer: list[str] = []
    start = 0
    stage = -1
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#"):
            match = re.match(r"#\s*hadolint\s+ignore=([A-Z0-9,]+)", stripped)
            if match and not buffer:
                pending_ignores |= set(match.group(1).split(","))
            continue
        if not stripped and not buffer:
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1])
            continue
        buffer.append(stripped)
        logical = " ".join(part.strip() for part in buffer if part.strip())
        buffer = []
        keyword, _, args = logical.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(start, keyword, args.strip(), stage, pending_ignores))
        pending_ignores = set()
    return instructions


def _exec_form(args: str) -> list[str] | None:
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def _without_quotes(script: str) -> str:
    """The script with the inside of quoted strings blanked out, same length (so a '|' inside
    python -c "..." is no pipe, and positions still match the script)."""
    return re.sub(
        r"'[^']*'|\"(?:\\.|[^\"\\])*\"",
        lambda m: m.group(0)[0] + "_" * (len(m.group(0)) - 2) + m.group(0)[-1],
        script,
    )


def _commands(script: str) -> list[list[str]]:
    """Simple commands of a shell script, split on && || ; and |."""
    commands = []
    bounds = [0]
    for match in re.finditer(r"&&|\|\||;|\|", _without_quotes(script)):
        bounds += [match.start(), match.end()]
    bounds.append(len(script))
    for start, end in zip(bounds[::2], bounds[1::2], strict=True):
        part = script[start:end]
        try:
            words = shlex.split(part)
        except ValueError:
            words = part.split()
        if words:
            commands.append(words)
    return commands


def _from_parts(args: str, arg_defaults: dict[str, str]) -> tuple[str, str | None]:
    words = [w for w in args.split() if not w.startswith("--platform")]
    image = re.sub(r"\$\{?(\w+)\}?", lambda m: arg_defaults.get(m.group(1), m.group(0)), words[0])
    alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
    return image, alias


def lint(text: str) -> list[Violation]:
    instructions = parse(text)
    violations: list[Violation] = []

    def report(instruction: Instruction, rule: str, message: str) -> None:
        if rule not in instruction.ignored:
            violations.append(Violation(rule, instruction.line, message))

    arg_defaults: dict[str, str] = {}
    stage_names: set[str] = set()
    stages = max((i.stage for i in instructions), default=-1) + 1
    workdir_set: set[int] = set()
    pipefail: set[int] = set()
    for instruction in instructions:
        keyword, args = instruction.keyword, instruction.args
        if keyword == "ARG" and instruction.stage < 0:
            name, _, default = args.partition("=")
            arg_defaults[name.strip()] = default.strip().strip('"')
        elif keyword == "FROM":
            image, alias = _from_parts(args, arg_defaults)
            if image.lower() != "scratch" and image not in stage_names:
                name, tag, digest = _split_image(image)
                if not tag and not digest:
                    report(instruction, "DL3006", image)
                if tag == "latest":
                    report(instruction, "DL3007", image)
                if not digest.startswith("sha256:") or not tag:
                    report(instruction, "KL001", image)
            if alias:
                stage_names.add(alias)
        elif keyword == "WORKDIR":
            if not (args.startswith("/") or args.startswith("$")):
                report(instruction, "DL3000", args)
            workdir_set.add(instruction.stage)
        elif keyword == "ADD":
            sources = [w for w in _copy_words(args)[:-1] if not w.startswith("--")]
            if any(not re.match(r"https?://", s) for s in sources):
                report(instruction, "DL3020", args)
        elif keyword == "COPY":
            words = [w for w in _copy_words(args) if not w.startswith("--")]
            if words and not words[-1].startswith(("/", "$")) and instruction.stage not in workdir_set:
                report(instruction, "DL3045", words[-1])
        elif keyword == "SHELL":
            shell = _exec_form(args) or []
            if "pipefail" in shell:
                pipefail.add(instruction.stage)
        elif keyword in ("CMD", "ENTRYPOINT"):
            if _exec_form(args) is None:
                report(instruction, "DL3025", f"{keyword} {args}")
        elif keyword == "RUN":
            _lint_run(instruction, report, instruction.stage in pipefail)

    final = [i for i in instructions if i.stage == stages - 1]
    users = [i for i in final if i.keyword == "USER"]
    if not users:
        violations.append(Violation("KL002", final[0].line if final else 1, "no USER in the final stage"))
    else:
        user = users[-1].args.split(":")[0]
        if user in ROOT_USERS:
            report(users[-1], "DL3002", users[-1].args)
        if not user.isdigit() or user == "0":
            report(users[-1], "KL002", users[-1].args)
    checks = [i for i in final if i.keyword == "HEALTHCHECK"]
    if not checks:
        violations.append(Violation("KL003", final[0].line if final else 1, "no HEALTHCHECK"))
    else:
        command = checks[-1].args
        exec_part = command[command.find("CMD") + 3 :].strip() if "CMD" in command else ""
        if command.strip().upper() != "NONE" and _exec_form(exec_part) is None:
            report(checks[-1], "KL003", command)
    if stages < 2:
        violations.append(Violation("KL004", 1, f"{stages} stage(s)"))
    return violations


def _copy_words(args: str) -> list[str]:
    as_json = _exec_form(args)
    return as_json if as_json is not None else args.split()


def _split_image(image: str) -> tuple[str, str, str]:
    name, _, digest = image.partition("@")
    tag = ""
    if name.rfind(":") > name.rfind("/"):
        name, tag = name.rsplit(":", 1)
    return name, tag, digest


def _lint_run(instruction: Instruction, report: Report, has_pipefail: bool) -> None:
    as_json = _exec_form(instruction.args)
    script = " ".join(as_json) if as_json is not None else instruction.args
    unquoted = _without_quotes(script)
    if re.search(r"(?<!\|)\|(?!\|)", unquoted) and not has_pipefail:
        report(instruction, "DL4006", "pipe without pipefail")
    installs_apt = False
    for words in _commands(script):
        program = words[0]
        if program == "sudo":
            report(instruction, "DL3004", " ".join(words))
        if program == "cd":
            report(instruction, "DL3003", " ".join(words))
        if program in ("apt-get", "apt") and "install" in words:
            installs_apt = True
            if not {"-y", "--yes", "-qy", "-yq", "--assume-yes"} & set(words):
                report(instruction, "DL3014", " ".join(words))
            if "--no-install-recommends" not in words:
                report(instruction, "DL3015", " ".join(words))
            packages = [w for w in words[words.index("install") + 1 :] if not w.startswith("-")]
            unpinned = [p for p in packages if "=" not in p]
            if unpinned:
                report(instruction, "DL3008", " ".join(unpinned))
        if program.endswith("pip") or program.endswith("pip3") or words[:3][-2:] == ["-m", "pip"]:
            _lint_pip(words, instruction, report)
    if installs_apt and "rm -rf /var/lib/apt/lists/*" not in script:
        report(instruction, "DL3009", "apt lists left in the layer")


def _lint_pip(words: list[str], instruction: Instruction, report: Report) -> None:
    if "install" not in words:
        return
    rest = words[words.index("install") + 1 :]
    if "--no-cache-dir" not in rest:
        report(instruction, "DL3042", " ".join(words))
    skip_next = False
    unpinned = []
    for word in rest:
        if skip_next:
            skip_next = False
            continue
        if word in ("-r", "-c", "--requirement", "--constraint", "-e", "--editable", "-t", "--target"):
            skip_next = True
            continue
        if word.startswith("-"):
            continue
        is_path = word.startswith((".", "/", "$")) or word.endswith((".whl", ".tar.gz"))
        if not is_path and "==" not in word and " @ " not in word:
            unpinned.append(word)
    if unpinned:
        report(instruction, "DL3013", " ".join(unpinned))


def lint_file(path: Path) -> list[Violation]:
    return lint(path.read_text())

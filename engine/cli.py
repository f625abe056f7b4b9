"""The engine's commands: ``kiln run`` and ``kiln validate``. Results go to stdout as JSON lines;
logs go to stderr.

Exit status: 0 when every prompt succeeded, 1 when one failed (its error is on stdout as JSON),
2 for unusable input (bad JSON, bad settings, a missing file).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import UnionType
from typing import Any, Literal, TextIO, Union, get_args, get_origin

from pydantic_settings import BaseSettings

from engine.errors import ConfigError, KilnError, PromptValidationError
from engine.settings import EngineSettings, load_settings

log = logging.getLogger("kiln")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def add_settings_options(parser: argparse.ArgumentParser, settings_class: type[BaseSettings]) -> None:
    """One flag per setting of ``settings_class`` (``max_nodes`` -> ``--max-nodes``)."""
    for name, field in settings_class.model_fields.items():
        # argparse %-formats help strings: a literal "%" in a description must be doubled.
        description = (field.description or name).replace("%", "%%")
        help_text = f"{description} (env KILN_{name.upper()})"
        annotation = field.annotation
        if name == "models_dirs":
            parser.add_argument(
                "--models-dir", dest=name, action="append", type=Path, help=f"{help_text}; repeatable"
            )
        elif annotation is bool:
            parser.add_argument(
                flag_name(name), dest=name, action=argparse.BooleanOptionalAction, help=help_text
            )
        elif get_origin(annotation) is Literal:
            parser.add_argument(flag_name(name), dest=name, choices=get_args(annotation), help=help_text)
        else:
            if get_origin(annotation) in (Union, UnionType):
                annotation = next(a for a in get_args(annotation) if a is not type(None))
            value_type = annotation if annotation in (int, float, Path) else str
            parser.add_argument(flag_name(name), dest=name, type=value_type, help=help_text)


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """``--config`` plus one flag per engine setting."""
    parser.add_argument("--config", type=Path, help="YAML or TOML settings file (also KILN_CONFIG)")
    add_settings_options(parser, EngineSettings)


def flag_name(setting: str) -> str:
    return "--" + setting.replace("_", "-")


def overrides_from_args(args: argparse.Namespace, settings_class: type[BaseSettings]) -> dict[str, Any]:
    """Values given on the command line for ``settings_class``'s fields (None = not given)."""
    return {name: getattr(args, name, None) for name in settings_class.model_fields}


def settings_from_args(args: argparse.Namespace) -> EngineSettings:
    return load_settings(args.config, **overrides_from_args(args, EngineSettings))


def read_documents(paths: Sequence[str], limits: Any) -> Iterator[tuple[str, Any]]:
    """(source name, JSON document) for each file; ``-`` reads concatenated documents from stdin."""
    from engine.prompt_json import iter_json_documents

    for path in paths:
        if path == "-":
            for index, document in enumerate(iter_json_documents(sys.stdin.read(), limits)):
                yield f"<stdin>#{index}", document
            continue
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"Cannot read {path}: {exc.strerror}") from exc
        for index, document in enumerate(iter_json_documents(text, limits)):
            yield path if index == 0 else f"{path}#{index}", document


def print_json(data: dict[str, Any], stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    out.write(json.dumps(data, default=str) + "\n")
    out.flush()


def error_line(source: str, exc: KilnError, prompt_id: str | None = None) -> dict[str, Any]:
    line: dict[str, Any] = {"source": source, "status": "error"}
    if prompt_id:
        line["prompt_id"] = prompt_id
    if isinstance(exc, PromptValidationError):
        line.update(exc.to_dict())
    else:
        line["error"] = exc.to_dict()
    return line


def command_run(args: argparse.Namespace) -> int:
    from engine.prompt_json import unwrap_prompt
    from engine.runtime import EngineRuntime

    settings = settings_from_args(args)
    runtime = EngineRuntime(settings)
    failed = False
    for source, document in read_documents(args.workflows, settings.validation_limits()):
        prompt_id = str(uuid.uuid4())
        try:
            request = unwrap_prompt(document)
            prompt_id = request.prompt_id or prompt_id
            started = time.perf_counter()
            validated = runtime.validate(request.prompt)
            validate_s = time.perf_counter() - started
            log.info("Running %s as %s (%d nodes)", source, prompt_id, len(validated.prompt))
            result = runtime.execute(
                request.prompt, prompt_id=prompt_id, extra_data=request.extra_data, validated=validated
            )
        except KilnError as exc:
            log.error("%s failed: %s", source, exc)
            print_json(error_line(source, exc, prompt_id))
            failed = True
            continue
        print_json(
            {
                "source": source,
                "status": "success",
                "prompt_id": result.prompt_id,
                "outputs": [
                    {
                        "node_id": saved.node_id,
                        "index": saved.index,
                        **saved.ui(),
                        "path": str(Path(saved.location).resolve()),
                        "content_type": saved.content_type,
                        "bytes": saved.bytes,
                        "sha256": saved.sha256,
                    }
                    for saved in result.saved
                ],
                "history": result.outputs,
                "timings": {
                    "validate_s": round(validate_s, 6),
                    "execute_s": round(result.seconds, 6),
                    "nodes_s": {node: round(s, 6) for node, s in result.node_seconds.items()},
                },
                "executed_nodes": result.executed,
                "cached_nodes": result.cached,
            }
        )
    return EXIT_FAILED if failed else EXIT_OK


def command_validate(args: argparse.Namespace) -> int:
    from engine.inventory import FolderInventory
    from engine.prompt_json import unwrap_prompt
    from engine.registry import default_registry
    from engine.validation import validate_prompt

    settings = settings_from_args(args)
    registry = default_registry(settings.node_modules)
    inventory = FolderInventory(settings.input_dir, settings.models_dirs)
    failed = False
    for source, document in read_documents(args.workflows, settings.validation_limits()):
        try:
            validated = validate_prompt(
                unwrap_prompt(document).prompt, registry, inventory, settings.validation_limits()
            )
        except KilnError as exc:
            print_json(error_line(source, exc))
            failed = True
            continue
        print_json(
            {
                "source": source,
                "status": "valid",
                "outputs": validated.outputs,
                "node_errors": validated.node_errors,
                "cost": validated.cost,
            }
        )
    return EXIT_FAILED if failed else EXIT_OK


def register(commands: argparse._SubParsersAction) -> None:
    """Add the engine's commands (``run``, ``validate``) to the ``kiln`` command."""
    run = commands.add_parser("run", help="run workflows in-process and print one JSON line per prompt")
    run.add_argument("workflows", nargs="+", help="API-format workflow files, or - for stdin")
    add_engine_options(run)
    run.set_defaults(handler=command_run)

    validate = commands.add_parser("validate", help="validate workflows without running them")
    validate.add_argument("workflows", nargs="+", help="API-format workflow files, or - for stdin")
    add_engine_options(validate)
    validate.set_defaults(handler=command_validate)

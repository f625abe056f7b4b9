"""``kiln`` and its subcommands. Each package registers its own commands; heavy imports (torch,
celery, uvicorn) happen inside the command that needs them."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from engine.cli import EXIT_USAGE, print_json
from engine.errors import KilnError, PromptValidationError


def build_parser() -> argparse.ArgumentParser:
    import api.cli
    import engine.cli
    import engine.models.cli
    import kiln.up
    import worker.cli

    parser = argparse.ArgumentParser(prog="kiln", description="Run ComfyUI API-format workflows.")
    parser.add_argument(
        "--log-level", default=os.environ.get("KILN_LOG_LEVEL", "INFO"), help="DEBUG, INFO, WARNING, ERROR"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    engine.cli.register(commands)
    engine.models.cli.register(commands)
    api.cli.register(commands)
    worker.cli.register(commands)
    kiln.up.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log_format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format=log_format)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except PromptValidationError as exc:
        # Unparseable input (bad JSON, too deep): nothing could run.
        print_json({"status": "error", **exc.to_dict()})
        return EXIT_USAGE
    except KilnError as exc:
        print_json({"status": "error", "error": exc.to_dict()})
        return EXIT_USAGE

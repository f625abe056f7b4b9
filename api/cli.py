"""``kiln serve``: the gateway under uvicorn."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.cli import EXIT_OK, add_settings_options, overrides_from_args


def register(commands: argparse._SubParsersAction) -> None:
    from api.settings import GatewaySettings
    from engine.settings import EngineSettings

    serve = commands.add_parser("serve", help="run the HTTP gateway (ComfyUI API + /v1)")
    serve.add_argument("--config", type=Path, help="YAML or TOML settings file (also KILN_CONFIG)")
    add_settings_options(serve, GatewaySettings)
    add_settings_options(serve, EngineSettings)
    serve.set_defaults(handler=command_serve)


def command_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from api.main import create_app
    from api.settings import GatewaySettings, load_gateway_settings
    from engine.settings import EngineSettings, load_settings

    settings = load_gateway_settings(args.config, **overrides_from_args(args, GatewaySettings))
    engine_settings = load_settings(args.config, **overrides_from_args(args, EngineSettings))
    app = create_app(settings, engine_settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=False)
    return EXIT_OK

"""``kiln serve``: the gateway under uvicorn, in one process or ``gateway_processes`` of them."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from engine.cli import EXIT_OK, add_settings_options, overrides_from_args

# How ``kiln serve`` hands its flags to the gateway processes uvicorn starts (each builds its app
# with ``api.main:app_from_environment``, reading the environment and config file itself).
SERVE_FLAGS_ENV = "_KILN_SERVE_FLAGS"


def register(commands: argparse._SubParsersAction) -> None:
    from api.settings import GatewaySettings
    from engine.settings import EngineSettings

    serve = commands.add_parser("serve", help="run the HTTP gateway (ComfyUI API + /v1)")
    serve.add_argument("--config", type=Path, help="YAML or TOML settings file (also KILN_CONFIG)")
    add_settings_options(serve, GatewaySettings)
    add_settings_options(serve, EngineSettings)
    serve.set_defaults(handler=command_serve)


def given_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags, JSON-ready: ``{"config", "gateway": {...}, "engine": {...}}``."""
    from api.settings import GatewaySettings
    from engine.settings import EngineSettings

    def given(settings_class: type) -> dict[str, Any]:
        values = overrides_from_args(args, settings_class)
        return json.loads(json.dumps({k: v for k, v in values.items() if v is not None}, default=str))

    return {
        "config": str(args.config) if args.config else None,
        "gateway": given(GatewaySettings),
        "engine": given(EngineSettings),
    }


def command_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from api.main import create_app
    from api.settings import GatewaySettings, load_gateway_settings
    from engine.settings import EngineSettings, load_settings

    settings = load_gateway_settings(args.config, **overrides_from_args(args, GatewaySettings))
    engine_settings = load_settings(args.config, **overrides_from_args(args, EngineSettings))
    common: dict[str, Any] = {"host": settings.host, "port": settings.port, "log_level": "info"}
    common["access_log"] = False
    if settings.gateway_processes == 1:
        uvicorn.run(create_app(settings, engine_settings), **common)
        return EXIT_OK
    # Several processes share the listening socket (uvicorn's supervisor restarts one that dies).
    # The app keeps no state of its own that must be shared: jobs, rate limits, idempotency keys
    # and routing live in Redis; request metrics are summed across processes by prometheus_client's
    # multiprocess mode (chosen when prometheus_client is imported: the processes inherit it).
    os.environ[SERVE_FLAGS_ENV] = json.dumps(given_flags(args))
    metrics_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = tempfile.mkdtemp(prefix="kiln-gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        uvicorn.run(
            "api.main:app_from_environment", factory=True, workers=settings.gateway_processes, **common
        )
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return EXIT_OK

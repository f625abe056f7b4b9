"""``kiln worker``: one Celery worker for one GPU (or the CPU)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from engine.cli import EXIT_OK, EXIT_USAGE, add_settings_options, overrides_from_args

log = logging.getLogger(__name__)


def register(commands: argparse._SubParsersAction) -> None:
    from engine.settings import EngineSettings
    from worker.settings import WorkerSettings

    worker = commands.add_parser(
        "worker", help="run a Celery worker that executes jobs on one GPU or the CPU"
    )
    worker.add_argument("--config", type=Path, help="YAML or TOML settings file (also KILN_CONFIG)")
    add_settings_options(worker, WorkerSettings)
    add_settings_options(worker, EngineSettings)
    worker.set_defaults(handler=command_worker)


def command_worker(args: argparse.Namespace) -> int:
    from engine.settings import EngineSettings, load_settings
    from worker.settings import WorkerSettings, load_worker_settings

    settings = load_worker_settings(args.config, **overrides_from_args(args, WorkerSettings))
    engine_overrides = overrides_from_args(args, EngineSettings)
    if settings.gpu is not None:
        if engine_overrides.get("device") not in (None, "auto", "cuda", "cuda:0"):
            log.error("--gpu %d conflicts with --device %s", settings.gpu, engine_overrides["device"])
            return EXIT_USAGE
        # Pin the GPU before anything initialises CUDA; the engine host inherits it and sees one GPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(settings.gpu)
        engine_overrides["device"] = "cuda:0"
    engine_settings = load_settings(args.config, **engine_overrides)
    # SIGTERM starts Celery's soft shutdown (the running job gets soft_shutdown_timeout_s, then is
    # requeued) instead of a warm shutdown that waits for the job however long it takes.
    os.environ["REMAP_SIGTERM"] = "SIGQUIT"
    # Celery's threads pool, extended to stop the running job at the end of the soft shutdown.
    os.environ["CELERY_CUSTOM_WORKER_POOL"] = "worker.celery_pool:KilnThreadPool"
    from worker.celery_app import create_celery_app, worker_queues

    app = create_celery_app(settings, engine_settings)
    app.worker_main(
        [
            "worker",
            "--pool=custom",
            "--concurrency=1",
            f"--queues={','.join(worker_queues(settings))}",
            f"--hostname={settings.worker_id}@%h",
            "--without-gossip",
            "--without-mingle",
            f"--loglevel={logging.getLevelName(logging.getLogger().level)}",
        ]
    )
    return EXIT_OK

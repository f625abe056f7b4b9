"""Background threads of a worker process: the heartbeat (with the model inventory) and the
listener for commands (cancel the running job)."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict
from typing import Any

import redis

from engine.inventory import FolderInventory
from engine.settings import EngineSettings
from worker.protocol import Channels, Keys, worker_queue
from worker.runner import JobRunner
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

MODEL_FOLDERS = ("checkpoints", "loras", "vae", "upscale_models", "embeddings", "controlnet", "clip", "unet")


class _Loop(threading.Thread):
    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()


class Heartbeat(_Loop):
    """Publishes this worker's state every ``heartbeat_interval_s`` with a TTL, so a dead worker
    disappears from the pool on its own."""

    def __init__(
        self,
        client: redis.Redis,
        settings: WorkerSettings,
        engine_settings: EngineSettings,
        runner: JobRunner,
    ) -> None:
        super().__init__("kiln-heartbeat")
        self.redis = client
        self.settings = settings
        self.engine_settings = engine_settings
        self.runner = runner
        self.started_at = time.time()

    def beat(self) -> dict[str, Any]:
        host_status: dict[str, Any] = {}
        try:
            status = asdict(self.runner.host.status())
            host_status = {f"host_{name}": value for name, value in status.items()}
        except Exception as exc:  # the heartbeat must go on even when the host is restarting
            log.debug("host status unavailable: %s", exc)
        state = {
            "id": self.settings.worker_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "gpu_index": self.settings.gpu,
            "device": self.engine_settings.device,
            "queue": worker_queue(self.settings.worker_id),
            "queue_depth": int(self.redis.llen(worker_queue(self.settings.worker_id))),
            "running_job": self.runner.current_job,
            "jobs_run": self.runner.jobs_run,
            "started_at": self.started_at,
            "time": time.time(),
            **host_status,
        }
        ttl = int(self.settings.heartbeat_ttl_s)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(Keys.worker(self.settings.worker_id), json.dumps(state, default=str), ex=ttl)
            pipe.sadd(Keys.workers(), self.settings.worker_id)
            pipe.execute()
        return state

    def publish_inventory(self) -> None:
        inventory = FolderInventory(self.engine_settings.input_dir, self.engine_settings.models_dirs)
        with self.redis.pipeline(transaction=False) as pipe:
            for folder in MODEL_FOLDERS:
                names = inventory.list_choices(f"models:{folder}")
                if names:
                    pipe.sadd(Keys.inventory(folder), *names)
                    pipe.sadd(Keys.inventory_folders(), folder)
            pipe.execute()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.beat()
                self.publish_inventory()
            except redis.RedisError as exc:
                log.warning("Heartbeat failed: %s", exc)
            self._stop_event.wait(self.settings.heartbeat_interval_s)


class ControlListener(_Loop):
    """Receives commands for this worker (``{"cancel": job_id}``) over Redis pub/sub."""

    def __init__(self, client: redis.Redis, worker_id: str, runner: JobRunner) -> None:
        super().__init__("kiln-control")
        self.redis = client
        self.worker_id = worker_id
        self.runner = runner

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(Channels.control(self.worker_id))
                while not self._stop_event.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    command = json.loads(message["data"])
                    if "cancel" in command:
                        log.info("Cancel requested for job %s", command["cancel"])
                        self.runner.cancel(command["cancel"])
            except redis.RedisError as exc:
                log.warning("Control channel lost (%s); reconnecting", exc)
                self._stop_event.wait(1.0)

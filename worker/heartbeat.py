"""Background threads of a worker process: the heartbeat (with the model inventory), the
listener for commands (cancel the running job, preload a model) and the preloader, and
``WorkerStats``: what the worker measured for routing (resident models, job and load time
averages, the running job).

The heartbeat is JSON at ``Keys.worker(id)`` with a TTL, written every ``heartbeat_interval_s``
and at once when a job starts or ends or the resident models change, so the gateway's router sees
changes within a fraction of a second. Its fields (docs/routing.md):

    id, host, pid, device, gpu_index, gpu_name, gpu_class, memory_total, memory_free (bytes),
    queue, queue_depth (all priority lists), running_job, running_models, running_since,
    running_cold, resident [{name, hash, loaded_at, seconds, bytes, where}] (least recently used
    first), model_slots (null: unknown), model_memory {device_budget, host_budget, device_used,
    host_used} (bytes; null: unknown), pinned, allow, job_seconds {primary model: moving average},
    load_seconds {model: moving average}, loads {model: count}, preload_requests [{model, reason,
    at}], jobs_run, started_at, time, host_* (the engine host's status)
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from engine.inventory import FolderInventory
from engine.settings import EngineSettings
from worker.celery_wire import MAX_PRIORITY, PRIORITY_STEPS, redis_list_for
from worker.protocol import LOAD_SECONDS_BUCKETS, Channels, Keys, primary_model, worker_queue
from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from worker.runner import JobRunner

log = logging.getLogger(__name__)

# Weight of the newest sample in the moving averages of job and load seconds.
EMA_ALPHA = 0.2

MODEL_FOLDERS = ("checkpoints", "loras", "vae", "upscale_models", "embeddings", "controlnet", "clip", "unet")


def _ema(previous: float | None, sample: float) -> float:
    return sample if previous is None else previous + EMA_ALPHA * (sample - previous)


@dataclass
class _Running:
    job_id: str
    models: list[str]
    started: float  # time.time()
    started_mono: float
    cold: list[str]
    load_seconds: float = 0.0


@dataclass
class WorkerStats:
    """Measured by this worker, reported in its heartbeat; thread-safe (the job thread writes, the
    heartbeat thread reads). Counters behind /metrics (model loads, load seconds, affinity hits)
    go to Redis when they happen, so a worker killed a moment later has lost none of them.

    "Resident" is what the engine host's model manager holds: each load (``MODEL_LOADED_EVENT``)
    adds its model, and the residency the host reports after loads and jobs (``MODELS_EVENT``,
    ``models_reported``) replaces the list, evictions included. A restarted host has nothing
    resident.
    """

    client: redis.Redis
    worker_id: str
    changed: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _resident: dict[str, dict[str, Any]] = field(default_factory=dict)
    _resident_pid: int | None = None
    _job_seconds: dict[str, float] = field(default_factory=dict)
    _load_seconds: dict[str, float] = field(default_factory=dict)
    _loads: dict[str, int] = field(default_factory=dict)
    _running: _Running | None = None
    _preloads: dict[str, dict[str, Any]] = field(default_factory=dict)
    _slots: int | None = None
    _memory: dict[str, int | None] | None = None

    def job_started(self, job_id: str, models: list[str], host_pid: int | None) -> None:
        with self._lock:
            resident = self._resident_for(host_pid)
            cold = [m for m in models if m not in resident]
            self._running = _Running(job_id, list(models), time.time(), time.monotonic(), cold)
        self.changed.set()

    def model_loaded(
        self, model: str, seconds: float, content_hash: str | None, host_pid: int | None
    ) -> None:
        with self._lock:
            resident = self._resident_for(host_pid)
            resident.pop(model, None)
            resident[model] = {
                "name": model,
                "hash": content_hash,
                "loaded_at": time.time(),
                "seconds": seconds,
            }
            self._load_seconds[model] = _ema(self._load_seconds.get(model), seconds)
            self._loads[model] = self._loads.get(model, 0) + 1
            if self._running is not None:
                self._running.load_seconds += seconds
        le = next((b for b in LOAD_SECONDS_BUCKETS if seconds <= float(b)), "+Inf")
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.hincrby(Keys.stats("model-loads"), json.dumps([self.worker_id, model]), 1)
                pipe.hincrby(Keys.stats("load-seconds"), le, 1)
                pipe.hincrbyfloat(Keys.stats("load-seconds"), "sum", seconds)
                pipe.hincrby(Keys.stats("load-seconds"), "count", 1)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("Model load of %s not counted: %s", model, exc)
        self.changed.set()

    def models_reported(self, report: dict[str, Any], host_pid: int | None) -> None:
        """The engine host's residency (``worker.host_io.ModelReporter.snapshot``): the resident
        models, least recently used first, the slots and the budgets."""
        with self._lock:
            before = self._resident_for(host_pid)
            resident: dict[str, dict[str, Any]] = {}
            for item in report.get("resident") or ():
                name = str(item["name"])
                known = before.get(name)
                same = known is not None and known.get("hash") == item.get("hash")
                resident[name] = {
                    "name": name,
                    "hash": item.get("hash"),
                    "loaded_at": known["loaded_at"] if same else time.time(),
                    "seconds": known["seconds"] if same else self._load_seconds.get(name),
                    "bytes": item.get("bytes"),
                    "where": item.get("where"),
                }
            changed = [(r["name"], r["hash"], r.get("where")) for r in before.values()] != [
                (r["name"], r["hash"], r["where"]) for r in resident.values()
            ]
            self._resident = resident
            slots = report.get("slots")
            changed = changed or slots != self._slots
            self._slots = int(slots) if slots is not None else None
            budget, used = report.get("budget") or {}, report.get("used") or {}
            self._memory = {
                "device_budget": budget.get("device"),
                "host_budget": budget.get("host"),
                "device_used": used.get("device"),
                "host_used": used.get("host"),
            }
        if changed:
            self.changed.set()

    def job_finished(self, job_id: str, succeeded: bool) -> None:
        with self._lock:
            running, self._running = self._running, None
        if running is None or running.job_id != job_id:
            self.changed.set()
            return
        seconds = time.monotonic() - running.started_mono - running.load_seconds
        if succeeded:
            with self._lock:
                key = primary_model(running.models)
                self._job_seconds[key] = _ema(self._job_seconds.get(key), max(0.0, seconds))
        if running.models:
            hit = "hit" if running.load_seconds == 0 and not self._loaded_during(running) else "miss"
            try:
                self.client.hincrby(Keys.stats("affinity"), f"{hit}:{self.worker_id}", 1)
            except redis.RedisError as exc:
                log.warning("Affinity of job %s not counted: %s", job_id, exc)
        self.changed.set()

    def _loaded_during(self, running: _Running) -> bool:
        with self._lock:
            return any(
                info["loaded_at"] >= running.started
                for m, info in self._resident.items()
                if m in running.models
            )

    def preload_requested(self, model: str, reason: str) -> None:
        """Reported until the preload is done (``preload_finished``): the router does not ask
        again meanwhile."""
        with self._lock:
            self._preloads[model] = {"model": model, "reason": reason, "at": time.time()}
        self.changed.set()

    def preload_finished(self, model: str) -> None:
        """Loaded, failed or skipped (a load of it already reported it resident)."""
        with self._lock:
            found = self._preloads.pop(model, None)
        if found is not None:
            self.changed.set()

    def is_resident(self, model: str, host_pid: int | None) -> bool:
        with self._lock:
            return host_pid == self._resident_pid and model in self._resident

    def _resident_for(self, host_pid: int | None) -> dict[str, dict[str, Any]]:
        if host_pid != self._resident_pid:
            self._resident = {}
            self._resident_pid = host_pid
        return self._resident

    def report(self, host_pid: int | None) -> dict[str, Any]:
        """The heartbeat's routing fields."""
        with self._lock:
            resident = list(self._resident.values()) if host_pid == self._resident_pid else []
            running = self._running
            return {
                "resident": resident,
                "model_slots": self._slots,
                "model_memory": dict(self._memory) if self._memory is not None else None,
                "running_models": running.models if running else [],
                "running_since": running.started if running else None,
                "running_cold": running.cold if running else [],
                "job_seconds": dict(self._job_seconds),
                "load_seconds": dict(self._load_seconds),
                "loads": dict(self._loads),
                "preload_requests": list(self._preloads.values()),
            }


def device_info(gpu_index: int | None, device: str) -> dict[str, Any]:
    """GPU name and memory (bytes) from nvidia-smi, without touching CUDA in this process; for a
    CPU worker, the machine's memory."""
    uses_gpu = gpu_index is not None or device.startswith("cuda") or device == "auto"
    if uses_gpu and shutil.which("nvidia-smi"):
        index = gpu_index if gpu_index is not None else 0
        try:
            out = subprocess.run(
                [
                    "nvidia-smi",
                    f"--id={index}",
                    "--query-gpu=name,memory.total,memory.free",
                    "--format=csv,noheader,nounits",
                ],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout
            return parse_nvidia_smi(out)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            log.debug("nvidia-smi failed: %s", exc)
    total, free = _system_memory()
    return {"gpu_name": None, "gpu_class": "cpu", "memory_total": total, "memory_free": free}


def parse_nvidia_smi(out: str) -> dict[str, Any]:
    """``NVIDIA H100 80GB HBM3, 81559, 80811`` (MiB) -> name, class, bytes."""
    name, total, free = (part.strip() for part in out.strip().splitlines()[0].rsplit(",", 2))
    return {
        "gpu_name": name,
        "gpu_class": "-".join(name.lower().split()),
        "memory_total": int(float(total)) * 1024 * 1024,
        "memory_free": int(float(free)) * 1024 * 1024,
    }


def _system_memory() -> tuple[int | None, int | None]:
    try:
        fields = {}
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0]) * 1024
        return fields.get("MemTotal"), fields.get("MemAvailable")
    except (OSError, ValueError):
        return None, None


def queue_depth(client: redis.Redis, queue: str) -> int:
    """Messages waiting in a queue, over all its priority lists."""
    with client.pipeline(transaction=False) as pipe:
        for step in PRIORITY_STEPS:
            pipe.llen(redis_list_for(queue, MAX_PRIORITY - step))
        return sum(int(n) for n in pipe.execute())


class _Loop(threading.Thread):
    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()


class Heartbeat(_Loop):
    """Publishes this worker's state every ``heartbeat_interval_s`` with a TTL, so a dead worker
    disappears from the pool on its own, and at once when the runner reports a change."""

    # Beats at most this often when changes come quickly.
    MIN_SPACING_S = 0.1

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
        self._device: dict[str, Any] = {}
        self._device_at = 0.0

    def stop(self) -> None:
        super().stop()
        self.runner.stats.changed.set()

    def device(self) -> dict[str, Any]:
        """GPU name and memory, refreshed once per interval (nvidia-smi is not free)."""
        now = time.monotonic()
        if not self._device or now - self._device_at >= self.settings.heartbeat_interval_s:
            self._device = device_info(self.settings.gpu, self.engine_settings.device)
            self._device_at = now
        return self._device

    def beat(self) -> dict[str, Any]:
        host_status: dict[str, Any] = {}
        host_pid = None
        try:
            status = asdict(self.runner.host.status())
            host_pid = status.get("pid")
            host_status = {f"host_{name}": value for name, value in status.items()}
        except Exception as exc:  # the heartbeat must go on even when the host is restarting
            log.debug("host status unavailable: %s", exc)
        worker_id = self.settings.worker_id
        config = {
            k.decode(): json.loads(v) for k, v in self.redis.hgetall(Keys.worker_config(worker_id)).items()
        }
        state = {
            "id": worker_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "gpu_index": self.settings.gpu,
            "device": self.engine_settings.device,
            **self.device(),
            "queue": worker_queue(worker_id),
            "queue_depth": queue_depth(self.redis, worker_queue(worker_id)),
            "running_job": self.runner.current_job,
            **self.runner.stats.report(host_pid),
            "pinned": config.get("pinned") or [],
            "allow": config.get("allow"),
            "jobs_run": self.runner.jobs_run,
            "started_at": self.started_at,
            "time": time.time(),
            **host_status,
        }
        ttl = int(self.settings.heartbeat_ttl_s)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(Keys.worker(worker_id), json.dumps(state, default=str), ex=ttl)
            pipe.sadd(Keys.workers(), worker_id)
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
        changed = self.runner.stats.changed
        inventory_at = 0.0
        while not self._stop_event.is_set():
            changed.clear()
            try:
                self.beat()
                if time.monotonic() - inventory_at >= self.settings.heartbeat_interval_s:
                    self.publish_inventory()
                    inventory_at = time.monotonic()
            except redis.RedisError as exc:
                log.warning("Heartbeat failed: %s", exc)
            changed.wait(self.settings.heartbeat_interval_s)
            self._stop_event.wait(self.MIN_SPACING_S)


class Preloader(_Loop):
    """Loads the models the router asks for on the engine host, one at a time, off the control
    listener's thread (a load takes seconds; a cancel must not wait for it)."""

    def __init__(self, runner: JobRunner) -> None:
        super().__init__("kiln-preload")
        self.runner = runner
        self._requests: queue.Queue[str | None] = queue.Queue()

    def request(self, model: str, reason: str) -> None:
        self.runner.stats.preload_requested(model, reason)
        self._requests.put(model)

    def stop(self) -> None:
        super().stop()
        self._requests.put(None)

    def run(self) -> None:
        while not self._stop_event.is_set():
            model = self._requests.get()
            if model is None:
                continue
            if self.runner.stats.is_resident(model, self.runner.host.pid):
                self.runner.stats.preload_finished(model)
                continue
            try:
                self.runner.preload(model)
            except Exception:  # a bug must not end the thread: later requests still count
                log.exception("Preload of %s failed", model)


class ControlListener(_Loop):
    """Receives commands for this worker (``{"cancel": job_id}``, ``{"preload": model}``) over
    Redis pub/sub."""

    def __init__(self, client: redis.Redis, worker_id: str, runner: JobRunner, preloader: Preloader) -> None:
        super().__init__("kiln-control")
        self.redis = client
        self.worker_id = worker_id
        self.runner = runner
        self.preloader = preloader

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
                    if "preload" in command:
                        model, reason = str(command["preload"]), str(command.get("reason", ""))
                        log.info("Preload of %s requested (%s)", model, reason)
                        self.preloader.request(model, reason)
            except redis.RedisError as exc:
                log.warning("Control channel lost (%s); reconnecting", exc)
                self._stop_event.wait(1.0)

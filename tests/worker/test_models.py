"""The model manager's real loads and residency flowing to the worker: the engine host's reports
(``ModelReporter``), preloads, ``WorkerStats`` and the heartbeat, on real tiny checkpoints, a real
spawned engine host and a real redis-server."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from engine.errors import ModelError
from engine.models.hub import ModelHub
from engine.models.known_models import KnownModels
from engine.models.manager import ModelManager
from engine.models.test_checkpoint import write_test_checkpoint
from engine.registry import default_registry
from engine.settings import EngineSettings
from engine.validation import validate_prompt
from tests.support.services import RedisServer
from worker.celery_wire import MAX_PRIORITY, redis_list_for
from worker.engine_host import EngineHost, HostJob, PreloadFailed
from worker.heartbeat import Preloader, WorkerStats, queue_depth
from worker.host_io import MODELS_EVENT, ModelReporter
from worker.host_main import preload_model, prompt_models
from worker.jobstore import JobStore
from worker.protocol import MODEL_LOADED_EVENT, Keys, worker_queue
from worker.runner import JobRunner
from worker.settings import WorkerSettings
from worker.storage import FileStorage

A, B, C = "checkpoints/a.safetensors", "checkpoints/sub/b.safetensors", "checkpoints/c.safetensors"
PARTS = {"unet", "clip", "vae"}


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for seed, model in enumerate((A, B, C)):
        write_test_checkpoint(root / model, "sd15", "tiny", seed=seed)
    return root


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_manager(root: Path, **budgets: int) -> ModelManager:
    return ModelManager("cpu", hub=ModelHub([root], KnownModels(), True), **budgets)


def names(snapshot: dict[str, Any]) -> list[str]:
    return [r["name"] for r in snapshot["resident"]]


# -- in the engine host: what the manager did, named as the router names models ------------------------


def test_a_checkpoint_load_is_one_load_named_like_the_prompt(models_root: Path):
    manager = make_manager(models_root)
    reporter = ModelReporter(manager)
    assert reporter.loads() == [] and reporter.snapshot()["slots"] is None
    reporter.expect(["loras/x.safetensors", A])
    preload_model(manager, A)
    [load] = reporter.loads()
    assert load["model"] == A and load["hash"] == sha256(models_root / A)
    assert set(load["parts"]) == PARTS and load["seconds"] > 0 and load["bytes"] > 0
    assert reporter.loads() == []  # reported once
    snapshot = reporter.snapshot()
    [resident] = snapshot["resident"]
    assert resident["name"] == A and resident["where"] == "device" and set(resident["parts"]) == PARTS
    assert snapshot["budget"] == {"device": manager.device_budget, "host": manager.host_budget}
    assert snapshot["used"]["device"] == resident["bytes"] == load["bytes"]
    assert snapshot["slots"] == manager.device_budget // load["bytes"]


def test_the_host_sends_loads_then_residency_only_when_something_changed(models_root: Path):
    manager = make_manager(models_root)
    reporter = ModelReporter(manager)
    assert reporter.events(residency=True) == []  # nothing loaded: nothing to tell
    reporter.expect([A])
    preload_model(manager, A)
    assert [event for event, _ in reporter.events()] == [MODEL_LOADED_EVENT, MODELS_EVENT]
    assert reporter.events(residency=True) == []
    manager.free_all()
    assert reporter.events() == []  # mid-job, only loads trigger a report
    [(event, snapshot)] = reporter.events(residency=True)
    assert event == MODELS_EVENT and snapshot["resident"] == []


def test_residency_is_least_recently_used_first_and_names_follow_content(models_root: Path):
    manager = make_manager(models_root)
    reporter = ModelReporter(manager)
    reporter.expect([A, B])
    preload_model(manager, A)
    preload_model(manager, B)
    assert [load["model"] for load in reporter.loads()] == [A, B]
    assert names(reporter.snapshot()) == [A, B]
    preload_model(manager, A)  # used again: most recent
    assert reporter.loads() == [] and names(reporter.snapshot()) == [B, A]
    # A file no job named is reported by its file name; one the next job names gets that name.
    reporter.expect([])
    preload_model(manager, C)
    assert reporter.loads()[0]["model"] == "c.safetensors"
    reporter.expect([C])
    assert names(reporter.snapshot()) == [B, A, C]


def test_an_evicted_model_leaves_the_residency(models_root: Path):
    manager = make_manager(models_root, device_budget_bytes=50 * 2**20)  # one tiny checkpoint (~35 MiB)
    reporter = ModelReporter(manager)
    reporter.expect([A, B])
    preload_model(manager, A)
    preload_model(manager, B)
    assert [load["model"] for load in reporter.loads()] == [A, B]
    snapshot = reporter.snapshot()
    assert names(snapshot) == [B] and snapshot["slots"] == 1


def test_preload_model_refuses_what_it_cannot_load(models_root: Path):
    manager = make_manager(models_root)
    with pytest.raises(ModelError, match="cannot be preloaded"):
        preload_model(manager, "loras/x.safetensors")
    with pytest.raises(ModelError, match="cannot be preloaded"):
        preload_model(manager, "checkpoints")
    with pytest.raises(ModelError, match="not found"):
        preload_model(manager, "checkpoints/missing.safetensors")
    assert manager.resident() == []


def test_prompt_models_are_its_model_combos(models_root: Path):
    registry = default_registry(["tests.e2e.affinity_nodes"])
    hub = ModelHub([models_root], KnownModels(), True)
    limits = EngineSettings().validation_limits()
    validated = validate_prompt(probe_prompt("sub/b.safetensors"), registry, hub, limits)
    assert prompt_models(validated, registry) == [B]


# -- through a real engine host ------------------------------------------------------------------------


def probe_prompt(checkpoint: str, seconds: float = 0.0) -> dict[str, Any]:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "TestModelProbe", "inputs": {"model": ["1", 0], "seconds": seconds}},
    }


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        self.events.append((event, data))

    def of_type(self, event: str) -> list[dict[str, Any]]:
        return [data for kind, data in self.events if kind == event]


@pytest.fixture(scope="module")
def host(models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineHost]:
    root = tmp_path_factory.mktemp("host")
    settings = EngineSettings(
        models_dirs=[models_root],
        input_dir=root / "input",
        output_dir=root / "output",
        temp_dir=root / "temp",
        device="cpu",
        node_modules=["tests.e2e.affinity_nodes"],
    )
    with EngineHost(settings, start_timeout_s=120) as engine_host:
        yield engine_host


def run_job(host: EngineHost, checkpoint: str, models: list[str]) -> Recorder:
    events = Recorder()
    job = HostJob(job_id=uuid.uuid4().hex, tenant="t", prompt=probe_prompt(checkpoint), models=models)
    host.run(job, events, deadline_s=60)
    return events


def test_a_job_reports_the_loads_it_caused_then_the_residency(host: EngineHost, models_root: Path):
    first = run_job(host, "a.safetensors", [A])
    [load] = first.of_type(MODEL_LOADED_EVENT)
    assert load["model"] == A and load["hash"] == sha256(models_root / A) and set(load["parts"]) == PARTS
    kinds = [kind for kind, _ in first.events]
    # The load and the residency are reported as they happen (before the probe runs).
    assert kinds.index(MODEL_LOADED_EVENT) + 1 == kinds.index(MODELS_EVENT) < kinds.index("progress")
    assert A in names(first.of_type(MODELS_EVENT)[-1])
    again = run_job(host, "a.safetensors", [A])  # warm: nothing loads, the residency is the same
    assert again.of_type(MODEL_LOADED_EVENT) == again.of_type(MODELS_EVENT) == []
    # Without the gateway's list, the prompt's own model combos name the file.
    [load] = run_job(host, "sub/b.safetensors", []).of_type(MODEL_LOADED_EVENT)
    assert load["model"] == B


def test_preload_loads_a_model_ahead_of_its_job(host: EngineHost):
    pid = host.pid
    events = Recorder()
    host.preload(C, events, deadline_s=60)
    [load] = events.of_type(MODEL_LOADED_EVENT)
    assert load["model"] == C and C in names(events.of_type(MODELS_EVENT)[-1])
    assert run_job(host, "c.safetensors", [C]).of_type(MODEL_LOADED_EVENT) == []  # warm
    for model in ("checkpoints/missing.safetensors", "loras/x.safetensors"):
        with pytest.raises(PreloadFailed, match="ModelError"):
            host.preload(model, Recorder(), deadline_s=60)
    assert host.pid == pid and host.restarts == 0
    # The worker stopping during a preload: the load cannot be interrupted, so the child goes.
    stopping = threading.Event()
    stopping.set()
    with pytest.raises(PreloadFailed, match="cancelled"):
        host.preload(C, Recorder(), deadline_s=60, cancel=stopping)
    assert host.pid is None  # the next use starts a fresh child


# -- in the worker: stats, heartbeat fields, preload requests ---------------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("models-redis")).start()
    yield server
    server.stop()


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_server.url)
    connection.flushdb()
    yield connection
    connection.close()


def report(*resident: tuple[str, str], slots: int | None = 3) -> dict[str, Any]:
    item = {"parts": ["unet"], "bytes": 10, "where": "device"}
    return {
        "resident": [{"name": n, "hash": h, **item} for n, h in resident],
        "slots": slots,
        "budget": {"device": 30, "host": 0},
        "used": {"device": 10 * len(resident), "host": 0},
    }


def test_worker_stats_follow_the_hosts_residency(client: redis.Redis):
    stats = WorkerStats(client, "w1")
    stats.model_loaded(A, 0.5, "ha", host_pid=7)
    loaded_at = stats.report(7)["resident"][0]["loaded_at"]
    stats.changed.clear()
    stats.models_reported(report((A, "ha"), (B, "hb")), host_pid=7)
    assert stats.changed.is_set()
    beat = stats.report(7)
    assert [(r["name"], r["hash"]) for r in beat["resident"]] == [(A, "ha"), (B, "hb")]
    assert beat["resident"][0]["loaded_at"] == loaded_at and beat["resident"][0]["seconds"] == 0.5
    assert beat["model_slots"] == 3
    assert beat["model_memory"] == {"device_budget": 30, "host_budget": 0, "device_used": 20, "host_used": 0}
    stats.changed.clear()
    stats.models_reported(report((A, "ha"), (B, "hb")), host_pid=7)
    assert not stats.changed.is_set()  # nothing changed: no extra heartbeat
    stats.models_reported(report((B, "hb")), host_pid=7)  # A was evicted
    assert [r["name"] for r in stats.report(7)["resident"]] == [B]
    assert stats.report(8)["resident"] == [] and stats.is_resident(B, 7) and not stats.is_resident(B, 8)
    assert client.hget(Keys.stats("model-loads"), json.dumps(["w1", A])) == b"1"


def test_queue_depth_counts_every_priority_list(client: redis.Redis):
    queue = worker_queue("w1")
    for priority in range(MAX_PRIORITY + 1):
        client.lpush(redis_list_for(queue, priority), f"m{priority}")
    assert len({redis_list_for(queue, p) for p in range(MAX_PRIORITY + 1)}) == 4
    assert queue_depth(client, queue) == MAX_PRIORITY + 1


def test_a_preload_request_loads_the_model_on_the_engine_host(
    host: EngineHost, client: redis.Redis, tmp_path: Path, models_root: Path
):
    model = "checkpoints/d.safetensors"
    write_test_checkpoint(models_root / model, "sd15", "tiny", seed=3)
    settings = WorkerSettings(worker_id="w-pre", job_timeout_s=60)
    runner = JobRunner(settings=settings, store=JobStore(client), storage=FileStorage(tmp_path), host=host)
    preloader = Preloader(runner)
    preloader.start()
    try:
        runner.current_job = "busy"
        assert not runner.preload(model)  # a job runs: skipped, and the request forgotten
        runner.current_job = None
        preloader.request(model, "pinned")
        assert [p["model"] for p in runner.stats.report(host.pid)["preload_requests"]] == [model]
        deadline = time.monotonic() + 60
        while runner.stats.report(host.pid)["preload_requests"] and time.monotonic() < deadline:
            time.sleep(0.05)
        beat = runner.stats.report(host.pid)
        assert beat["preload_requests"] == [] and model in [r["name"] for r in beat["resident"]]
        assert beat["loads"] == {model: 1} and beat["model_slots"] >= 1
        assert client.hget(Keys.stats("model-loads"), json.dumps(["w-pre", model])) == b"1"
        preloader.request(model, "pinned")  # resident already: nothing loads
        while runner.stats.report(host.pid)["preload_requests"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runner.stats.report(host.pid)["loads"] == {model: 1}
    finally:
        preloader.stop()
        preloader.join(5)
    assert not any(t.name == "kiln-preload" for t in threading.enumerate())

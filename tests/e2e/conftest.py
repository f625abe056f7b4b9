"""A whole cluster of real processes: redis-server, an S3 server, the gateway under uvicorn, and
Celery workers running the engine on the CPU."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.models.test_checkpoint import write_test_checkpoint
from tests.support.services import (
    S3_ENV,
    ManagedProcess,
    RedisServer,
    S3Server,
    free_port,
    kiln_process,
    port_open,
    wait_for,
)

API_KEY = "e2e-key"
TENANT = "e2e"
BUCKET = "kiln-e2e"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TXT2IMG_CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"


@dataclass
class Cluster:
    workdir: Path
    redis: RedisServer
    s3: S3Server
    gateway_port: int
    env: dict[str, str]
    gateway: ManagedProcess | None = None
    workers: dict[str, ManagedProcess] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=AUTH, timeout=30)

    def start_gateway(self) -> None:
        self.gateway = kiln_process(
            ["serve", "--port", str(self.gateway_port)], self.env, self.workdir / "gateway.log", self.workdir
        )
        wait_for(lambda: port_open(self.gateway_port), 60, "the gateway")

    def start_worker(self, name: str, **extra_env: str) -> ManagedProcess:
        env = {**self.env, "KILN_WORKER_ID": name, **extra_env}
        worker = kiln_process(["worker", "--device", "cpu"], env, self.workdir / f"{name}.log", self.workdir)
        self.workers[name] = worker
        return worker

    def wait_for_workers(self, *names: str, timeout: float = 120) -> None:
        def ready() -> bool:
            with self.http() as http:
                live = {w["id"] for w in http.get("/v1/workers").json()["workers"]}
            return set(names) <= live

        wait_for(ready, timeout, f"workers {names}", interval=0.5)

    def logs(self) -> str:
        parts = []
        for path in sorted(self.workdir.glob("*.log")):
            parts.append(f"===== {path.name}\n{path.read_text(errors='replace')[-6000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.kill()
        if self.gateway is not None:
            self.gateway.kill()
        self.s3.stop()
        self.redis.stop()


def wait_job(http: httpx.Client, job_id: str, timeout: float = 180) -> dict[str, Any]:
    """Poll ``/v1/jobs/{id}`` until it finishes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} did not finish in {timeout}s: {job}")


@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("cluster")
    redis = RedisServer(workdir / "redis").start()
    s3 = S3Server(workdir / "s3").start()
    env = {
        **S3_ENV,
        "KILN_REDIS_URL": redis.url,
        "KILN_STORAGE_URL": f"s3://{BUCKET}",
        "KILN_S3_ENDPOINT_URL": s3.endpoint,
        "KILN_STORAGE_CREATE_BUCKET": "true",
        "KILN_API_KEYS": f"{API_KEY}:{TENANT}",
        "KILN_NODE_MODULES": "tests.worker.nodes_for_tests",
        "KILN_MODELS_DIRS": str(workdir / "models"),
        "KILN_INPUT_DIR": str(workdir / "input"),
        "KILN_JOB_TIMEOUT_S": "20",
        "KILN_VISIBILITY_TIMEOUT_S": "15",
        "KILN_HEARTBEAT_INTERVAL_S": "1",
        "KILN_HEARTBEAT_TTL_S": "4",
        "KILN_CANCEL_GRACE_S": "3",
        "KILN_SOFT_SHUTDOWN_TIMEOUT_S": "5",
        "KILN_LOG_LEVEL": "INFO",
        # Latent previews on every sampler step (binary frames on the WebSocket).
        "KILN_PREVIEW_INTERVAL": "1",
    }
    (workdir / "models" / "checkpoints").mkdir(parents=True)
    # The real file name examples/txt2img.json asks for, holding a tiny SD1.5 test checkpoint.
    write_test_checkpoint(workdir / "models" / "checkpoints" / TXT2IMG_CHECKPOINT, "sd15", "tiny", seed=21)
    cluster = Cluster(workdir=workdir, redis=redis, s3=s3, gateway_port=free_port(), env=env)
    try:
        cluster.start_gateway()
        cluster.start_worker("worker-a")
        cluster.wait_for_workers("worker-a")
        yield cluster
    finally:
        cluster.stop()

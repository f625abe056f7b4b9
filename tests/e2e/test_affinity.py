"""Model-affinity routing with real processes: a gateway and two CPU workers of their own (on a
Redis database of their own, so the package's other workers are not in their pool), sharing the
package cluster's redis-server and S3 server.

The prompts load real tiny SD1.5 checkpoints with ``CheckpointLoaderSimple`` (one seed each: distinct
content hashes) and ``TestModelProbe`` borrows the UNet from the model manager, so every load counted
on /metrics is a load the worker's engine host really did. Each worker's model budget holds every
checkpoint here, so a worker loads each at most once: at most 4 loads per test of two models.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.models.test_checkpoint import write_test_checkpoint
from tests.e2e.conftest import TENANT, Cluster, wait_job
from tests.support.services import free_port, wait_for

LOADER = "CheckpointLoaderSimple"
WORKERS = ("affinity-1", "affinity-2")
# MiB of model memory per worker: a tiny checkpoint takes ~40 MiB in fp32 (mostly its text encoder's
# 49408-token embedding), so both checkpoints of a test stay resident.
MODEL_BUDGET_MB = 256


def tiny_checkpoint(path: Path, seed: int) -> Path:
    """A real tiny SD1.5 checkpoint (a few MB); distinct content per seed, so distinct hashes."""
    return write_test_checkpoint(path, "sd15", "tiny", seed=seed)


def affinity_prompt(checkpoint: str, seconds: float) -> dict[str, Any]:
    return {
        "1": {"class_type": LOADER, "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "TestModelProbe", "inputs": {"model": ["1", 0], "seconds": seconds}},
    }


@pytest.fixture(scope="module")
def pool(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("affinity")
    checkpoints = workdir / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for seed, name in enumerate("abcd"):
        tiny_checkpoint(checkpoints / f"affinity-{name}.safetensors", seed)
    env = {
        **cluster.env,
        "KILN_REDIS_URL": cluster.redis.url.rsplit("/", 1)[0] + "/3",
        "KILN_NODE_MODULES": "tests.worker.nodes_for_tests,tests.e2e.affinity_nodes",
        "KILN_MODELS_DIRS": str(workdir / "models"),
        "KILN_INPUT_DIR": str(workdir / "input"),
        "KILN_JOB_TIMEOUT_S": "8",
        # Long, so that kombu's own redelivery cannot be what saves the killed worker's job.
        "KILN_VISIBILITY_TIMEOUT_S": "300",
        "KILN_ORPHAN_GRACE_S": "1",
        "KILN_REBALANCE_INTERVAL_S": "0.25",
        "KILN_MODELS_DEVICE_BUDGET_MB": str(MODEL_BUDGET_MB),
        "KILN_ROUTING_ADMIN_TENANTS": f'["{TENANT}"]',
    }
    mine = Cluster(workdir=workdir, redis=cluster.redis, s3=cluster.s3, gateway_port=free_port(), env=env)
    try:
        mine.start_gateway()
        for name in WORKERS:
            mine.start_worker(name)
        mine.wait_for_workers(*WORKERS)

        def hosts_ready() -> bool:
            with mine.http() as http:
                beats = http.get("/v1/workers").json()["workers"]
            return sum(bool(b.get("host_ready")) for b in beats if b["id"] in WORKERS) == len(WORKERS)

        wait_for(hosts_ready, 120, "the workers' engine hosts", interval=0.5)
        yield mine
    finally:
        for worker in mine.workers.values():
            worker.kill()
        if mine.gateway is not None:
            mine.gateway.kill()


def metric_sum(http: httpx.Client, name: str, **labels: str) -> float:
    """The sum of a metric's samples on /metrics whose labels include ``labels``."""
    total = 0.0
    for line in http.get("/metrics").text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def submit_all(http: httpx.Client, prompts: list[dict[str, Any]]) -> list[str]:
    """Submit every prompt at once (concurrently)."""
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as executor:
        responses = list(executor.map(lambda p: http.post("/v1/jobs", json={"prompt": p}), prompts))
    assert all(r.status_code == 202 for r in responses), [r.text for r in responses]
    return [r.json()["id"] for r in responses]


def test_alternating_jobs_load_each_model_about_once(pool: Cluster):
    with pool.http() as http:
        loads_before = metric_sum(http, "kiln_model_loads_total")
        prompts = [affinity_prompt(f"affinity-{'ab'[i % 2]}.safetensors", 0.3) for i in range(20)]
        ids = submit_all(http, prompts)
        jobs = [wait_job(http, job_id, timeout=120) for job_id in ids]
        assert all(job["status"] == "succeeded" for job in jobs), (jobs, pool.logs())
        loads = metric_sum(http, "kiln_model_loads_total") - loads_before
        assert 2 <= loads <= 4, http.get("/metrics").text
        # Affinity: each worker ran (almost) only one model.
        by_worker: dict[str, set[str]] = {}
        for job, prompt in zip(jobs, prompts, strict=True):
            by_worker.setdefault(job["worker"], set()).add(prompt["1"]["inputs"]["ckpt_name"])
        assert sum(len(models) for models in by_worker.values()) <= 4, by_worker
        assert metric_sum(http, "kiln_affinity_hits_total") >= 16
        # The pool view reports what each worker loaded, with the file's content hash.
        resident = {
            r["name"]: r["hash"]
            for worker in http.get("/v1/workers").json()["workers"]
            for r in worker["resident"]
        }
        for name in ("a", "b"):
            path = pool.workdir / "models" / "checkpoints" / f"affinity-{name}.safetensors"
            expected = hashlib.sha256(path.read_bytes()).hexdigest()
            assert resident[f"checkpoints/affinity-{name}.safetensors"] == expected
        workers = {w["id"]: w for w in http.get("/v1/workers").json()["workers"]}
        assert set(WORKERS) <= set(workers)
        assert all(workers[w]["load_seconds"] and workers[w]["job_seconds"] for w in WORKERS)
        # The model manager's budget and slots: both checkpoints fit.
        for w in WORKERS:
            assert workers[w]["model_memory"]["device_budget"] == MODEL_BUDGET_MB * 2**20, workers[w]
            assert workers[w]["model_slots"] >= 2, workers[w]
        assert metric_sum(http, "kiln_jobs_total", status="succeeded") >= 20
        assert metric_sum(http, "kiln_job_seconds_count", phase="total") >= 20


def test_a_pinned_model_is_preloaded_on_the_idle_worker(pool: Cluster):
    model, worker = "checkpoints/affinity-e.safetensors", WORKERS[0]
    tiny_checkpoint(pool.workdir / "models" / "checkpoints" / "affinity-e.safetensors", 4)
    with pool.http() as http:
        put = http.put(f"/v1/workers/{worker}/config", json={"pinned": [model]})
        assert put.status_code == 200, put.text
        try:

            def preloaded() -> bool:
                beats = {w["id"]: w for w in http.get("/v1/workers").json()["workers"]}
                return model in {r["name"] for r in beats[worker]["resident"]}

            wait_for(preloaded, 30, "the pinned model's preload", interval=0.2)
            assert metric_sum(http, "kiln_model_loads_total", model=model, worker=worker) == 1
            assert metric_sum(http, "kiln_preload_requests_total", reason="pinned") >= 1
            beat = next(w for w in http.get("/v1/workers").json()["workers"] if w["id"] == worker)
            assert model not in {p["model"] for p in beat["preload_requests"]}
        finally:
            http.put(f"/v1/workers/{worker}/config", json={"pinned": []})


@pytest.mark.timeout(240)
def test_kill_9_of_a_worker_mid_run_completes_every_job(pool: Cluster):
    with pool.http() as http:
        loads_before = metric_sum(http, "kiln_model_loads_total")
        prompts = [affinity_prompt(f"affinity-{'cd'[i % 2]}.safetensors", 0.6) for i in range(20)]
        ids = submit_all(http, prompts)

        def some_done() -> bool:
            return sum(http.get(f"/v1/jobs/{i}").json()["status"] == "succeeded" for i in ids) >= 4

        wait_for(some_done, 60, "the first jobs", interval=0.2)
        depths = {w["id"]: w["queue_depth"] for w in http.get("/v1/workers").json()["workers"]}
        victim = max(WORKERS, key=lambda w: depths.get(w, 0))
        pool.workers[victim].kill()  # kill -9 of the worker's process group, mid-run
        killed_at = time.monotonic()
        jobs = [wait_job(http, job_id, timeout=180) for job_id in ids]
        # Well before kombu's visibility timeout (300 s): the gateway redelivered the running job.
        assert time.monotonic() - killed_at < 90
        assert all(job["status"] == "succeeded" for job in jobs), (jobs, pool.logs())
        assert all(job["attempts"] <= 2 for job in jobs)
        survivor = next(w for w in WORKERS if w != victim)
        finished_after_kill = [job for job in jobs if job["worker"] == survivor]
        assert len(finished_after_kill) > 10  # it took over the victim's backlog
        assert metric_sum(http, "kiln_jobs_moved_total", reason="reap") >= 1
        loads = metric_sum(http, "kiln_model_loads_total") - loads_before
        assert loads <= 4, http.get("/metrics").text

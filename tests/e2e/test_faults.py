"""Faults with real processes: a killed engine host, a killed worker, a hung node, SIGTERM, a Redis
restart, cancellation. No accepted job may be lost, and none may produce outputs twice."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import boto3
import httpx
import pytest

from tests.e2e.conftest import BUCKET, TENANT, Cluster, wait_job
from tests.engine.prompts import invert_prompt
from tests.support.services import S3_ENV, wait_for


def slow_prompt(steps: int = 20, step_seconds: float = 0.25) -> dict[str, Any]:
    prompt = invert_prompt(width=8, height=8)
    prompt["2"] = {
        "class_type": "TestSlowInvert",
        "inputs": {"image": ["1", 0], "steps": steps, "step_seconds": step_seconds},
    }
    return prompt


def worker_state(http: httpx.Client, name: str) -> dict[str, Any]:
    for worker in http.get("/v1/workers").json()["workers"]:
        if worker["id"] == name:
            return worker
    raise KeyError(name)


def wait_running(
    http: httpx.Client, job_id: str, min_progress: int = 1, timeout: float = 120
) -> dict[str, Any]:
    def running() -> bool:
        job = http.get(f"/v1/jobs/{job_id}").json()
        return job["status"] == "running" and (job["progress"] or {}).get("value", 0) >= min_progress

    wait_for(running, timeout, f"job {job_id} running", interval=0.1)
    return http.get(f"/v1/jobs/{job_id}").json()


def stored_keys(cluster: Cluster, job_id: str) -> list[str]:
    s3 = boto3.client("s3", endpoint_url=cluster.s3.endpoint, region_name="us-east-1", **_credentials())
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{TENANT}/{job_id}/")
    return sorted(item["Key"] for item in listing.get("Contents", []))


def _credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
    }


def test_killed_engine_host_is_replaced_and_the_job_completes_once(cluster: Cluster):
    with cluster.http() as http:
        job_id = http.post("/v1/jobs", json={"prompt": slow_prompt(steps=12, step_seconds=0.2)}).json()["id"]
        running = wait_running(http, job_id, min_progress=2)
        host_pid = worker_state(http, running["worker"])["host_pid"]
        os.kill(host_pid, signal.SIGKILL)
        job = wait_job(http, job_id)
        assert job["status"] == "succeeded", (job, cluster.logs())
        assert job["attempts"] == 1  # retried inside the worker on a fresh host, not redelivered
        assert stored_keys(cluster, job_id) == [f"{TENANT}/{job_id}/3_0.png"]
        assert worker_state(http, running["worker"])["host_pid"] != host_pid


def test_hung_node_fails_at_its_deadline_and_the_next_job_runs(cluster: Cluster):
    with cluster.http() as http:
        hung = {"1": {"class_type": "TestSleepForever", "inputs": {"spawn_child": False}}}
        hung_id = http.post("/v1/jobs", json={"prompt": hung}).json()["id"]
        next_id = http.post("/v1/jobs", json={"prompt": invert_prompt()}).json()["id"]
        started = time.monotonic()
        job = wait_job(http, hung_id, timeout=120)
        assert job["status"] == "failed" and job["error"]["type"] == "deadline_exceeded", job
        assert time.monotonic() - started < 20 + 30
        assert wait_job(http, next_id)["status"] == "succeeded"


def test_cancel_running_job(cluster: Cluster):
    with cluster.http() as http:
        job_id = http.post("/v1/jobs", json={"prompt": slow_prompt(steps=200, step_seconds=0.1)}).json()["id"]
        wait_running(http, job_id)
        assert http.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelling"
        job = wait_job(http, job_id, timeout=60)
        assert job["status"] == "cancelled"
        assert stored_keys(cluster, job_id) == []


def test_killed_worker_job_is_redelivered_and_completes(cluster: Cluster):
    cluster.start_worker("worker-b")
    cluster.wait_for_workers("worker-a", "worker-b")
    with cluster.http() as http:
        job_id = http.post("/v1/jobs", json={"prompt": slow_prompt(steps=16, step_seconds=0.25)}).json()["id"]
        running = wait_running(http, job_id, min_progress=2)
        victim = running["worker"]
        cluster.workers[victim].kill()  # kill -9 of the worker's whole process group
        job = wait_job(http, job_id, timeout=180)
        assert job["status"] == "succeeded", (job, cluster.logs())
        assert job["worker"] != victim and job["attempts"] == 2
        assert stored_keys(cluster, job_id) == [f"{TENANT}/{job_id}/3_0.png"]
    cluster.start_worker(victim)
    cluster.wait_for_workers(victim)


def test_sigterm_requeues_the_running_job(cluster: Cluster):
    cluster.wait_for_workers("worker-a", "worker-b")
    with cluster.http() as http:
        job_id = http.post("/v1/jobs", json={"prompt": slow_prompt(steps=60, step_seconds=0.25)}).json()["id"]
        running = wait_running(http, job_id, min_progress=2)
        victim = running["worker"]
        cluster.workers[victim].process.send_signal(signal.SIGTERM)  # only the worker, as Kubernetes does
        cluster.workers[victim].process.wait(timeout=60)
        job = wait_job(http, job_id, timeout=180)
        assert job["status"] == "succeeded", (job, cluster.logs())
        assert job["worker"] != victim
        assert stored_keys(cluster, job_id) == [f"{TENANT}/{job_id}/3_0.png"]
    cluster.start_worker(victim)
    cluster.wait_for_workers(victim)


@pytest.mark.timeout(400)
def test_redis_restart_loses_no_accepted_job(cluster: Cluster):
    with cluster.http() as http:
        ids = [
            http.post("/v1/jobs", json={"prompt": slow_prompt(steps=4, step_seconds=0.2)}).json()["id"]
            for _ in range(6)
        ]
        wait_running(http, ids[0])
    cluster.redis.restart()  # kill -9, then start on the same port and data dir (AOF replay)
    with cluster.http() as http:
        wait_for(lambda: http.get("/readyz").status_code == 200, 60, "gateway ready again", interval=0.5)
        late = http.post("/v1/jobs", json={"prompt": invert_prompt()}).json()["id"]
        for job_id in [*ids, late]:
            job = wait_job(http, job_id, timeout=240)
            assert job["status"] == "succeeded", (job, cluster.logs())
            assert stored_keys(cluster, job_id) == [f"{TENANT}/{job_id}/3_0.png"]

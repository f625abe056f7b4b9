"""Webhook deliveries against a real redis-server and a real HTTP receiver on a local port."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from api.views import native_job
from tests.support.services import RedisServer, free_port, wait_for
from worker.protocol import JobError, JobRecord, JobStatus, Keys, OutputRecord, Progress
from worker.runner import JobRunner
from worker.settings import WorkerSettings
from worker.storage import FileStorage
from worker.webhooks import (
    JOB_FIELD,
    DeliveryOptions,
    WebhookDeliverer,
    WebhookKeys,
    WebhookRefused,
    enqueue,
    job_status,
    resolve_target,
    signature,
    verify_signature,
)

SECRET = "whsec-test"


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("webhooks-redis")).start()
    yield server
    server.stop()


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_server.url)
    connection.flushall()
    yield connection
    connection.close()


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """A tiny HTTP server: answers each POST with the next status of ``plan`` (then 200); with
    ``hold`` set, the first request waits for it before answering."""

    plan: list[int] = field(default_factory=list)
    hold: threading.Event | None = None
    requests: list[Received] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/kiln?source=test"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.requests.append(Received(dict(self.headers.items()), body, time.time()))
                if receiver.hold is not None and len(receiver.requests) == 1:
                    receiver.hold.wait(30)
                status = receiver.plan.pop(0) if receiver.plan else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.hold is not None:
            self.hold.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


@pytest.fixture
def storage(tmp_path: Path) -> FileStorage:
    return FileStorage(tmp_path / "storage", public_url="http://kiln.test:8188", signing_secret="dl-secret")


def options(**overrides: Any) -> DeliveryOptions:
    values: dict[str, Any] = {
        "secret": SECRET,
        "attempts": 5,
        "timeout_s": 5.0,
        "backoff_s": 0.05,
        "backoff_max_s": 1.0,
        "poll_s": 0.05,
        "allow_private": True,
        "public_url": "http://kiln.test:8188",
    }
    values.update(overrides)
    return DeliveryOptions(**values)


@pytest.fixture
def run_deliverer(client: redis.Redis, storage: FileStorage):
    started: list[WebhookDeliverer] = []

    def start(**overrides: Any) -> WebhookDeliverer:
        deliverer = WebhookDeliverer(client, options(**overrides), storage)
        deliverer.start()
        started.append(deliverer)
        return deliverer

    yield start
    for deliverer in started:
        deliverer.stop()
        deliverer.join(10)


def finished_job(
    client: redis.Redis, webhook: str, status: JobStatus = JobStatus.SUCCEEDED, job_id: str = "job-1"
) -> JobRecord:
    now = time.time()
    job = JobRecord(
        id=job_id,
        tenant="tenant-a",
        status=status,
        number=7,
        priority=5,
        prompt={"1": {"class_type": "EmptyImage", "inputs": {}}},
        webhook=webhook,
        created_at=now - 3,
        started_at=now - 2,
        finished_at=now - 1,
        worker="worker-a",
        attempts=1,
        progress=Progress(node="3", value=4, max=4),
        outputs=[
            OutputRecord(
                node_id="3",
                index=0,
                key=f"tenant-a/{job_id}/3_0.png",
                filename="3_0.png",
                subfolder=job_id,
                content_type="image/png",
                bytes=123,
                sha256="ab" * 32,
            )
        ],
        error=JobError(type="boom", message="it broke", node_id="2", traceback=["line"])
        if status == JobStatus.FAILED
        else None,
    )
    client.hset(Keys.job(job.id), mapping=job.to_redis())
    return job


def delivery_record(client: redis.Redis, job_id: str) -> dict[str, Any] | None:
    raw = client.hget(Keys.job(job_id), JOB_FIELD)
    return json.loads(raw) if raw else None


def outbox_empty(client: redis.Redis) -> bool:
    return client.llen(WebhookKeys.outbox()) == 0 and client.zcard(WebhookKeys.scheduled()) == 0


# -- the body and its signature ---------------------------------------------------------------------


class FixedStorage:
    def presign_get(self, key: str, expires_s: int) -> str:
        return f"https://bucket.example/{key}?X-Amz-Expires={expires_s}"


@pytest.mark.parametrize("status", [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED])
def test_body_is_what_get_v1_jobs_answers(client, status):
    job = finished_job(client, "http://example.com/hook", status)
    kwargs: dict[str, Any] = {
        "position": None,
        "storage": FixedStorage(),
        "expiry_s": 600,
        "public_url": "https://kiln.example/",
    }
    assert job_status(job, **kwargs) == native_job(job, **kwargs)


def test_signature_covers_timestamp_and_body():
    body = b'{"id":"x"}'
    now = time.time()
    timestamp = str(int(now))
    headers = {"X-Kiln-Timestamp": timestamp, "X-Kiln-Signature": signature(SECRET, timestamp, body)}
    expected = hmac.new(SECRET.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    assert headers["X-Kiln-Signature"] == f"sha256={expected}"
    assert verify_signature(SECRET, headers, body, now=now)
    assert not verify_signature("other-secret", headers, body, now=now)
    assert not verify_signature(SECRET, headers, body + b" ", now=now)
    replayed = {**headers, "X-Kiln-Timestamp": str(int(now) + 1)}
    assert not verify_signature(SECRET, replayed, body, now=now)
    assert not verify_signature(SECRET, headers, body, now=now + 301)  # too old: a replay


# -- delivery -----------------------------------------------------------------------------------


def test_signed_delivery_of_a_finished_job(client, receiver, run_deliverer, storage):
    job = finished_job(client, receiver.url)
    assert enqueue(client, job, JobStatus.SUCCEEDED)
    run_deliverer()
    wait_for(lambda: delivery_record(client, job.id) is not None, 10, "the delivery")
    [request] = receiver.requests
    headers = {k.lower(): v for k, v in request.headers.items()}
    assert verify_signature(SECRET, request.headers, request.body)
    assert headers["content-type"] == "application/json"
    assert headers["x-kiln-webhook-id"] == f"{job.id}.succeeded"
    assert headers["x-kiln-event"] == "job.succeeded" and headers["x-kiln-attempt"] == "1"
    body = json.loads(request.body)
    assert body["id"] == job.id and body["status"] == "succeeded"
    assert body["status_url"] == f"http://kiln.test:8188/v1/jobs/{job.id}"
    [output] = body["outputs"]
    assert output["sha256"] == "ab" * 32 and output["bytes"] == 123
    url = urllib.parse.urlsplit(output["url"])  # a presigned /v1/files URL the gateway accepts
    query = urllib.parse.parse_qs(url.query)
    assert url.path == f"/v1/files/tenant-a/{job.id}/3_0.png"
    assert storage.verify(output["key"], int(query["expires"][0]), query["signature"][0])
    record = delivery_record(client, job.id)
    assert record is not None
    assert record["status"] == "delivered" and record["attempts"] == 1 and record["status_code"] == 200
    assert outbox_empty(client) and client.llen(WebhookKeys.failed()) == 0


def test_retries_after_server_errors_with_backoff(client, receiver, run_deliverer):
    receiver.plan = [500, 503, 500]
    job = finished_job(client, receiver.url, JobStatus.FAILED)
    enqueue(client, job, JobStatus.FAILED)
    run_deliverer(backoff_s=0.1)
    wait_for(lambda: (delivery_record(client, job.id) or {}).get("status") == "delivered", 15, "delivery")
    assert len(receiver.requests) == 4
    ids = {r.headers["X-Kiln-Webhook-Id"] for r in receiver.requests}
    assert ids == {f"{job.id}.failed"}  # one id on every attempt: receivers deduplicate on it
    assert [r.headers["X-Kiln-Attempt"] for r in receiver.requests] == ["1", "2", "3", "4"]
    gaps = [b.at - a.at for a, b in zip(receiver.requests, receiver.requests[1:], strict=False)]
    # 0.1 s, 0.2 s, 0.4 s (+-20% jitter): exponential.
    assert gaps[0] >= 0.08 and gaps[1] >= 0.16 and gaps[2] >= 0.32, gaps
    assert all(verify_signature(SECRET, r.headers, r.body) for r in receiver.requests)
    assert json.loads(receiver.requests[-1].body)["error"] == {
        "type": "boom",
        "message": "it broke",
        "node_id": "2",
        "class_type": None,
    }
    assert delivery_record(client, job.id)["attempts"] == 4
    assert outbox_empty(client)


def test_gives_up_after_the_configured_attempts(client, receiver, run_deliverer):
    receiver.plan = [500] * 10
    job = finished_job(client, receiver.url)
    enqueue(client, job, JobStatus.SUCCEEDED)
    deliverer = run_deliverer(attempts=3)
    wait_for(lambda: client.llen(WebhookKeys.failed()) == 1, 15, "the delivery to be given up")
    time.sleep(0.3)  # no 4th attempt follows
    assert len(receiver.requests) == 3
    failed = json.loads(client.lindex(WebhookKeys.failed(), 0))
    assert failed["id"] == f"{job.id}.succeeded" and failed["job_id"] == job.id
    assert failed["attempts"] == 3 and failed["status_code"] == 500 and failed["error"] == "HTTP 500"
    record = delivery_record(client, job.id)
    assert record is not None and record["status"] == "failed" and record["attempts"] == 3
    assert outbox_empty(client) and deliverer.given_up == 1


def test_unreachable_receiver_is_retried_then_given_up(client, run_deliverer):
    job = finished_job(client, f"http://127.0.0.1:{free_port()}/nobody-listens")
    enqueue(client, job, JobStatus.SUCCEEDED)
    run_deliverer(attempts=2)
    wait_for(lambda: client.llen(WebhookKeys.failed()) == 1, 15, "the delivery to be given up")
    failed = json.loads(client.lindex(WebhookKeys.failed(), 0))
    assert failed["attempts"] == 2 and "ConnectionRefused" in failed["error"]


def test_private_addresses_are_refused_unless_allowed(client, receiver, run_deliverer):
    job = finished_job(client, receiver.url)
    enqueue(client, job, JobStatus.SUCCEEDED)
    run_deliverer(allow_private=False)
    wait_for(lambda: client.llen(WebhookKeys.failed()) == 1, 10, "the delivery to be refused")
    assert receiver.requests == []
    record = delivery_record(client, job.id)
    assert record["attempts"] == 1 and "non-public address" in record["error"]  # no retry


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/",
        "http://[::1]:8080/",
        "http://[::ffff:127.0.0.1]/",
        "http://0.0.0.0/",
        "http://localhost/",
        "ftp://example.com/",
        "http:///no-host",
        "http://exa mple.com/",
        "http://example.com/\r\nX-Injected: 1",
        "http://example.com:99999/",
        "http://" + "a" * 3000 + ".com/",
    ],
)
def test_refused_webhook_urls(url):
    with pytest.raises(WebhookRefused):
        resolve_target(url, allow_private=False)


def test_public_address_is_allowed_and_pinned():
    parsed, address, port = resolve_target("https://93.184.215.14:8443/x?y=1", allow_private=False)
    assert (parsed.hostname, address, port) == ("93.184.215.14", "93.184.215.14", 8443)


def test_a_deleted_job_is_given_up_at_once(client, receiver, run_deliverer):
    job = finished_job(client, receiver.url)
    enqueue(client, job, JobStatus.SUCCEEDED)
    client.delete(Keys.job(job.id))
    run_deliverer()
    wait_for(lambda: client.llen(WebhookKeys.failed()) == 1, 10, "the delivery to be given up")
    assert receiver.requests == [] and outbox_empty(client)


# -- durability -----------------------------------------------------------------------------------

CRASHING_DELIVERER = """
import sys, redis
from worker.webhooks import DeliveryOptions, WebhookDeliverer
options = DeliveryOptions(secret=sys.argv[2], allow_private=True, timeout_s=60, lease_s=1.0, poll_s=0.05)
WebhookDeliverer(redis.Redis.from_url(sys.argv[1]), options).run()
"""


def test_a_delivery_survives_its_deliverer_being_killed(client, redis_server, receiver, run_deliverer):
    """kill -9 of the deliverer while the receiver holds its request: after the claim's lease, a
    fresh deliverer sends it again (same id), and it is recorded delivered exactly once."""
    receiver.hold = threading.Event()
    job = finished_job(client, receiver.url)
    enqueue(client, job, JobStatus.SUCCEEDED)
    crashing = subprocess.Popen(
        [sys.executable, "-c", CRASHING_DELIVERER, redis_server.url, SECRET], start_new_session=True
    )
    try:
        wait_for(lambda: len(receiver.requests) == 1, 30, "the first attempt")
        assert client.llen(WebhookKeys.outbox()) == 0 and client.zcard(WebhookKeys.scheduled()) == 1
        os.killpg(crashing.pid, signal.SIGKILL)
    finally:
        crashing.kill()
        crashing.wait(10)
    receiver.hold.set()
    run_deliverer()
    wait_for(lambda: delivery_record(client, job.id) is not None, 15, "the redelivery")
    assert len(receiver.requests) == 2
    assert {r.headers["X-Kiln-Webhook-Id"] for r in receiver.requests} == {f"{job.id}.succeeded"}
    assert verify_signature(SECRET, receiver.requests[1].headers, receiver.requests[1].body)
    assert delivery_record(client, job.id)["status"] == "delivered" and outbox_empty(client)


def test_deliveries_queued_while_no_deliverer_runs_are_sent_later(client, receiver, run_deliverer):
    jobs = [finished_job(client, receiver.url, job_id=f"job-{i}") for i in range(5)]
    for job in jobs:
        enqueue(client, job, JobStatus.SUCCEEDED)
    assert client.llen(WebhookKeys.outbox()) == 5
    run_deliverer()
    run_deliverer()  # two worker processes share the outbox: each delivery is sent once
    wait_for(lambda: len(receiver.requests) == 5 and outbox_empty(client), 15, "all deliveries")
    time.sleep(0.2)
    ids = [r.headers["X-Kiln-Webhook-Id"] for r in receiver.requests]
    assert sorted(ids) == sorted(f"{job.id}.succeeded" for job in jobs)


# -- the runner queues the webhook when it finishes a job ----------------------------------------


def runner_for(client: redis.Redis) -> JobRunner:
    from worker.jobstore import JobStore

    settings = WorkerSettings(worker_id="worker-t", redis_url="redis://unused")
    # A job that needs no engine never touches the host or the storage.
    return JobRunner(settings=settings, store=JobStore(client), storage=None, host=None)  # type: ignore[arg-type]


def queued_job(client: redis.Redis, job_id: str, webhook: str | None, **fields: Any) -> JobRecord:
    job = JobRecord(
        id=job_id, tenant="t", status=JobStatus.QUEUED, number=1, prompt={}, webhook=webhook, **fields
    )
    client.hset(Keys.job(job_id), mapping=job.to_redis())
    return job


def outbox(client: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(WebhookKeys.outbox(), 0, -1)]


def test_runner_queues_the_webhook_of_a_job_it_finishes(client):
    queued_job(client, "a", "https://hooks.example/a", cancel_requested=True)
    queued_job(client, "b", None, cancel_requested=True)
    runner = runner_for(client)
    assert runner.run("a").status == "cancelled" and runner.run("b").status == "cancelled"
    [delivery] = outbox(client)
    assert delivery["id"] == "a.cancelled" and delivery["event"] == "job.cancelled"
    assert delivery["url"] == "https://hooks.example/a" and delivery["attempt"] == 0
    runner.run("a")  # a redelivered message of a finished job queues nothing more
    assert len(outbox(client)) == 1


def test_runner_queues_the_webhook_of_a_job_cancelled_while_queued(client):
    queued_job(client, "c", "https://hooks.example/c")
    client.hset(Keys.job("c"), mapping={"status": "cancelled", "finished_at": time.time()})
    assert runner_for(client).run("c").status == "cancelled"
    assert [d["id"] for d in outbox(client)] == ["c.cancelled"]

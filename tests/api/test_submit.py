"""Submitting and cancelling through the gateway against a real Redis: ComfyUI's ``node_errors``,
the error shapes of both APIs, webhook URLs, webhooks of cancelled jobs, and what a submit reads
and writes in Redis."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
import redis

from api.main import create_app
from api.settings import GatewaySettings
from engine.settings import EngineSettings
from tests.api.conftest import AUTH_A, gateway_settings
from tests.api.test_gateway import job_keys, png_bytes, queued_messages
from tests.engine.prompts import invert_prompt, two_branch_prompt
from tests.worker.test_webhooks import Receiver
from worker.protocol import QUEUE_CHANGED, Channels, Keys
from worker.webhooks import DeliveryOptions, WebhookDeliverer, WebhookKeys


def assert_kiln_error(response: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "node_errors"} and body["node_errors"] == {}, body
    assert set(body["error"]) == {"type", "message", "details", "extra_info"}, body
    assert body["error"]["type"] == error_type, body
    return body


# -- ComfyUI's node_errors ------------------------------------------------------------------------


def test_post_prompt_answers_the_node_errors_of_outputs_it_will_not_run(client):
    prompt = two_branch_prompt()
    prompt["4"]["inputs"]["width"] = 0  # the second branch is invalid, the first runs
    response = client.post("/prompt", json={"prompt": prompt}, headers=AUTH_A)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"prompt_id", "number", "node_errors"}
    errors = body["node_errors"]["4"]
    assert errors["class_type"] == "EmptyImage" and errors["dependent_outputs"] == ["6"]
    assert [e["type"] for e in errors["errors"]] == ["value_smaller_than_min"]
    [item] = client.get("/queue", headers=AUTH_A).json()["queue_pending"]
    assert item[1] == body["prompt_id"] and item[4] == ["3"]  # only the valid output runs


def test_post_prompt_with_no_valid_output_is_400_in_comfyuis_shape(client, redis_client):
    prompt = invert_prompt()
    prompt["1"]["inputs"]["width"] = 0
    response = client.post("/prompt", json={"prompt": prompt}, headers=AUTH_A)
    assert response.status_code == 400
    body = response.json()
    assert set(body) == {"error", "node_errors"}
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert body["node_errors"]["1"]["dependent_outputs"] == ["3"]
    assert job_keys(redis_client) == []


# -- error shapes -----------------------------------------------------------------------------------


def test_v1_framework_errors_have_kilns_shape(client):
    assert_kiln_error(client.get("/v1/nothing-here", headers=AUTH_A), 404, "not_found")
    wrong_method = client.patch("/v1/jobs", json={}, headers=AUTH_A)
    assert_kiln_error(wrong_method, 405, "method_not_allowed")
    assert "POST" in wrong_method.headers["allow"]
    bad_query = assert_kiln_error(client.get("/v1/jobs?limit=0", headers=AUTH_A), 422, "invalid_request")
    assert bad_query["error"]["details"] == "query.limit"
    assert bad_query["error"]["extra_info"]["errors"][0]["loc"] == ["query", "limit"]
    bad_status = client.get("/v1/jobs?status=sleeping", headers=AUTH_A)
    assert_kiln_error(bad_status, 422, "invalid_request")
    bad_body = client.put("/v1/workers/w1/config", json={"pinned": 5}, headers=AUTH_A)
    assert_kiln_error(bad_body, 422, "invalid_request")
    unsigned = client.get("/v1/files/tenant-a/x/3_0.png")
    assert_kiln_error(unsigned, 422, "invalid_request")
    long_key = {**AUTH_A, "Idempotency-Key": "k" * 201}
    response = client.post("/v1/jobs", json={"prompt": invert_prompt()}, headers=long_key)
    assert_kiln_error(response, 422, "invalid_request")


def test_comfyui_routes_keep_comfyuis_answers(client):
    missing = client.get("/no/such/route", headers=AUTH_A)
    assert missing.status_code == 404 and missing.text == "404: Not Found"
    wrong_method = client.put("/prompt", json={}, headers=AUTH_A)
    assert wrong_method.status_code == 405 and wrong_method.text == "405: Method Not Allowed"
    # Kiln's own errors keep ComfyUI's error shape there too.
    assert_kiln_error(client.get("/api/jobs/nope", headers=AUTH_A), 404, "not_found")
    no_file = client.post("/upload/image", data={"subfolder": "x"}, headers=AUTH_A)
    assert no_file.status_code == 422 and "detail" in no_file.json()


def test_a_server_error_has_kilns_shape_on_v1_and_comfyuis_elsewhere(redis_server, redis_client, tmp_path):
    from fastapi.testclient import TestClient

    # A damaged record (not JSON where JSON belongs) makes reading the job fail unexpectedly.
    redis_client.hset(Keys.job("broken"), mapping={"id": "broken", "tenant": "tenant-a", "prompt": "{no"})
    app = create_app(gateway_settings(redis_server.url, tmp_path), EngineSettings())
    with TestClient(app, raise_server_exceptions=False) as client:
        native = client.get("/v1/jobs/broken", headers=AUTH_A)
        assert_kiln_error(native, 500, "server_error")
        comfy = client.get("/api/jobs/broken", headers=AUTH_A)
        assert comfy.status_code == 500 and comfy.text == "500: Internal Server Error"


# -- webhook URLs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "ftp://hooks.example.com/x",
        "https://",
        "http:///path",
        "https://hooks.example.com/" + "a" * 2100,
        "https://hooks.example.com/a b",
        "https://hooks.example.com/\x00",
        "http://hooks.example.com:99999/x",
        "http://127.0.0.1:8080/x",
        "http://[::1]/x",
        "http://localhost/x",
        "http://10.1.2.3/x",
        "http://169.254.169.254/latest/meta-data",
        "http://[::ffff:192.168.0.1]/x",
    ],
    ids=lambda url: url[:40],
)
def test_unusable_webhook_urls_are_refused_at_submit(client, redis_client, url):
    response = client.post("/v1/jobs", json={"prompt": invert_prompt(), "webhook": url}, headers=AUTH_A)
    body = assert_bad_request(response)
    assert body["error"]["message"].startswith("webhook") and body["error"]["details"] == "webhook"
    assert job_keys(redis_client) == []


def assert_bad_request(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"]["type"] == "invalid_prompt"
    return body


def test_webhook_settings_allow_private_addresses_and_limit_hosts(make_client):
    private = make_client(webhook_allow_private=True)
    body = {"prompt": invert_prompt(), "webhook": "http://127.0.0.1:9/hook"}
    assert private.post("/v1/jobs", json=body, headers=AUTH_A).status_code == 202
    limited = make_client(webhook_allowed_hosts=["*.example.com", "hooks.partner.io"])
    for url, status in [
        ("https://hooks.example.com/k", 202),
        ("https://HOOKS.PARTNER.IO./k", 202),
        ("https://example.com.evil.net/k", 400),
        ("https://partner.io/k", 400),
    ]:
        body = {"prompt": invert_prompt(), "webhook": url}
        assert limited.post("/v1/jobs", json=body, headers=AUTH_A).status_code == status, url


def test_webhook_allowed_hosts_from_the_environment(monkeypatch):
    monkeypatch.setenv("KILN_WEBHOOK_ALLOWED_HOSTS", "*.Example.com, hooks.partner.io")
    settings = GatewaySettings(insecure=True)
    assert settings.webhook_allowed_hosts == ["*.example.com", "hooks.partner.io"]
    monkeypatch.setenv("KILN_WEBHOOK_ALLOWED_HOSTS", '["a.io"]')
    assert GatewaySettings(insecure=True).webhook_allowed_hosts == ["a.io"]


# -- cancelling a queued job sends its webhook --------------------------------------------------------


def outbox(client: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in client.lrange(WebhookKeys.outbox(), 0, -1)]


def test_cancelling_a_queued_job_queues_its_webhook_once(make_client, redis_client):
    client = make_client(webhook_allow_private=True)
    url = "https://hooks.example.com/kiln"
    job_id = client.post("/v1/jobs", json={"prompt": invert_prompt(), "webhook": url}, headers=AUTH_A).json()[
        "id"
    ]
    plain = client.post("/v1/jobs", json={"prompt": invert_prompt()}, headers=AUTH_A).json()["id"]
    assert client.delete(f"/v1/jobs/{job_id}", headers=AUTH_A).json()["status"] == "cancelled"
    assert client.delete(f"/v1/jobs/{plain}", headers=AUTH_A).json()["status"] == "cancelled"
    assert client.delete(f"/v1/jobs/{job_id}", headers=AUTH_A).json()["status"] == "cancelled"
    [delivery] = outbox(redis_client)
    assert delivery["id"] == f"{job_id}.cancelled" and delivery["event"] == "job.cancelled"
    assert delivery["job_id"] == job_id and delivery["url"] == url and delivery["attempt"] == 0
    # ComfyUI's queue delete cancels through the same script.
    other = client.post("/v1/jobs", json={"prompt": invert_prompt(), "webhook": url}, headers=AUTH_A).json()[
        "id"
    ]
    client.post("/queue", json={"delete": [other]}, headers=AUTH_A)
    assert [d["id"] for d in outbox(redis_client)] == [f"{other}.cancelled", f"{job_id}.cancelled"]


def test_the_webhook_of_a_cancelled_job_is_delivered(make_client, redis_client):
    receiver = Receiver().start()
    deliverer = WebhookDeliverer(
        redis_client, DeliveryOptions(allow_private=True, poll_s=0.05, public_url="http://kiln.test")
    )
    deliverer.start()
    try:
        client = make_client(webhook_allow_private=True)
        body = {"prompt": invert_prompt(), "webhook": receiver.url}
        job_id = client.post("/v1/jobs", json=body, headers=AUTH_A).json()["id"]
        client.delete(f"/v1/jobs/{job_id}", headers=AUTH_A)
        deadline = time.monotonic() + 10
        while not receiver.requests and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        deliverer.stop()
        deliverer.join(10)
        receiver.stop()
    [request] = receiver.requests
    headers = {k.lower(): v for k, v in request.headers.items()}
    assert (
        headers["x-kiln-event"] == "job.cancelled" and headers["x-kiln-webhook-id"] == f"{job_id}.cancelled"
    )
    sent = json.loads(request.body)
    assert sent["id"] == job_id and sent["status"] == "cancelled" and sent["error"]["type"] == "cancelled"


# -- what a submit reads and writes ----------------------------------------------------------------


def test_a_prompt_id_is_used_once_however_many_submit_it_at_once(redis_server, redis_client, tmp_path):
    app = create_app(gateway_settings(redis_server.url, tmp_path), EngineSettings())

    async def main() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://kiln") as http:
                body = {"prompt": invert_prompt(), "prompt_id": "mine-1"}
                return await asyncio.gather(
                    *(http.post("/prompt", json=body, headers=AUTH_A) for _ in range(30))
                )

    responses = asyncio.run(main())
    assert sorted(r.status_code for r in responses) == [200] + [400] * 29
    refused = next(r for r in responses if r.status_code == 400).json()
    assert refused["error"]["type"] == "invalid_prompt" and "already used" in refused["error"]["message"]
    assert queued_messages(redis_client) == 1 and redis_client.zcard(Keys.pending()) == 1


def test_the_create_cancel_and_finish_scripts_announce_queue_changes(client, redis_client):
    from worker.jobstore import JobStore
    from worker.protocol import JobStatus

    events = redis_client.pubsub(ignore_subscribe_messages=True)
    events.subscribe(Channels.broadcast())
    try:
        cancelled = client.post("/v1/jobs", json={"prompt": invert_prompt()}, headers=AUTH_A).json()["id"]
        client.delete(f"/v1/jobs/{cancelled}", headers=AUTH_A)
        finished = client.post("/v1/jobs", json={"prompt": invert_prompt()}, headers=AUTH_A).json()["id"]
        store = JobStore(redis_client)
        assert store.claim(finished, "w1") == "queued"
        job = store.get(finished)
        assert job is not None and store.finish(job, JobStatus.SUCCEEDED)
        received = []
        deadline = time.monotonic() + 5
        while len(received) < 4 and time.monotonic() < deadline:
            message = events.get_message(timeout=0.5)
            if message is not None:
                received.append(message["data"].decode())
        assert received == [QUEUE_CHANGED] * 4  # created, cancelled, created, finished
    finally:
        events.close()


def command_calls(client: redis.Redis, command: str) -> int:
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_a_submit_reads_uploads_only_for_prompts_that_name_one(make_client, redis_client):
    client = make_client(inventory_cache_s=60.0)
    client.post("/upload/image", files={"image": ("cat.png", png_bytes(), "image/png")}, headers=AUTH_A)
    load = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "cat.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    assert client.post("/prompt", json={"prompt": invert_prompt()}, headers=AUTH_A).status_code == 200
    redis_client.config_resetstat()
    for _ in range(5):
        assert client.post("/prompt", json={"prompt": invert_prompt()}, headers=AUTH_A).status_code == 200
    # No uploads read, and the (empty) model inventory is cached like any other.
    assert command_calls(redis_client, "smembers") == 0
    assert client.post("/prompt", json={"prompt": load}, headers=AUTH_A).status_code == 200
    assert command_calls(redis_client, "smembers") == 1
    missing = {**load, "1": {"class_type": "LoadImage", "inputs": {"image": "dog.png"}}}
    refused = client.post("/prompt", json={"prompt": missing}, headers=AUTH_A)
    assert refused.json()["node_errors"]["1"]["errors"][0]["type"] == "value_not_in_list"


def test_get_prompt_and_the_websocket_count_queued_and_running_jobs(client, redis_client):
    for _ in range(3):
        client.post("/prompt", json={"prompt": invert_prompt()}, headers=AUTH_A)
    assert client.get("/prompt", headers=AUTH_A).json() == {"exec_info": {"queue_remaining": 3}}
    with client.websocket_connect("/ws?clientId=c1&token=key-a") as socket:
        first = socket.receive_json()
        assert first["data"]["status"]["exec_info"]["queue_remaining"] == 3
        # A burst of changes: statuses are coalesced, and the last says how many remain.
        ids = [
            client.post("/prompt", json={"prompt": invert_prompt()}, headers=AUTH_A).json() for _ in range(5)
        ]
        client.post("/queue", json={"delete": [i["prompt_id"] for i in ids[:2]]}, headers=AUTH_A)
        remaining = None
        deadline = time.monotonic() + 5
        while remaining != 6 and time.monotonic() < deadline:
            message = socket.receive_json()
            remaining = message["data"]["status"]["exec_info"]["queue_remaining"]
        assert remaining == 6

"""The gateway against a real Redis: ComfyUI routes, /v1, auth, limits, idempotency, uploads."""

from __future__ import annotations

import asyncio
import io
import json

import httpx
import pytest
from PIL import Image

from api.main import create_app
from engine.settings import EngineSettings
from tests.api.conftest import AUTH_A, AUTH_B, gateway_settings
from tests.engine.prompts import invert_prompt
from worker.celery_wire import PRIORITY_SEPARATOR
from worker.protocol import DEFAULT_QUEUE, Keys


def job_keys(redis_client) -> list[bytes]:
    """Everything a job leaves in Redis (rate-limit buckets and the rebalancing lease of the
    gateway's background loop are not job state)."""
    return sorted(
        k for k in redis_client.keys("*") if not k.startswith(b"kiln:rate:") and k != b"kiln:rebalance-lock"
    )


def queued_messages(redis_client) -> int:
    return sum(
        redis_client.llen(DEFAULT_QUEUE + suffix)
        for suffix in ["", *(f"{PRIORITY_SEPARATOR}{s}" for s in (3, 6, 9))]
    )


def png_bytes(color=(10, 20, 30), size=(8, 8), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


# -- auth --------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"X-API-Key": "wrong"}])
def test_requests_without_a_valid_key_are_401(client, headers, redis_client):
    response = client.post("/prompt", json={"prompt": invert_prompt()}, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "unauthorized"
    assert job_keys(redis_client) == []


def test_key_in_header_or_query(client):
    assert client.get("/queue", headers={"X-API-Key": "key-a"}).status_code == 200
    assert client.get("/queue?token=key-a").status_code == 200


def test_insecure_mode_needs_no_key(make_client):
    client = make_client(insecure=True, api_keys={})
    response = client.post("/prompt", json={"prompt": invert_prompt()})
    assert response.status_code == 200


def test_another_tenants_job_is_404(client):
    prompt_id = client.post("/prompt", json={"prompt": invert_prompt()}, headers=AUTH_A).json()["prompt_id"]
    assert client.get(f"/v1/jobs/{prompt_id}", headers=AUTH_A).status_code == 200
    assert client.get(f"/v1/jobs/{prompt_id}", headers=AUTH_B).status_code == 404
    assert client.delete(f"/v1/jobs/{prompt_id}", headers=AUTH_B).status_code == 404
    assert client.get("/queue", headers=AUTH_B).json() == {"queue_running": [], "queue_pending": []}


# -- ComfyUI routes ------------------------------------------------------------------------------


def test_post_prompt_records_and_queues_the_job(client, redis_client):
    prompt = invert_prompt()
    response = client.post("/prompt", json={"prompt": prompt, "client_id": "c1"}, headers=AUTH_A)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"prompt_id", "number", "node_errors"} and body["node_errors"] == {}
    record = redis_client.hgetall(Keys.job(body["prompt_id"]))
    assert record[b"status"] == b"queued" and record[b"tenant"] == b"tenant-a"
    assert json.loads(record[b"prompt"]) == prompt
    assert queued_messages(redis_client) == 1
    message = json.loads(redis_client.lrange(DEFAULT_QUEUE + f"{PRIORITY_SEPARATOR}3", 0, -1)[0])
    assert message["headers"]["task"] == "kiln.run_job" and message["headers"]["id"] == body["prompt_id"]

    queue = client.get("/queue", headers=AUTH_A).json()
    assert queue["queue_running"] == []
    [item] = queue["queue_pending"]
    assert item[1] == body["prompt_id"] and item[2] == prompt and item[4] == ["3"]
    assert client.get("/prompt", headers=AUTH_A).json() == {"exec_info": {"queue_remaining": 1}}
    assert client.get(f"/history/{body['prompt_id']}", headers=AUTH_A).json() == {}


def test_numbers_increase_and_front_jumps_the_queue(client):
    first = client.post("/prompt", json={"prompt": invert_prompt()}, headers=AUTH_A).json()
    second = client.post("/prompt", json={"prompt": invert_prompt()}, headers=AUTH_A).json()
    urgent = client.post("/prompt", json={"prompt": invert_prompt(), "front": True}, headers=AUTH_A).json()
    assert first["number"] < second["number"] < urgent["number"]
    pending = [item[1] for item in client.get("/queue", headers=AUTH_A).json()["queue_pending"]]
    assert pending == [urgent["prompt_id"], first["prompt_id"], second["prompt_id"]]


def test_queue_delete_and_clear_cancel_queued_jobs(client):
    ids = [
        client.post("/prompt", json={"prompt": invert_prompt()}, headers=AUTH_A).json()["prompt_id"]
        for _ in range(3)
    ]
    assert client.post("/queue", json={"delete": [ids[0]]}, headers=AUTH_A).status_code == 200
    assert client.get(f"/v1/jobs/{ids[0]}", headers=AUTH_A).json()["status"] == "cancelled"
    client.post("/queue", json={"clear": True}, headers=AUTH_A)
    assert client.get("/queue", headers=AUTH_A).json()["queue_pending"] == []
    history = client.get("/history", headers=AUTH_A).json()
    assert set(history) == set(ids)
    assert all(entry["status"]["status_str"] == "error" for entry in history.values())
    client.post("/history", json={"delete": [ids[1]]}, headers=AUTH_A)
    assert set(client.get("/history", headers=AUTH_A).json()) == {ids[0], ids[2]}
    client.post("/history", json={"clear": True}, headers=AUTH_A)
    assert client.get("/history", headers=AUTH_A).json() == {}


def test_object_info_and_models(client, redis_client):
    redis_client.sadd(Keys.inventory("checkpoints"), "sd15.safetensors")
    redis_client.sadd(Keys.inventory_folders(), "checkpoints")
    info = client.get("/object_info", headers=AUTH_A).json()
    assert info["SaveImage"]["output_node"] is True
    assert client.get("/object_info/ImageInvert", headers=AUTH_A).json()["ImageInvert"]["output"] == ["IMAGE"]
    assert client.get("/api/object_info/Nope", headers=AUTH_A).json() == {}
    assert "checkpoints" in client.get("/models", headers=AUTH_A).json()
    assert client.get("/models/checkpoints", headers=AUTH_A).json() == ["sd15.safetensors"]
    assert client.get("/models/nonsense", headers=AUTH_A).status_code == 404


def test_api_prefix_serves_the_same_routes(client):
    response = client.post("/api/prompt", json={"prompt": invert_prompt()}, headers=AUTH_A)
    assert response.status_code == 200
    assert (
        client.get("/api/queue", headers=AUTH_A).json()["queue_pending"][0][1] == response.json()["prompt_id"]
    )
    jobs = client.get("/api/jobs", headers=AUTH_A).json()
    assert jobs["jobs"][0]["id"] == response.json()["prompt_id"] and jobs["jobs"][0]["status"] == "pending"
    assert jobs["pagination"]["total"] == 1


def test_upload_then_load_image(client, redis_client, tmp_path):
    response = client.post(
        "/upload/image",
        files={"image": ("cat.png", png_bytes(), "image/png")},
        data={"subfolder": "pets"},
        headers=AUTH_A,
    )
    assert response.status_code == 200
    assert response.json() == {"name": "cat.png", "subfolder": "pets", "type": "input"}
    again = client.post(
        "/upload/image",
        files={"image": ("cat.png", png_bytes(), "image/png")},
        data={"subfolder": "pets"},
        headers=AUTH_A,
    )
    assert again.json()["name"] == "cat (1).png"
    view = client.get(
        "/view", params={"filename": "cat.png", "subfolder": "pets", "type": "input"}, headers=AUTH_A
    )
    assert view.status_code == 200 and view.content == png_bytes()
    assert (
        client.get(
            "/view", params={"filename": "cat.png", "subfolder": "pets", "type": "input"}, headers=AUTH_B
        ).status_code
        == 404
    )

    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "pets/cat.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }
    assert client.post("/prompt", json={"prompt": prompt}, headers=AUTH_A).status_code == 200
    # Tenant b did not upload it: value_not_in_list.
    refused = client.post("/prompt", json={"prompt": prompt}, headers=AUTH_B)
    assert refused.status_code == 400
    assert refused.json()["node_errors"]["1"]["errors"][0]["type"] == "value_not_in_list"


def test_upload_mask_puts_alpha_on_the_original(client):
    client.post(
        "/upload/image", files={"image": ("base.png", png_bytes((200, 0, 0)), "image/png")}, headers=AUTH_A
    )
    mask = png_bytes((0, 0, 0, 128), mode="RGBA")
    ref = json.dumps({"filename": "base.png", "subfolder": "", "type": "input"})
    response = client.post(
        "/upload/mask",
        files={"image": ("mask.png", mask, "image/png")},
        data={"original_ref": ref},
        headers=AUTH_A,
    )
    assert response.status_code == 200
    view = client.get("/view", params={"filename": response.json()["name"], "type": "input"}, headers=AUTH_A)
    image = Image.open(io.BytesIO(view.content))
    assert image.mode == "RGBA" and image.getpixel((0, 0)) == (200, 0, 0, 128)


@pytest.mark.parametrize(
    ("filename", "data"),
    [("evil.gif", b"GIF89a" + b"\0" * 20), ("notes.txt", b"hello"), ("../up.png", None)],
)
def test_bad_uploads_are_refused(client, redis_client, filename, data):
    response = client.post(
        "/upload/image", files={"image": (filename, data or png_bytes(), "image/png")}, headers=AUTH_A
    )
    if filename.startswith(".."):
        # The directory part of an uploaded file name is dropped, as ComfyUI does.
        assert response.status_code == 200 and response.json()["name"] == "up.png"
    else:
        assert response.status_code == 400
        assert redis_client.smembers(Keys.uploads("tenant-a")) == set()


def test_view_refuses_traversal(client):
    response = client.get("/view", params={"filename": "../../etc/passwd", "type": "output"}, headers=AUTH_A)
    assert response.status_code == 404


# -- /v1 ------------------------------------------------------------------------------------------


def test_v1_job_lifecycle_while_queued(client):
    response = client.post("/v1/jobs", json={"prompt": invert_prompt(), "priority": 7}, headers=AUTH_A)
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued" and body["status_url"].endswith(f"/v1/jobs/{body['id']}")
    job = client.get(f"/v1/jobs/{body['id']}", headers=AUTH_A).json()
    assert job["status"] == "queued" and job["queue_position"] == 0 and job["priority"] == 7
    assert job["outputs"] == [] and job["error"] is None
    listing = client.get("/v1/jobs", params={"status": "queued"}, headers=AUTH_A).json()
    assert [j["id"] for j in listing["jobs"]] == [body["id"]]
    cancelled = client.delete(f"/v1/jobs/{body['id']}", headers=AUTH_A)
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    assert client.get(f"/v1/jobs/{body['id']}", headers=AUTH_A).json()["status"] == "cancelled"
    assert client.get("/v1/jobs", params={"status": "queued"}, headers=AUTH_A).json()["jobs"] == []


def test_v1_validation_error_shape(client, redis_client):
    prompt = invert_prompt()
    prompt["1"]["inputs"]["width"] = 0
    response = client.post("/v1/jobs", json={"prompt": prompt}, headers=AUTH_A)
    assert response.status_code == 400
    assert response.json()["node_errors"]["1"]["errors"][0]["type"] == "value_smaller_than_min"
    assert job_keys(redis_client) == []


def test_openapi_schema_documents_v1(client):
    schema = client.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/workers", "/prompt", "/history/{prompt_id}"} <= set(
        schema["paths"]
    )
    assert "prompt" in json.dumps(schema["paths"]["/v1/jobs"]["post"])


# -- limits ---------------------------------------------------------------------------------------


def test_rate_limit_answers_429_with_retry_after(make_client):
    client = make_client(rate_limit_per_s=0.5, rate_limit_burst=2)
    codes = [
        client.post("/prompt", json={"prompt": invert_prompt()}, headers=AUTH_A).status_code for _ in range(3)
    ]
    assert codes == [200, 200, 429]
    response = client.post("/prompt", json={"prompt": invert_prompt()}, headers=AUTH_A)
    assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
    # Another tenant has its own bucket.
    assert client.post("/prompt", json={"prompt": invert_prompt()}, headers=AUTH_B).status_code == 200


def test_queued_jobs_cap(make_client):
    client = make_client(max_queued_per_tenant=2)
    codes = [
        client.post("/v1/jobs", json={"prompt": invert_prompt()}, headers=AUTH_A).status_code
        for _ in range(3)
    ]
    assert codes == [202, 202, 429]


def test_body_size_limit_is_413(make_client, redis_client):
    client = make_client(EngineSettings(max_body_bytes=2000))
    prompt = invert_prompt(prefix="p" * 3000)
    response = client.post("/prompt", json={"prompt": prompt}, headers=AUTH_A)
    assert response.status_code == 413
    assert job_keys(redis_client) == []


def test_idempotency_key_creates_one_job_under_concurrency(redis_server, redis_client, tmp_path):
    app = create_app(gateway_settings(redis_server.url, tmp_path), EngineSettings())

    async def main() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://kiln") as http:
                headers = {**AUTH_A, "Idempotency-Key": "order-42"}
                return await asyncio.gather(
                    *(
                        http.post("/v1/jobs", json={"prompt": invert_prompt()}, headers=headers)
                        for _ in range(50)
                    )
                )

    responses = asyncio.run(main())
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    assert sorted(r.status_code for r in responses).count(202) == 1
    assert queued_messages(redis_client) == 1
    assert redis_client.zcard(Keys.pending()) == 1


# -- health ---------------------------------------------------------------------------------------


def test_health_ready_metrics_stats(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    client.post("/prompt", json={"prompt": invert_prompt()}, headers=AUTH_A)
    metrics = client.get("/metrics").text
    assert 'kiln_jobs_submitted_total{tenant="tenant-a"} 1.0' in metrics
    assert 'kiln_http_request_seconds_count{method="POST",route="/prompt"} 1.0' in metrics
    stats = client.get("/system_stats", headers=AUTH_A).json()
    assert set(stats) == {"system", "devices"}
    assert client.get("/v1/workers", headers=AUTH_A).json() == {"workers": []}


def test_readyz_reports_a_dead_redis(make_client, tmp_path):
    from tests.support.services import free_port

    client = make_client(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    response = client.get("/readyz")
    assert response.status_code == 503 and "redis" in response.json()["problems"]


def test_gateway_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, api.main; api.main.create_app; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr

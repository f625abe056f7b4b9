"""End to end through real processes: gateway (uvicorn), redis-server, S3 (moto), Celery workers."""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from tests.e2e.conftest import AUTH, TENANT, Cluster, wait_job
from tests.engine.prompts import invert_prompt
from tests.support.services import free_port, kiln_process, wait_for


def poll_history(http: httpx.Client, prompt_id: str, timeout: float = 180) -> dict:
    """What ComfyUI clients do: poll /history/{id} until it appears."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = http.get(f"/history/{prompt_id}").json()
        if prompt_id in history:
            return history[prompt_id]
        time.sleep(0.2)
    raise TimeoutError(prompt_id)


def test_comfyui_client_flow(cluster: Cluster):
    with cluster.http() as http:
        prompt = invert_prompt(color=0x204060, width=16, height=8)
        response = http.post("/prompt", json={"prompt": prompt, "client_id": "e2e-client"})
        assert response.status_code == 200, response.text
        prompt_id = response.json()["prompt_id"]
        entry = poll_history(http, prompt_id)
        assert entry["status"]["status_str"] == "success", cluster.logs()
        assert entry["status"]["completed"] is True
        [image] = entry["outputs"]["3"]["images"]
        assert image["type"] == "output" and image["subfolder"] == prompt_id
        view = http.get("/view", params=image)
        assert view.status_code == 200
        pixels = np.array(Image.open(io.BytesIO(view.content)))
        channels = np.array([0x20 / 255, 0x40 / 255, 0x60 / 255], dtype=np.float32)
        expected = (np.float32(255.0) * (np.float32(1.0) - channels)).astype(np.uint8)
        assert pixels.shape == (8, 16, 3) and (pixels == expected).all()
        assert json.loads(Image.open(io.BytesIO(view.content)).text["prompt"]) == prompt


def test_native_api_with_presigned_url(cluster: Cluster):
    with cluster.http() as http:
        response = http.post("/v1/jobs", json={"prompt": invert_prompt()})
        assert response.status_code == 202, response.text
        job = wait_job(http, response.json()["id"])
        assert job["status"] == "succeeded", (job, cluster.logs())
        [output] = job["outputs"]
        assert output["key"] == f"e2e/{job['id']}/3_0.png"
        download = httpx.get(output["url"], timeout=30)  # straight from the object store
        assert download.status_code == 200
        assert hashlib.sha256(download.content).hexdigest() == output["sha256"]
        assert len(download.content) == output["bytes"]
        assert job["worker"] == "worker-a" and job["timings"]["run_s"] > 0


def test_websocket_receives_events_in_order(cluster: Cluster):
    import websockets.sync.client as ws_client

    url = cluster.url.replace("http", "ws") + f"/ws?clientId=ws-client&token={AUTH['Authorization'][7:]}"
    with ws_client.connect(url, open_timeout=30) as socket, cluster.http() as http:
        first = json.loads(socket.recv(timeout=30))
        assert first["type"] == "status" and first["data"]["sid"] == "ws-client"
        prompt = invert_prompt()
        prompt["2"] = {
            "class_type": "TestSlowInvert",
            "inputs": {"image": ["1", 0], "steps": 3, "step_seconds": 0.05},
        }
        prompt_id = http.post("/prompt", json={"prompt": prompt, "client_id": "ws-client"}).json()[
            "prompt_id"
        ]
        seen = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            message = socket.recv(timeout=120)
            if isinstance(message, bytes):
                continue
            event = json.loads(message)
            if event["type"] == "status":
                continue
            assert event["data"]["prompt_id"] == prompt_id
            seen.append((event["type"], event["data"].get("node"), event["data"].get("value")))
            if event["type"] == "executing" and event["data"]["node"] is None:
                break
    types = [t for t, _, _ in seen]
    assert types[:2] == ["execution_start", "execution_cached"]
    assert ("executing", "2", None) in seen
    assert [v for t, _, v in seen if t == "progress"] == [1, 2, 3]
    assert types.index("executed") < types.index("execution_success") < len(types) - 1
    assert seen[-1] == ("executing", None, None)


def test_several_gateway_processes_share_the_port_and_sum_their_metrics(cluster: Cluster):
    """``kiln serve --gateway-processes 2``: two uvicorn processes on one port, the same Redis; a
    client sees one gateway, and /metrics counts what every process did."""
    port = free_port()
    gateway = kiln_process(
        ["serve", "--port", str(port), "--gateway-processes", "2"],
        cluster.env,
        cluster.workdir / "gateway-2procs.log",
        cluster.workdir,
    )
    try:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200, 60, "it")
        children = [p for p in Path("/proc").glob("[0-9]*") if _parent(p) == gateway.pid]
        assert len([p for p in children if b"spawn_main" in (p / "cmdline").read_bytes()]) == 2
        ids = []
        for _ in range(12):  # a connection each: the kernel spreads them over the processes
            response = httpx.post(
                f"http://127.0.0.1:{port}/v1/jobs", json={"prompt": invert_prompt()}, headers=AUTH, timeout=30
            )
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        assert f'kiln_jobs_submitted_total{{tenant="{TENANT}"}} 12.0' in metrics
        assert 'kiln_http_request_seconds_count{method="POST",route="/v1/jobs"} 12.0' in metrics
        with cluster.http() as http:  # the cluster's worker runs them; nothing is left queued
            assert all(wait_job(http, job_id)["status"] == "succeeded" for job_id in ids), cluster.logs()
    finally:
        gateway.stop()


def _parent(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None

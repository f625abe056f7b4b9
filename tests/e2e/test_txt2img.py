"""examples/txt2img.json through the cluster as a ComfyUI client sends it (POST /prompt, WebSocket,
/history, /view), on a tiny SD1.5 checkpoint: the events a ComfyUI front end expects (a progress
event per step, binary preview frames), and the same image the embedded engine makes."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from engine.runtime import EngineRuntime
from engine.settings import EngineSettings
from tests.e2e.conftest import AUTH, Cluster

REPO = Path(__file__).resolve().parents[2]
SIZE = 64
STEPS = 3


def txt2img_prompt() -> dict[str, Any]:
    prompt = json.loads((REPO / "examples" / "txt2img.json").read_text())
    for node in prompt.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=SIZE, height=SIZE)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = STEPS
    return prompt


def collect_events(socket: Any, prompt_id: str) -> tuple[list[dict[str, Any]], list[bytes]]:
    events, frames = [], []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        message = socket.recv(timeout=180)
        if isinstance(message, bytes):
            frames.append(message)
            continue
        event = json.loads(message)
        if event["type"] == "status":
            continue
        assert event["data"]["prompt_id"] == prompt_id
        events.append(event)
        if event["type"] in ("execution_error", "execution_interrupted"):
            break
        if event["type"] == "executing" and event["data"]["node"] is None:
            break
    return events, frames


def test_txt2img_through_the_comfyui_api(cluster: Cluster, tmp_path: Path) -> None:
    import websockets.sync.client as ws_client

    prompt = txt2img_prompt()
    url = cluster.url.replace("http", "ws") + f"/ws?clientId=txt2img&token={AUTH['Authorization'][7:]}"
    with ws_client.connect(url, open_timeout=30) as socket, cluster.http() as http:
        json.loads(socket.recv(timeout=30))  # the initial status
        response = http.post("/prompt", json={"prompt": prompt, "client_id": "txt2img"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["node_errors"] == {}
        prompt_id = body["prompt_id"]
        events, frames = collect_events(socket, prompt_id)
        types = [e["type"] for e in events]
        assert "execution_success" in types, (events, cluster.logs())
        progress = [(e["data"]["value"], e["data"]["max"]) for e in events if e["type"] == "progress"]
        assert progress == [(i, STEPS) for i in range(1, STEPS + 1)]
        assert all(e["data"]["node"] == "3" for e in events if e["type"] == "progress")
        # ComfyUI's preview frame: event type 1 (preview image), image type 1 (JPEG), then the JPEG.
        assert len(frames) == STEPS
        event_type, image_type = struct.unpack(">II", frames[0][:8])
        assert (event_type, image_type) == (1, 1)
        with Image.open(io.BytesIO(frames[0][8:])) as preview:
            assert preview.format == "JPEG" and preview.size == (SIZE // 8, SIZE // 8)
        [executed] = [e["data"] for e in events if e["type"] == "executed"]
        [image_ref] = executed["output"]["images"]

        history = http.get(f"/history/{prompt_id}").json()[prompt_id]
        assert history["status"]["status_str"] == "success"
        assert history["outputs"]["9"]["images"] == [image_ref]
        view = http.get("/view", params=image_ref)
        assert view.status_code == 200 and view.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(view.content)) as image:
            cluster_pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert cluster_pixels.shape == (SIZE, SIZE, 3)

    # The embedded engine on the same file gives the same image.
    settings = EngineSettings(
        models_dirs=[cluster.workdir / "models"],
        input_dir=tmp_path,
        output_dir=tmp_path / "output",
        temp_dir=tmp_path / "temp",
        device="cpu",
        offline=True,
    )
    [saved] = EngineRuntime(settings).execute(prompt).saved
    with Image.open(saved.location) as image:
        embedded_pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    difference = np.abs(cluster_pixels - embedded_pixels)
    assert difference.max() <= 1, difference.max()  # float rounding at most, across processes


def test_txt2img_through_the_native_api(cluster: Cluster) -> None:
    import httpx

    from tests.e2e.conftest import TENANT, wait_job

    prompt = txt2img_prompt()
    for node in prompt.values():
        if node["class_type"] == "KSampler":
            node["inputs"]["seed"] = 7  # not the cached result of the other test
    with cluster.http() as http:
        response = http.post("/v1/jobs", json={"prompt": prompt})
        assert response.status_code == 202, response.text
        job = wait_job(http, response.json()["id"])
    assert job["status"] == "succeeded", (job, cluster.logs())
    assert job["attempts"] == 1 and job["timings"]["run_s"] > 0
    [output] = job["outputs"]
    assert output["key"] == f"{TENANT}/{job['id']}/9_0.png"
    download = httpx.get(output["url"], timeout=30)  # the presigned URL, straight from the store
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == output["sha256"]
    with Image.open(io.BytesIO(download.content)) as image:
        assert image.size == (SIZE, SIZE)

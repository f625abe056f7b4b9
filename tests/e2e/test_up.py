"""``kiln up``: the whole stack from one command (its own redis-server, file storage, one CPU
worker), used like ComfyUI, then stopped with SIGTERM: nothing may be left running."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from kiln.cli import build_parser
from kiln.up import (
    detect_gpus,
    flags_as_env,
    gpus_from_cuda_visible_devices,
    gpus_from_nvidia_smi,
)
from tests.e2e.test_cluster import poll_history
from tests.engine.prompts import invert_prompt
from tests.support.services import REPO, RedisServer, free_port, wait_for
from tests.worker.test_webhooks import Receiver
from worker.webhooks import verify_signature

WEBHOOK_SECRET = "up-webhook-secret"


# -- pieces ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", []),
        ("-1", []),
        ("0", ["0"]),
        ("2,3", ["2", "3"]),
        ("0, 1", ["0", "1"]),
        ("1,-1,2", ["1"]),  # CUDA stops at the first invalid entry
        ("GPU-8f6c1c4e-aaaa,MIG-1234", ["GPU-8f6c1c4e-aaaa", "MIG-1234"]),
        ("0,nonsense,1", ["0"]),
    ],
)
def test_cuda_visible_devices(value, expected):
    assert gpus_from_cuda_visible_devices(value) == expected
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": value}) == expected


def test_nvidia_smi_listing():
    output = (
        "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-11111111-2222-3333-4444-555555555555)\n"
        "  MIG 3g.40gb     Device  0: (UUID: MIG-66666666-7777-8888-9999-000000000000)\n"
        "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaaaaaa-2222-3333-4444-555555555555)\n"
    )
    assert gpus_from_nvidia_smi(output) == ["0", "1"]
    assert gpus_from_nvidia_smi("") == []


def test_flags_reach_gateway_and_workers_as_settings():
    args = build_parser().parse_args(
        [
            "up",
            "--redis-url",
            "redis://r:6379/1",
            "--storage-url",
            "s3://bucket/x",
            "--s3-endpoint-url",
            "http://minio:9000",
            "--no-storage-create-bucket",
            "--models-dir",
            "/m1",
            "--models-dir",
            "/m2",
            "--node-modules",
            "a.b,c.d",
            "--queues",
            "q1,q2",
            "--port",
            "9000",
            "--max-nodes",
            "50",
            "--webhook-attempts",
            "3",
        ]
    )
    env = flags_as_env(args)
    assert env == {
        "KILN_REDIS_URL": "redis://r:6379/1",  # one flag for the gateway's and the workers' setting
        "KILN_STORAGE_URL": "s3://bucket/x",
        "KILN_S3_ENDPOINT_URL": "http://minio:9000",
        "KILN_STORAGE_CREATE_BUCKET": "false",
        "KILN_MODELS_DIRS": os.pathsep.join(["/m1", "/m2"]),
        "KILN_NODE_MODULES": "a.b,c.d",
        "KILN_QUEUES": '["q1", "q2"]',
        "KILN_PORT": "9000",
        "KILN_MAX_NODES": "50",
        "KILN_WEBHOOK_ATTEMPTS": "3",
    }
    # What the children read back from those variables.
    from engine.settings import EngineSettings
    from worker.settings import WorkerSettings

    with _patched_environ(env):
        worker = WorkerSettings()
        engine = EngineSettings()
    assert worker.queues == ["q1", "q2"] and worker.redis_url == "redis://r:6379/1"
    assert engine.models_dirs == [Path("/m1"), Path("/m2")] and engine.node_modules == ["a.b", "c.d"]


@pytest.mark.parametrize("flag", ["--gpu", "--worker-id"])
def test_per_worker_settings_are_refused(flag, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "kiln", "up", flag, "1", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "--gpus" in result.stderr


@contextlib.contextmanager
def _patched_environ(values: dict[str, str]):
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# -- the whole stack --------------------------------------------------------------------------------


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc), whatever session or group it moved to."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found.add(child)
                frontier.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def start_up(tmp_path: Path, *flags: str, **env_vars: str) -> tuple[subprocess.Popen, Path, Path]:
    """``kiln up FLAGS`` in its own session, with a clean KILN_* environment plus ``env_vars``."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KILN_")},
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
        "CUDA_VISIBLE_DEVICES": "",  # no GPU: one CPU worker, no detection cost
        "KILN_LOG_LEVEL": "INFO",
        **env_vars,
    }
    stdout, stderr = tmp_path / "up.out", tmp_path / "up.err"
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        up = subprocess.Popen(
            [sys.executable, "-m", "kiln", "up", *flags],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    return up, stdout, stderr


def stop_up(up: subprocess.Popen, children: set[int], stderr: Path) -> None:
    """SIGTERM, as a service manager sends it: kiln up exits 0 and every child is gone."""
    up.send_signal(signal.SIGTERM)
    assert up.wait(timeout=90) == 0, stderr.read_text()[-3000:]
    wait_for(lambda: not any(alive(pid) for pid in children), 30, "every child to exit")
    assert "Kiln stopped." in stderr.read_text()


def kill_leftovers(up: subprocess.Popen, children: set[int]) -> None:
    if up.poll() is None:
        os.killpg(up.pid, signal.SIGKILL)
        up.wait(10)
    for pid in children | descendants(up.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(240)
def test_kiln_up_runs_a_prompt_and_stops_everything(tmp_path: Path):
    port = free_port()
    state = tmp_path / "state"
    receiver = Receiver().start()
    up, stdout, stderr = start_up(
        tmp_path,
        *("--port", str(port), "--state-dir", str(state)),
        KILN_WEBHOOK_SECRET=WEBHOOK_SECRET,
        KILN_WEBHOOK_ALLOW_PRIVATE="true",
    )
    url = f"http://127.0.0.1:{port}"
    children: set[int] = set()
    try:
        wait_for(lambda: "Kiln is up" in stdout.read_text(), 120, "kiln up", interval=0.2)
        assert f"Kiln is up: {url} (insecure local mode" in stdout.read_text()
        with httpx.Client(base_url=url, timeout=30) as http:
            prompt = invert_prompt(color=0x102030, width=8, height=4)
            response = http.post("/prompt", json={"prompt": prompt})
            assert response.status_code == 200, response.text
            prompt_id = response.json()["prompt_id"]
            entry = poll_history(http, prompt_id, timeout=120)
            assert entry["status"]["status_str"] == "success", stderr.read_text()[-5000:]
            [image] = entry["outputs"]["3"]["images"]
            view = http.get("/view", params=image)
            assert view.status_code == 200
            pixels = np.array(Image.open(io.BytesIO(view.content)))
            channels = np.array([0x10 / 255, 0x20 / 255, 0x30 / 255], dtype=np.float32)
            expected = (np.float32(255.0) * (np.float32(1.0) - channels)).astype(np.uint8)
            assert pixels.shape == (4, 8, 3) and (pixels == expected).all()

            # The native API with a webhook: a signed POST whose output URL downloads the image.
            job_id = http.post("/v1/jobs", json={"prompt": prompt, "webhook": receiver.url}).json()["id"]
            wait_for(lambda: len(receiver.requests) == 1, 120, "the webhook", interval=0.1)
            [hook] = receiver.requests
            assert verify_signature(WEBHOOK_SECRET, hook.headers, hook.body)
            body = json.loads(hook.body)
            assert body["id"] == job_id and body["status"] == "succeeded"
            assert body == {**http.get(f"/v1/jobs/{job_id}").json(), "outputs": body["outputs"]}
            [output] = body["outputs"]
            assert httpx.get(output["url"], timeout=30).content == view.content
        assert (state / "redis" / "appendonlydir").is_dir()  # its own redis-server, AOF on
        assert (state / "storage" / "local" / prompt_id / "3_0.png").is_file()  # file:// store

        children = descendants(up.pid)
        commands = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children]
        assert any(b"redis-server" in c for c in commands)
        assert any(b"serve" in c for c in commands) and any(b"worker" in c for c in commands)
        stop_up(up, children, stderr)
    finally:
        receiver.stop()
        kill_leftovers(up, children)


def test_kiln_up_with_a_given_redis_and_api_keys_dies_with_its_children(tmp_path: Path):
    redis = RedisServer(tmp_path / "redis").start()
    port = free_port()
    state = tmp_path / "state"
    up, stdout, _ = start_up(
        tmp_path,
        *("--port", str(port), "--state-dir", str(state), "--redis-url", redis.url),
        KILN_API_KEYS="up-key:team",
    )
    children: set[int] = set()
    try:
        wait_for(lambda: "Kiln is up" in stdout.read_text(), 120, "kiln up", interval=0.2)
        assert "API keys required" in stdout.read_text()
        children = descendants(up.pid)
        assert not any(b"redis-server" in Path(f"/proc/{p}/cmdline").read_bytes() for p in children)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            assert http.get("/queue").status_code == 401
            assert http.get("/queue", headers={"Authorization": "Bearer up-key"}).status_code == 200
            assert http.get("/readyz").json() == {"status": "ready"}
        # file:// storage with keys needs a download signing secret: kept in the state folder.
        assert (state / "signing-secret").stat().st_mode & 0o777 == 0o600
        # kill -9 of `kiln up` alone: its children (own process groups) must not outlive it.
        os.kill(up.pid, signal.SIGKILL)
        up.wait(10)
        wait_for(lambda: not any(alive(pid) for pid in children), 60, "the orphans to exit")
        assert redis.proc is not None and redis.proc.alive()  # not ours to stop
    finally:
        kill_leftovers(up, children)
        redis.stop()

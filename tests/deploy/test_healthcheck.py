"""deploy/healthcheck.py, the images' health check (Docker HEALTHCHECK, compose, Kubernetes probes)."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Iterator
from typing import ClassVar

import pytest
import redis

from tests.deploy.deployfiles import healthcheck_module

healthcheck = healthcheck_module()


class Handler(http.server.BaseHTTPRequestHandler):
    statuses: ClassVar[dict[str, int]] = {}

    def do_GET(self) -> None:
        status = self.statuses.get(self.path, 404)
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b'{"problems": {"redis": "down"}}' if status != 200 else b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[tuple[int, dict[str, int]]]:
    statuses = {"/healthz": 200, "/readyz": 503}
    handler = type("H", (Handler,), {"statuses": statuses})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], statuses
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_gateway_liveness_and_readiness(gateway, capsys):
    port, statuses = gateway
    assert healthcheck.check_gateway(port=port) == healthcheck.HEALTHY
    assert healthcheck.check_gateway(ready=True, port=port) == healthcheck.UNHEALTHY
    assert '"redis": "down"' in capsys.readouterr().err, "the reason is shown"
    statuses["/readyz"] = 200
    assert healthcheck.check_gateway(ready=True, port=port) == healthcheck.HEALTHY
    statuses["/healthz"] = 500
    assert healthcheck.check_gateway(port=port) == healthcheck.UNHEALTHY


def test_gateway_not_listening_is_unhealthy(capsys):
    assert healthcheck.check_gateway(port=free_port(), timeout=1) == healthcheck.UNHEALTHY
    assert "unhealthy" in capsys.readouterr().err


def test_gateway_port_comes_from_kiln_port(gateway, monkeypatch):
    port, _ = gateway
    monkeypatch.setenv("KILN_PORT", str(port))
    assert healthcheck.main(["gateway"]) == healthcheck.HEALTHY


def test_default_port_is_the_gateway_default():
    from api.settings import GatewaySettings

    assert GatewaySettings.model_fields["port"].default == healthcheck.DEFAULT_PORT


class FakeRedis:
    def __init__(
        self,
        keys: set[str] | None = None,
        error: Exception | None = None,
        beats: dict[str, dict] | None = None,
    ) -> None:
        self.keys = keys or set()
        self.error = error
        self.beats = beats or {}
        self.asked: list[str] = []

    def exists(self, key: str) -> int:
        self.asked.append(key)
        if self.error:
            raise self.error
        return int(key in self.keys)

    def smembers(self, key: str) -> set[bytes]:
        from worker.protocol import Keys

        assert key == Keys.workers()
        return {worker_id.encode() for worker_id in self.beats}

    def get(self, key: str) -> bytes | None:
        from worker.protocol import Keys

        beat = next((b for w, b in self.beats.items() if Keys.worker(w) == key), None)
        return json.dumps(beat).encode() if beat is not None else None


@pytest.fixture
def worker_env(monkeypatch):
    for name in ("KILN_CONFIG", "KILN_GPU", "KILN_WORKER_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KILN_WORKER_ID", "gpu3")


def test_worker_is_healthy_while_its_heartbeat_exists(worker_env):
    from worker.protocol import Keys

    client = FakeRedis({Keys.worker("gpu3")})
    assert healthcheck.check_worker(client=client) == healthcheck.HEALTHY
    assert client.asked == [Keys.worker("gpu3")]
    assert healthcheck.check_worker(client=FakeRedis()) == healthcheck.UNHEALTHY


def test_a_worker_named_by_its_flags_is_found_by_host_name(worker_env):
    here = FakeRedis(beats={"other": {"host": "elsewhere"}, "named-by-flag": {"host": socket.gethostname()}})
    assert healthcheck.check_worker(client=here) == healthcheck.HEALTHY
    elsewhere = FakeRedis(beats={"other": {"host": "elsewhere"}})
    assert healthcheck.check_worker(client=elsewhere) == healthcheck.UNHEALTHY


def test_worker_id_defaults_like_the_worker(monkeypatch):
    from worker.protocol import Keys

    for name in ("KILN_CONFIG", "KILN_WORKER_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KILN_GPU", "1")
    client = FakeRedis()
    healthcheck.check_worker(client=client)
    assert client.asked == [Keys.worker(f"{socket.gethostname()}-gpu1")]


def test_redis_outage_is_not_the_workers_fault(worker_env):
    down = FakeRedis(error=redis.ConnectionError("refused"))
    assert healthcheck.check_worker(client=down) == healthcheck.HEALTHY
    broken = FakeRedis(error=redis.ResponseError("ERR"))
    assert healthcheck.check_worker(client=broken) == healthcheck.UNHEALTHY
    refused = FakeRedis(error=redis.AuthenticationError("invalid password"))
    assert healthcheck.check_worker(client=refused) == healthcheck.UNHEALTHY


def test_bad_settings_are_unhealthy(worker_env, monkeypatch):
    monkeypatch.setenv("KILN_JOB_TIMEOUT_S", "-1")
    assert healthcheck.check_worker(client=FakeRedis()) == healthcheck.UNHEALTHY


def test_parser_accepts_only_the_two_roles():
    parser = healthcheck.build_parser()
    assert parser.parse_args(["worker"]).role == "worker"
    with pytest.raises(SystemExit):
        parser.parse_args(["scheduler"])

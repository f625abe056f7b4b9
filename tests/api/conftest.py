"""Gateway tests: the real app (in-process) against a real redis-server on a free port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from api.main import create_app
from api.settings import GatewaySettings
from engine.settings import EngineSettings
from tests.support.services import RedisServer

KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}
AUTH_A = {"Authorization": "Bearer key-a"}
AUTH_B = {"Authorization": "Bearer key-b"}


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


def gateway_settings(redis_url: str, tmp_path: Path, **overrides: object) -> GatewaySettings:
    values: dict[str, object] = {
        "redis_url": redis_url,
        "storage_url": f"file://{tmp_path / 'storage'}",
        "api_keys": KEYS,
        "signing_secret": "test-secret",
        "rate_limit_per_s": 1000.0,
        "rate_limit_burst": 1000,
        "inventory_cache_s": 0.0,
    }
    values.update(overrides)
    return GatewaySettings(**values)


@pytest.fixture
def make_client(redis_client: redis.Redis, redis_server: RedisServer, tmp_path: Path):
    clients: list[TestClient] = []

    def build(engine: EngineSettings | None = None, **overrides: object) -> TestClient:
        redis_url = str(overrides.pop("redis_url", redis_server.url))
        app = create_app(gateway_settings(redis_url, tmp_path, **overrides), engine or EngineSettings())
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()

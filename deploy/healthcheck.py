"""Health checks for Kiln's container images: Docker HEALTHCHECK, compose ``healthcheck`` and
Kubernetes exec probes run ``python /opt/kiln/healthcheck.py gateway|worker``.

- ``gateway``: ``GET http://127.0.0.1:$KILN_PORT/healthz`` answers 200 (``--ready``: ``/readyz``, which
  also needs Redis and the object store).
- ``worker``: this worker's heartbeat key (``kiln:worker:<id>``, written every
  ``KILN_HEARTBEAT_INTERVAL_S`` with a ``KILN_HEARTBEAT_TTL_S`` expiry) exists in Redis. The worker id
  comes from the same settings the worker reads (``KILN_WORKER_ID``, else host name + ``KILN_GPU``);
  when the worker was named on its command line instead (``--gpu N``, ``--worker-id``), a live
  heartbeat from this host name counts. When Redis itself cannot be reached the check passes:
  restarting every worker during a Redis outage would only throw away warm models (Redis has its
  own probes and alerts).

Exit status 0 = healthy, 1 = unhealthy (Docker's convention). Uses only the standard library and
what the image already has; imports no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

DEFAULT_PORT = 8188  # GatewaySettings.port's default (a test keeps them equal)
HEALTHY = 0
UNHEALTHY = 1


def check_gateway(ready: bool = False, timeout: float = 4.0, port: int | None = None) -> int:
    """200 from the gateway's /healthz (or /readyz) on this container's loopback."""
    port = port if port is not None else int(os.environ.get("KILN_PORT", DEFAULT_PORT))
    url = f"http://127.0.0.1:{port}/{'readyz' if ready else 'healthz'}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # a fixed loopback URL
            status, body = response.status, response.read(2000)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(2000)
    except (OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return UNHEALTHY
    if status != 200:
        # /readyz names what is missing: {"status": "unavailable", "problems": {"redis": ...}}
        print(f"unhealthy: {url} answered {status}: {body.decode(errors='replace')}", file=sys.stderr)
        return UNHEALTHY
    return HEALTHY


def check_worker(timeout: float = 4.0, client: object | None = None) -> int:
    """The worker's heartbeat key exists in Redis (or Redis cannot be reached at all)."""
    import redis

    from worker.protocol import Keys
    from worker.settings import load_worker_settings

    try:
        settings = load_worker_settings()
    except Exception as exc:  # bad settings: the worker itself cannot be running either
        print(f"unhealthy: worker settings: {exc}", file=sys.stderr)
        return UNHEALTHY
    if client is None:
        client = redis.Redis.from_url(
            settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
    key = Keys.worker(settings.worker_id)
    try:
        alive = bool(client.exists(key)) or _beats_from_this_host(client)  # type: ignore[attr-defined]
    except redis.AuthenticationError as exc:  # a ConnectionError, but the worker cannot work either
        print(f"unhealthy: Redis refused the credentials: {exc}", file=sys.stderr)
        return UNHEALTHY
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        print(f"healthy (cannot tell): Redis unreachable: {exc}", file=sys.stderr)
        return HEALTHY
    except redis.RedisError as exc:
        print(f"unhealthy: Redis error: {exc}", file=sys.stderr)
        return UNHEALTHY
    if not alive:
        print(f"unhealthy: no heartbeat at {key}", file=sys.stderr)
        return UNHEALTHY
    return HEALTHY


def _beats_from_this_host(client: object) -> bool:
    """Whether a live heartbeat names this host (a worker whose id came from its flags)."""
    from worker.protocol import Keys

    host = socket.gethostname()
    for member in client.smembers(Keys.workers()):  # type: ignore[attr-defined]
        worker_id = member.decode() if isinstance(member, bytes) else str(member)
        beat = client.get(Keys.worker(worker_id))  # type: ignore[attr-defined]
        if beat and json.loads(beat).get("host") == host:
            return True
    return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="healthcheck.py", description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=("gateway", "worker"))
    parser.add_argument("--ready", action="store_true", help="gateway: check /readyz instead of /healthz")
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds per request")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.role == "gateway":
        return check_gateway(ready=args.ready, timeout=args.timeout)
    return check_worker(timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())

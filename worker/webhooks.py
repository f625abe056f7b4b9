"""Webhooks: when a job with a ``webhook`` URL finishes, its status JSON is POSTed there.

The body is what ``GET /v1/jobs/{id}`` answers at the time of the delivery (presigned output URLs
included). It is signed, retried with exponential backoff, and durable:

- The worker that finishes a job pushes a small delivery record on the outbox list
  (``Keys.webhooks()``), once per job (a ``webhook_queued`` marker on the job hash makes a
  repeated enqueue a no-op); the job record and the outbox live in the same Redis (AOF on). A job
  cancelled while queued is finished by the gateway, whose cancel script (worker/lua.py
  ``CANCEL_JOB``) queues its delivery the same way, in the same step.
- A ``WebhookDeliverer`` thread in every worker process claims deliveries with one atomic script:
  a due entry of the *scheduled* sorted set first (a retry whose backoff has elapsed, or a claim
  whose deliverer died), else the oldest entry of the outbox. Claiming moves the entry into the
  scheduled set with a lease (score = now + ``lease_s``), so a delivery is in Redis until it has
  been answered 2xx or given up: a crash mid-delivery only delays it by the lease (at least once).
- A failure (non-2xx, timeout, refused connection) puts it back in the scheduled set at
  now + backoff; after ``attempts`` attempts it is given up, recorded on the failed list (newest
  first, capped) and on the job (``webhook_delivery`` field of the job hash).

Every request carries ``X-Kiln-Webhook-Id`` (the same on every attempt: deduplicate on it),
``X-Kiln-Timestamp`` (unix seconds) and, with ``KILN_WEBHOOK_SECRET`` set,
``X-Kiln-Signature: sha256=HEX`` where HEX is HMAC-SHA256(secret, f"{timestamp}.{body}"): the
timestamp is signed too, so a captured request cannot be replayed later with a fresh timestamp.
docs/api.md shows how to verify.

Requests go only to public addresses unless ``KILN_WEBHOOK_ALLOW_PRIVATE`` is set (a job's URL is
user input: it must not reach the cluster's Redis, metadata service or other internals). The
address checked is the address connected to (no second DNS lookup), and redirects are not followed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import random
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.settings import load_section
from worker.protocol import JobRecord, JobStatus, Keys
from worker.storage import Storage, storage_from_url

log = logging.getLogger(__name__)

USER_AGENT = "kiln-webhooks/0.1"
SIGNATURE_HEADER = "X-Kiln-Signature"
TIMESTAMP_HEADER = "X-Kiln-Timestamp"
ID_HEADER = "X-Kiln-Webhook-Id"
EVENT_HEADER = "X-Kiln-Event"
ATTEMPT_HEADER = "X-Kiln-Attempt"
# The job hash field that records the outcome of its webhook.
JOB_FIELD = "webhook_delivery"
MAX_URL_LENGTH = 2048


class WebhookKeys:
    """The webhook keys (named in ``worker.protocol.Keys``), by their role here."""

    @staticmethod
    def outbox() -> str:
        """List: deliveries not yet attempted (LPUSH by workers, claimed from the right)."""
        return Keys.webhooks()

    @staticmethod
    def scheduled() -> str:
        """Sorted set: claimed deliveries (score = lease end) and retries (score = due time)."""
        return Keys.webhooks_scheduled()

    @staticmethod
    def failed() -> str:
        """List: deliveries given up, newest first (capped)."""
        return Keys.webhooks_failed()


# KEYS: job, outbox   ARGV: delivery JSON
# Queues the delivery unless the job already has one queued (or no longer exists).
_ENQUEUE = """
if redis.call("EXISTS", KEYS[1]) == 0 then return 0 end
if redis.call("HSETNX", KEYS[1], "webhook_queued", "1") == 0 then return 0 end
redis.call("LPUSH", KEYS[2], ARGV[1])
return 1
"""

# KEYS: outbox, scheduled   ARGV: now, lease end
# Returns {delivery JSON or "", score of the next scheduled entry or ""}.
_CLAIM = """
local due = redis.call("ZRANGEBYSCORE", KEYS[2], "-inf", ARGV[1], "LIMIT", 0, 1)
local item = due[1]
if not item then
  item = redis.call("RPOP", KEYS[1])
end
if not item then
  local head = redis.call("ZRANGE", KEYS[2], 0, 0, "WITHSCORES")
  return {"", head[2] or ""}
end
redis.call("ZADD", KEYS[2], ARGV[2], item)
return {item, ""}
"""

# KEYS: scheduled, job, failed   ARGV: claimed member, next member ("" = none), next due,
#   job field value, failed record ("" = none), failed list cap
# Settles one attempt: reschedules it, or records the outcome on the job (and the failed list).
_SETTLE = """
redis.call("ZREM", KEYS[1], ARGV[1])
if ARGV[2] ~= "" then
  redis.call("ZADD", KEYS[1], ARGV[3], ARGV[2])
  return 1
end
if redis.call("EXISTS", KEYS[2]) == 1 then
  redis.call("HSET", KEYS[2], "webhook_delivery", ARGV[4])
end
if ARGV[5] ~= "" then
  redis.call("LPUSH", KEYS[3], ARGV[5])
  redis.call("LTRIM", KEYS[3], 0, tonumber(ARGV[6]) - 1)
end
return 0
"""


class WebhookSettings(BaseSettings):
    """Webhook delivery settings (``KILN_*``). The secret and the number of attempts are
    ``WorkerSettings.webhook_secret`` / ``webhook_attempts``; the URL settings share the gateway's
    names, so one environment configures both."""

    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore")

    webhook_timeout_s: float = Field(10.0, gt=0, description="Time one delivery attempt may take.")
    webhook_backoff_s: float = Field(5.0, gt=0, description="Delay before the 2nd attempt; doubles.")
    webhook_backoff_max_s: float = Field(3600.0, gt=0, description="Longest delay between attempts.")
    webhook_lease_s: float = Field(
        0.0,
        ge=0,
        description="A claimed delivery is retried this long after its deliverer died; "
        "0 = 3 x timeout + 5 s.",
    )
    webhook_poll_s: float = Field(0.5, gt=0, description="Idle deliverers look for work this often.")
    webhook_allow_private: bool = Field(
        False, description="Allow webhooks to loopback, private and link-local addresses."
    )
    public_url: str = Field("http://127.0.0.1:8188", description="The gateway's address as clients see it.")
    signing_secret: SecretStr | None = Field(None, description="Secret for file:// download URLs.")
    insecure: bool = Field(False, description="The gateway runs without authentication.")
    s3_public_endpoint_url: str | None = Field(None, description="S3 endpoint clients reach, for URLs.")
    presign_expiry_s: int = Field(3600, ge=60, description="Lifetime of presigned output URLs.")


# -- what is delivered ------------------------------------------------------------------------------


def job_status(
    job: JobRecord, *, position: int | None, storage: Storage | None, expiry_s: int, public_url: str
) -> dict[str, Any]:
    """The job as ``GET /v1/jobs/{id}`` shows it (api/views.py ``native_job``: a test keeps the two
    identical). ``storage`` None leaves output URLs out (None)."""
    outputs = [
        {
            "node_id": o.node_id,
            "index": o.index,
            "url": storage.presign_get(o.key, expiry_s) if storage is not None else None,
            "key": o.key,
            "content_type": o.content_type,
            "bytes": o.bytes,
            "sha256": o.sha256,
        }
        for o in job.outputs
    ]
    return {
        "id": job.id,
        "status": job.status.value,
        "status_url": f"{public_url.rstrip('/')}/v1/jobs/{job.id}",
        "queue_position": position,
        "priority": job.priority,
        "progress": job.progress.model_dump() if job.progress else None,
        "timings": {
            "created_at": job.created_at,
            "started_at": job.started_at,
            "finished_at": job.finished_at,
            "queued_s": (job.started_at - job.created_at) if job.started_at else None,
            "run_s": (job.finished_at - job.started_at) if job.finished_at and job.started_at else None,
        },
        "worker": job.worker,
        "attempts": job.attempts,
        "outputs": outputs,
        "error": job.error.model_dump(exclude={"traceback"}) if job.error else None,
    }


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=HEX`` of HMAC-SHA256(secret, timestamp + "." + body)."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_signature(
    secret: str, headers: dict[str, str], body: bytes, tolerance_s: float = 300.0, now: float | None = None
) -> bool:
    """What a receiver does (docs/api.md): the signature matches and the timestamp is recent."""
    lowered = {k.lower(): v for k, v in headers.items()}
    timestamp = lowered.get(TIMESTAMP_HEADER.lower(), "")
    given = lowered.get(SIGNATURE_HEADER.lower(), "")
    if not timestamp.isdigit():
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > tolerance_s:
        return False
    return hmac.compare_digest(signature(secret, timestamp, body), given)


@dataclass(frozen=True)
class Delivery:
    """One webhook to send: the outbox entry (small; the body is built when it is sent)."""

    id: str
    job_id: str
    url: str
    event: str
    attempt: int = 0  # attempts already made
    created_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "job_id": self.job_id,
                "url": self.url,
                "event": self.event,
                "attempt": self.attempt,
                "created_at": self.created_at,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> Delivery:
        data = json.loads(raw)
        return cls(
            id=str(data["id"]),
            job_id=str(data["job_id"]),
            url=str(data["url"]),
            event=str(data["event"]),
            attempt=int(data.get("attempt", 0)),
            created_at=float(data.get("created_at", 0.0)),
        )


def delivery_for(job: JobRecord, status: JobStatus) -> Delivery:
    """The delivery of a finished job's webhook; its id is the same however often it is enqueued."""
    assert job.webhook is not None
    return Delivery(
        id=f"{job.id}.{status.value}",
        job_id=job.id,
        url=job.webhook,
        event=f"job.{status.value}",
        created_at=time.time(),
    )


def enqueue(client: redis.Redis, job: JobRecord, status: JobStatus, retry_for_s: float = 60.0) -> bool:
    """Put the finished job's webhook in the outbox, once per job however often it is called (a
    redelivered message, a worker that died between finishing a job and queueing its webhook).
    Retries while Redis is unreachable; never raises: the job's outcome stands either way.
    Returns whether this call queued it."""
    if not job.webhook:
        return False
    payload = delivery_for(job, status).to_json()
    deadline = time.monotonic() + retry_for_s
    delay = 0.2
    while True:
        try:
            queued = client.eval(_ENQUEUE, 2, Keys.job(job.id), WebhookKeys.outbox(), payload)
            return bool(queued)
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
            if time.monotonic() > deadline:
                log.error("Webhook of job %s not queued: Redis unavailable (%s)", job.id, exc)
                return False
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        except redis.RedisError as exc:
            log.error("Webhook of job %s not queued: %s", job.id, exc)
            return False


# -- sending ----------------------------------------------------------------------------------------


class WebhookRefused(Exception):
    """Raised when a webhook URL is unusable or points where deliveries may not go (no retry)."""


@dataclass(frozen=True)
class AttemptResult:
    ok: bool
    status: int | None = None
    error: str = ""
    permanent: bool = False  # retrying cannot help (a refused URL, a job that no longer exists)


def _address_allowed(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_url(url: str, allow_private: bool = True) -> tuple[urllib.parse.SplitResult, int]:
    """(parsed URL, port) of a usable webhook URL, without resolving its host: http(s), a host, at
    most ``MAX_URL_LENGTH`` characters, no whitespace or control characters, and (unless
    ``allow_private``) not a literal non-public address (``127.0.0.1``, ``[::1]``, ``localhost``).
    The gateway checks this at submit; deliveries check the resolved addresses too. Raises
    WebhookRefused."""
    if len(url) > MAX_URL_LENGTH:
        raise WebhookRefused(f"URL longer than {MAX_URL_LENGTH} characters")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise WebhookRefused("URL contains whitespace or control characters")
    try:
        parsed = urllib.parse.urlsplit(url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError as exc:
        raise WebhookRefused(f"Invalid URL: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise WebhookRefused("Not an http(s) URL with a host")
    if not allow_private:
        host = parsed.hostname
        literal = host.rstrip(".").lower() in ("localhost", "localhost.localdomain") or host.endswith(
            ".localhost"
        )
        with contextlib.suppress(ValueError):
            literal = literal or not _address_allowed(host)
        if literal:
            raise WebhookRefused(
                f"{host} is a non-public address; set KILN_WEBHOOK_ALLOW_PRIVATE=true to allow it"
            )
    return parsed, port


def resolve_target(url: str, allow_private: bool) -> tuple[urllib.parse.SplitResult, str, int]:
    """(parsed URL, address to connect to, port); raises WebhookRefused."""
    parsed, port = check_url(url, allow_private)
    hostname = parsed.hostname or ""
    try:
        infos = socket.getaddrinfo(hostname, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise WebhookRefused(f"Cannot resolve {hostname}: {exc}") from exc
    addresses = [info[4][0] for info in infos]
    if not allow_private:
        blocked = [a for a in addresses if not _address_allowed(a)]
        if blocked:
            raise WebhookRefused(
                f"{hostname} resolves to a non-public address ({blocked[0]}); "
                "set KILN_WEBHOOK_ALLOW_PRIVATE=true to allow it"
            )
    return parsed, addresses[0], port


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a checked address, with the URL's host name for SNI and certificate checks."""

    def __init__(self, address: str, port: int, server_hostname: str, timeout: float) -> None:
        super().__init__(address, port, timeout=timeout, context=ssl.create_default_context())
        self._server_hostname = server_hostname

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self._server_hostname)  # type: ignore[attr-defined]


def post(url: str, body: bytes, headers: dict[str, str], timeout: float, allow_private: bool) -> int:
    """POST ``body``; returns the HTTP status. Raises WebhookRefused or OSError/HTTPException."""
    parsed, address, port = resolve_target(url, allow_private)
    if parsed.scheme == "https":
        connection: http.client.HTTPConnection = _PinnedHTTPSConnection(
            address, port, parsed.hostname or "", timeout
        )
    else:
        connection = http.client.HTTPConnection(address, port, timeout=timeout)
    path = parsed.path or "/"
    if parsed.query:
        path += "?" + parsed.query
    host = parsed.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parsed.port:
        host += f":{parsed.port}"
    try:
        connection.request("POST", path, body=body, headers={**headers, "Host": host})
        response = connection.getresponse()
        response.read(65536)
        return response.status
    finally:
        connection.close()


# -- the deliverer ----------------------------------------------------------------------------------


@dataclass
class DeliveryOptions:
    secret: str | None = None
    attempts: int = 5
    timeout_s: float = 10.0
    backoff_s: float = 5.0
    backoff_max_s: float = 3600.0
    lease_s: float = 0.0
    poll_s: float = 0.5
    allow_private: bool = False
    public_url: str = "http://127.0.0.1:8188"
    presign_expiry_s: int = 3600
    failed_kept: int = 1000

    def __post_init__(self) -> None:
        if self.lease_s <= 0:
            self.lease_s = 3 * self.timeout_s + 5.0

    def backoff(self, attempts_made: int) -> float:
        """Delay after the ``attempts_made``-th failure: backoff_s x 2^(n-1), capped, +-20% jitter."""
        delay = min(self.backoff_max_s, self.backoff_s * 2 ** (attempts_made - 1))
        return delay * random.uniform(0.8, 1.2)


class WebhookDeliverer(threading.Thread):
    """Sends webhooks from the outbox, one at a time, until stopped."""

    def __init__(
        self,
        client: redis.Redis,
        options: DeliveryOptions,
        storage: Storage | None = None,
        send: Callable[[str, bytes, dict[str, str], float, bool], int] = post,
        name: str = "kiln-webhooks",
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.redis = client
        self.options = options
        self.storage = storage
        self.send = send
        self._stop_event = threading.Event()
        self._claim = client.register_script(_CLAIM)
        self._settle = client.register_script(_SETTLE)
        self.delivered = 0
        self.given_up = 0

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        log.info("Webhook deliverer started")
        while not self._stop_event.is_set():
            try:
                wait = self.step()
            except redis.RedisError as exc:
                log.warning("Webhook deliverer: Redis unavailable (%s)", exc)
                wait = 1.0
            except Exception:  # a bug must not end deliveries for the life of the worker
                log.exception("Webhook deliverer error")
                wait = 1.0
            if wait > 0:
                self._stop_event.wait(wait)

    def claim(self) -> tuple[Delivery | None, bytes, float]:
        """(delivery, its stored form, seconds until the next scheduled one or the poll interval)."""
        now = time.time()
        raw, next_score = self._claim(
            keys=[WebhookKeys.outbox(), WebhookKeys.scheduled()], args=[now, now + self.options.lease_s]
        )
        if not raw:
            wait = self.options.poll_s
            if next_score:
                wait = max(0.0, min(wait, float(next_score) - now))
            return None, b"", wait
        try:
            return Delivery.from_json(raw), raw, 0.0
        except (ValueError, KeyError, TypeError):
            log.error("Dropping a malformed webhook delivery: %r", raw[:200])
            self._settle(
                keys=[WebhookKeys.scheduled(), Keys.job("-"), WebhookKeys.failed()],
                args=[raw, "", 0, "", json.dumps({"raw": raw.decode(errors="replace")[:2000]}), 1000],
            )
            return None, b"", 0.0

    def step(self) -> float:
        """Claim and attempt one delivery; returns how long to wait before the next step."""
        delivery, raw, wait = self.claim()
        if delivery is None:
            return wait
        result = self.attempt(delivery)
        self.settle(delivery, raw, result)
        return 0.0

    def body_for(self, delivery: Delivery) -> bytes | None:
        fields = self.redis.hgetall(Keys.job(delivery.job_id))
        if not fields:
            return None
        job = JobRecord.from_redis({k.decode(): v.decode() for k, v in fields.items()})
        status = job_status(
            job,
            position=None,
            storage=self.storage,
            expiry_s=self.options.presign_expiry_s,
            public_url=self.options.public_url,
        )
        return json.dumps(status, separators=(",", ":")).encode()

    def headers_for(self, delivery: Delivery, body: bytes, attempt: int) -> dict[str, str]:
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            ID_HEADER: delivery.id,
            EVENT_HEADER: delivery.event,
            ATTEMPT_HEADER: str(attempt),
            TIMESTAMP_HEADER: timestamp,
        }
        if self.options.secret:
            headers[SIGNATURE_HEADER] = signature(self.options.secret, timestamp, body)
        return headers

    def attempt(self, delivery: Delivery) -> AttemptResult:
        body = self.body_for(delivery)
        if body is None:
            return AttemptResult(False, error="The job record no longer exists", permanent=True)
        attempt = delivery.attempt + 1
        headers = self.headers_for(delivery, body, attempt)
        try:
            status = self.send(
                delivery.url, body, headers, self.options.timeout_s, self.options.allow_private
            )
        except WebhookRefused as exc:
            return AttemptResult(False, error=str(exc), permanent=True)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return AttemptResult(False, error=f"{type(exc).__name__}: {exc}")
        if 200 <= status < 300:
            return AttemptResult(True, status=status)
        return AttemptResult(False, status=status, error=f"HTTP {status}")

    def settle(self, delivery: Delivery, raw: bytes, result: AttemptResult) -> None:
        made = delivery.attempt + 1
        record: dict[str, Any] = {
            "id": delivery.id,
            "url": delivery.url,
            "attempts": made,
            "status_code": result.status,
            "at": time.time(),
        }
        next_member, due, failed = "", 0.0, ""
        if result.ok:
            record["status"] = "delivered"
            self.delivered += 1
            log.info("Webhook %s delivered (attempt %d, HTTP %s)", delivery.id, made, result.status)
        elif result.permanent or made >= self.options.attempts:
            record.update(status="failed", error=result.error)
            failed = json.dumps({**record, "job_id": delivery.job_id, "event": delivery.event})
            self.given_up += 1
            log.warning("Webhook %s given up after %d attempt(s): %s", delivery.id, made, result.error)
        else:
            next_member = dataclasses.replace(delivery, attempt=made).to_json()
            delay = self.options.backoff(made)
            due = time.time() + delay
            log.info(
                "Webhook %s attempt %d failed (%s); retrying in %.1fs", delivery.id, made, result.error, delay
            )
        self._settle(
            keys=[WebhookKeys.scheduled(), Keys.job(delivery.job_id), WebhookKeys.failed()],
            args=[raw, next_member, due, json.dumps(record), failed, self.options.failed_kept],
        )


def deliverer_for_worker(
    client: redis.Redis, secret: SecretStr | None, attempts: int, storage_url: str, **storage_options: Any
) -> WebhookDeliverer:
    """The deliverer of a worker process: ``KILN_WEBHOOK_*`` settings, and a storage handle that
    presigns output URLs the way the gateway does (same ``KILN_PUBLIC_URL``, ``KILN_SIGNING_SECRET``,
    ``KILN_S3_PUBLIC_ENDPOINT_URL``)."""
    settings = load_section(WebhookSettings, "worker", None, {})
    signing_secret = settings.signing_secret.get_secret_value() if settings.signing_secret else ""
    if not signing_secret and settings.insecure:
        signing_secret = "insecure-local-signing-secret"  # what an insecure gateway verifies with
    storage: Storage | None = None
    if storage_url.startswith("s3://") or signing_secret:
        storage = storage_from_url(
            storage_url,
            public_url=settings.public_url,
            signing_secret=signing_secret,
            s3_endpoint_url=storage_options.get("s3_endpoint_url"),
            s3_public_endpoint_url=settings.s3_public_endpoint_url,
            s3_region=storage_options.get("s3_region"),
        )
    else:
        log.warning("Webhook bodies carry no output URLs: file:// storage needs KILN_SIGNING_SECRET")
    options = DeliveryOptions(
        secret=secret.get_secret_value() if secret else None,
        attempts=attempts,
        timeout_s=settings.webhook_timeout_s,
        backoff_s=settings.webhook_backoff_s,
        backoff_max_s=settings.webhook_backoff_max_s,
        lease_s=settings.webhook_lease_s,
        poll_s=settings.webhook_poll_s,
        allow_private=settings.webhook_allow_private,
        public_url=settings.public_url,
        presign_expiry_s=settings.presign_expiry_s,
    )
    if options.secret is None:
        log.warning("KILN_WEBHOOK_SECRET is not set: webhooks are sent unsigned")
    return WebhookDeliverer(client, options, storage)

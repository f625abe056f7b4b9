"""Malformed and hostile requests against the real gateway process of the ``cluster`` fixture.

Each is answered 4xx (ComfyUI's error shape, with ``node_errors`` where a node is at fault) and
leaves no trace in Redis: no job record, no pending entry, no queued task message, no sequence
number, no upload (rate-limit buckets are not job state and are ignored)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import httpx
import pytest
import redis

from tests.e2e.conftest import AUTH, BUCKET, TENANT, Cluster
from tests.engine.prompts import invert_prompt
from tests.support.services import S3_ENV, wait_for
from worker.protocol import Keys

Prompt = dict[str, Any]
MAX_BODY = 8 * 1024 * 1024  # the gateway's default max_body_bytes


# -- the corpus: prompts that break one validation rule each (tests/engine/test_validation.py) ------


def mutated(change: Callable[[Prompt], Any]) -> Prompt:
    prompt = invert_prompt()
    change(prompt)
    return prompt


def with_input(node: str, name: str, value: Any) -> Prompt:
    return mutated(lambda p: p[node]["inputs"].__setitem__(name, value))


def with_node(node: str, value: Any) -> Prompt:
    return mutated(lambda p: p.__setitem__(node, value))


def load_image(name: str) -> Prompt:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }


def composite(resize_source: Any) -> Prompt:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {
            "class_type": "ImageCompositeMasked",
            "inputs": {
                "destination": ["1", 0],
                "source": ["1", 0],
                "x": 0,
                "y": 0,
                "resize_source": resize_source,
            },
        },
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }


def many_nodes(count: int) -> Prompt:
    prompt = invert_prompt()
    for i in range(10, 10 + count):
        prompt[str(i)] = {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}}
    return prompt


def cycle() -> Prompt:
    return {
        "1": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
    }


def unknown_checkpoint() -> Prompt:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "not-there.safetensors"}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
    }


def cost_bomb() -> Prompt:
    prompt = invert_prompt(width=16384, height=16384)
    prompt["1"]["inputs"]["batch_size"] = 4096
    return prompt


def deep_input(depth: int) -> Prompt:
    return with_input("3", "filename_prefix", json.loads("[" * depth + "]" * depth))


# (id, prompt, error type, node at fault or None, that node's error type)
NODES = "prompt_outputs_failed_validation"
INVALID = "invalid_prompt"
INVALID_PROMPTS: list[tuple[str, Any, str, str | None, str | None]] = [
    ("prompt-is-list", [], INVALID, None, None),
    ("prompt-is-string", "text", INVALID, None, None),
    ("prompt-is-number", 3, INVALID, None, None),
    ("prompt-is-null", None, INVALID, None, None),
    ("prompt-is-list-of-nodes", [{"class_type": "SaveImage"}], INVALID, None, None),
    ("node-not-object", with_node("2", ["ImageInvert"]), INVALID, None, None),
    ("missing-class-type", mutated(lambda p: p["2"].pop("class_type")), INVALID, None, None),
    ("unknown-class-type", with_node("2", {"class_type": "NoSuchNode", "inputs": {}}), INVALID, None, None),
    ("class-type-number", with_node("2", {"class_type": 42, "inputs": {}}), INVALID, None, None),
    ("class-type-list", with_node("2", {"class_type": ["SaveImage"], "inputs": {}}), INVALID, None, None),
    ("inputs-not-object", mutated(lambda p: p["2"].__setitem__("inputs", [["1", 0]])), INVALID, None, None),
    ("no-output-node", mutated(lambda p: p.pop("3")), "prompt_no_outputs", None, None),
    ("too-many-nodes", many_nodes(1001), "prompt_too_large", None, None),
    ("node-id-too-long", mutated(lambda p: p.__setitem__("x" * 200, p.pop("1"))), INVALID, None, None),
    ("ui-workflow", {"nodes": [], "links": [], "version": 0.4}, INVALID, None, None),
    (
        "required-input-missing",
        mutated(lambda p: p["1"]["inputs"].pop("width")),
        NODES,
        "1",
        "required_input_missing",
    ),
    ("link-too-short", with_input("2", "image", ["1"]), NODES, "2", "bad_linked_input"),
    ("link-too-long", with_input("2", "image", ["1", 0, 0]), NODES, "2", "bad_linked_input"),
    ("link-slot-string", with_input("2", "image", ["1", "0"]), NODES, "2", "bad_linked_input"),
    ("link-slot-bool", with_input("2", "image", ["1", True]), NODES, "2", "bad_linked_input"),
    ("link-node-null", with_input("2", "image", [None, 0]), NODES, "2", "bad_linked_input"),
    ("link-to-missing-node", with_input("2", "image", ["99", 0]), NODES, "2", "bad_linked_input"),
    ("link-to-missing-slot", with_input("2", "image", ["1", 10**9]), NODES, "2", "bad_linked_input"),
    ("link-negative-slot", with_input("2", "image", ["1", -1]), NODES, "2", "bad_linked_input"),
    (
        "return-type-mismatch",
        {
            "1": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 8, "height": 8}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
        },
        NODES,
        "2",
        "return_type_mismatch",
    ),
    ("int-as-text", with_input("1", "width", "wide"), NODES, "1", "invalid_input_type"),
    ("int-as-fraction", with_input("1", "width", 8.5), NODES, "1", "invalid_input_type"),
    ("int-as-bool", with_input("1", "width", True), NODES, "1", "invalid_input_type"),
    ("int-as-null", with_input("1", "width", None), NODES, "1", "invalid_input_type"),
    ("int-as-object", with_input("1", "width", {"a": 1}), NODES, "1", "invalid_input_type"),
    ("int-inexact", with_input("1", "color", 2.0**60), NODES, "1", "invalid_input_type"),
    ("int-1e400", with_input("1", "width", 10**400), NODES, "1", "value_bigger_than_max"),
    ("string-as-object", with_input("3", "filename_prefix", {"text": "x"}), NODES, "3", "invalid_input_type"),
    ("string-as-null", with_input("3", "filename_prefix", None), NODES, "3", "invalid_input_type"),
    ("bool-as-text", composite("yes"), NODES, "2", "invalid_input_type"),
    ("bool-as-number", composite(2), NODES, "2", "invalid_input_type"),
    ("constant-for-link", with_input("2", "image", "cat.png"), NODES, "2", "invalid_input_type"),
    ("smaller-than-min", with_input("1", "width", 0), NODES, "1", "value_smaller_than_min"),
    ("negative", with_input("1", "width", -5), NODES, "1", "value_smaller_than_min"),
    ("bigger-than-max", with_input("1", "height", 16385), NODES, "1", "value_bigger_than_max"),
    ("image-not-uploaded", load_image("missing.png"), NODES, "1", "value_not_in_list"),
    (
        "value-not-in-fixed-list",
        with_node(
            "2",
            {
                "class_type": "ImageScale",
                "inputs": {
                    "image": ["1", 0],
                    "upscale_method": "magic",
                    "width": 8,
                    "height": 8,
                    "crop": "disabled",
                },
            },
        ),
        NODES,
        "2",
        "value_not_in_list",
    ),
    ("self-link-cycle", with_input("2", "image", ["2", 0]), NODES, "2", "dependency_cycle"),
    ("long-cycle", cycle(), NODES, None, "dependency_cycle"),
    ("string-too-long", invert_prompt(prefix="p" * 70_000), NODES, "3", "value_too_long"),
    ("cost-limit", cost_bomb(), "cost_limit_exceeded", None, None),
    ("deep-input-value", deep_input(70), INVALID, None, None),
    # Traversal in output names and input image names.
    *[
        (f"prefix-{i}", invert_prompt(prefix=prefix), NODES, "3", "path_not_allowed")
        for i, prefix in enumerate(
            [
                "../escape",
                "a/../../escape",
                "/etc/passwd",
                "\\\\server\\share",
                "C:\\Windows\\x",
                "c:x",
                "~/x",
                "a\x00b",
            ]
        )
    ],
    *[
        (f"image-name-{i}", load_image(name), NODES, "1", "path_not_allowed")
        for i, name in enumerate(
            ["../cat.png", "/etc/passwd", "D:/cat.png", "sub/../../cat.png", "..\\..\\x.png"]
        )
    ],
]


# -- Redis before and after ---------------------------------------------------------------------------


def queue_lists(client: redis.Redis, keys: list[bytes]) -> dict[bytes, int]:
    return {key: client.llen(key) for key in keys if client.type(key) == b"list"}


def redis_state(client: redis.Redis) -> dict[str, Any]:
    """What a job leaves in Redis. Ignored: rate-limit buckets, kombu's short-lived
    ``unacked_mutex`` (taken by idle workers while they restore unacknowledged messages) and the
    gateway's rebalancing lease (renewed by its background loop)."""
    ignored = {b"unacked_mutex", Keys.rebalance_lock().encode()}
    keys = sorted(key for key in client.keys("*") if not key.startswith(b"kiln:rate:") and key not in ignored)
    return {
        "keys": keys,
        "sequence": client.get(Keys.sequence()),
        "pending": client.zrange(Keys.pending(), 0, -1),
        "tenant_jobs": client.zcard(Keys.tenant_jobs(TENANT)),
        "tenant_active": client.scard(Keys.tenant_active(TENANT)),
        "uploads": sorted(client.smembers(Keys.uploads(TENANT))),
        "lists": queue_lists(client, keys),
    }


@dataclass
class Env:
    cluster: Cluster
    redis: redis.Redis
    http: httpx.Client
    anonymous: httpx.Client
    s3: Any
    seen: list[int] = field(default_factory=list)

    def inputs(self) -> list[str]:
        listing = self.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{TENANT}/inputs/")
        return sorted(item["Key"] for item in listing.get("Contents", []))


@pytest.fixture(scope="module")
def env(cluster: Cluster) -> Iterator[Env]:
    client = redis.Redis.from_url(cluster.redis.url)

    def idle() -> bool:
        state = redis_state(client)
        return not state["pending"] and not client.scard(Keys.running()) and not any(state["lists"].values())

    wait_for(idle, 120, "the cluster to be idle", interval=0.2)
    s3 = boto3.client(
        "s3",
        endpoint_url=cluster.s3.endpoint,
        region_name="us-east-1",
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
    )
    with cluster.http() as http, httpx.Client(base_url=cluster.url, timeout=30) as anonymous:
        yield Env(cluster, client, http, anonymous, s3)
    client.close()


@pytest.fixture
def no_trace(env: Env) -> Iterator[Env]:
    """The Redis state (and the tenant's stored inputs) must be the same after the test."""
    before, inputs = redis_state(env.redis), env.inputs()
    yield env
    assert redis_state(env.redis) == before
    assert env.inputs() == inputs


def send(env: Env, method: str, path: str, *, expect_429: bool = False, **kwargs: Any) -> httpx.Response:
    """One request; a 429 from the tenant's rate limit is waited out unless it is what we test."""
    for _ in range(20):
        response = env.http.request(method, path, **kwargs)
        if response.status_code != 429 or expect_429:
            return response
        time.sleep(float(response.headers.get("Retry-After", "1")))
    return response


def assert_error_shape(
    response: httpx.Response, status: int, error_type: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error", "node_errors"}, body
    assert set(body["error"]) >= {"type", "message", "details", "extra_info"}
    if error_type is not None:
        assert body["error"]["type"] == error_type, body
    return body


# -- validation rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/prompt", "/v1/jobs"])
@pytest.mark.parametrize(
    ("prompt", "error_type", "node", "node_error"),
    [pytest.param(*case[1:], id=case[0]) for case in INVALID_PROMPTS],
)
def test_invalid_prompt_is_400_with_node_errors(no_trace, route, prompt, error_type, node, node_error):
    body = assert_error_shape(send(no_trace, "POST", route, json={"prompt": prompt}), 400, error_type)
    if node_error is None:
        return
    nodes = [node] if node is not None else list(body["node_errors"])
    assert nodes and set(nodes) <= set(body["node_errors"]), body
    for node_id in nodes:
        entry = body["node_errors"][node_id]
        assert set(entry) == {"errors", "dependent_outputs", "class_type"}
        assert node_error in [e["type"] for e in entry["errors"]], entry
        assert all(set(e) == {"type", "message", "details", "extra_info"} for e in entry["errors"])


def test_unknown_model_is_400(no_trace):
    body = assert_error_shape(send(no_trace, "POST", "/prompt", json={"prompt": unknown_checkpoint()}), 400)
    catalogue = send(no_trace, "GET", "/object_info/CheckpointLoaderSimple").json()
    if catalogue:  # the loader is in the node catalogue: the file name is what is refused
        assert body["node_errors"]["1"]["errors"][0]["type"] == "value_not_in_list"
        assert body["node_errors"]["1"]["errors"][0]["extra_info"]["input_name"] == "ckpt_name"
    else:
        assert body["error"]["type"] == "invalid_prompt"


def test_huge_node_count_is_refused_without_running_out(no_trace):
    prompt = {str(i): {"class_type": "ImageInvert", "inputs": {}} for i in range(120_000)}  # ~6 MB
    started = time.monotonic()
    assert_error_shape(send(no_trace, "POST", "/prompt", json={"prompt": prompt}), 400, "prompt_too_large")
    assert time.monotonic() - started < 10


# -- bodies ---------------------------------------------------------------------------------------


JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize("route", ["/prompt", "/v1/jobs"])
@pytest.mark.parametrize(
    ("content", "headers"),
    [
        pytest.param(b"this is not json", JSON, id="not-json"),
        pytest.param(b"", JSON, id="empty"),
        pytest.param(b"{", JSON, id="truncated"),
        pytest.param(b'{"prompt": {}} trailing', JSON, id="trailing-garbage"),
        pytest.param(b"\xff\xfe\x00{", JSON, id="not-utf8"),
        pytest.param(b"[1, 2]", JSON, id="array-body"),
        pytest.param(b'"prompt"', JSON, id="string-body"),
        pytest.param(b'{"extra_data": {}}', JSON, id="no-prompt"),
        pytest.param(b'{"prompt": {"1": {"inputs": {"v": NaN}}}}', JSON, id="nan"),
        pytest.param(b'{"prompt": {"1": {"inputs": {"v": Infinity}}}}', JSON, id="infinity"),
        pytest.param(b'{"prompt": {"1": {"inputs": {"v": -Infinity}}}}', JSON, id="minus-infinity"),
        pytest.param(b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", JSON, id="deep-nesting"),
        pytest.param(
            b'{"prompt": {"1": {"inputs": {"v": 1' + b"0" * 5000 + b"}}}}", JSON, id="5000-digit-int"
        ),
        pytest.param(
            b"prompt=%7B%7D", {"Content-Type": "application/x-www-form-urlencoded"}, id="form-encoded"
        ),
        pytest.param(
            b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n{}\r\n--b--\r\n',
            {"Content-Type": "multipart/form-data; boundary=b"},
            id="multipart",
        ),
        pytest.param(b"<prompt/>", {"Content-Type": "application/xml"}, id="xml"),
    ],
)
def test_unusable_body_is_400(no_trace, route, content, headers):
    assert_error_shape(send(no_trace, "POST", route, content=content, headers=headers), 400, "invalid_prompt")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"prompt": invert_prompt(), "extra_data": [1]}, id="extra-data-list"),
        pytest.param({"prompt": invert_prompt(), "client_id": 5}, id="client-id-number"),
        pytest.param({"prompt": invert_prompt(), "prompt_id": "../../etc/passwd"}, id="prompt-id-traversal"),
        pytest.param({"prompt": invert_prompt(), "prompt_id": "x" * 65}, id="prompt-id-too-long"),
        pytest.param({"prompt": invert_prompt(), "prompt_id": "a b"}, id="prompt-id-space"),
        pytest.param({"prompt": invert_prompt(), "prompt_id": ""}, id="prompt-id-empty"),
    ],
)
def test_bad_prompt_fields_are_400(no_trace, body):
    assert_error_shape(send(no_trace, "POST", "/prompt", json=body), 400, "invalid_prompt")


@pytest.mark.parametrize(
    "priority",
    [-1, 10, 1000, "5", 5.5, True, None, [5], {"p": 5}],
    ids=lambda v: repr(v),
)
def test_invalid_priority_is_400(no_trace, priority):
    body = {"prompt": invert_prompt(), "priority": priority}
    assert_error_shape(send(no_trace, "POST", "/v1/jobs", json=body), 400, "invalid_prompt")


@pytest.mark.parametrize(
    "webhook",
    [
        "ftp://example.com/x",
        "javascript:alert(1)",
        "example.com/hook",
        "",
        "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1:6379/",
        "https://example.com/" + "x" * 3000,
        "https://exa mple.com/",
        12,
        ["http://x"],
        {"url": "http://x"},
    ],
    ids=lambda v: repr(v)[:30],
)
def test_invalid_webhook_is_400(no_trace, webhook):
    body = {"prompt": invert_prompt(), "webhook": webhook}
    assert_error_shape(send(no_trace, "POST", "/v1/jobs", json=body), 400, "invalid_prompt")


@pytest.mark.parametrize("size", [201, 4096, 60_000])
def test_oversized_idempotency_key_is_refused(no_trace, size):
    headers = {"Idempotency-Key": "k" * size}
    response = send(no_trace, "POST", "/v1/jobs", json={"prompt": invert_prompt()}, headers=headers)
    if response.status_code == 431:  # the HTTP server refused the header itself
        return
    assert_error_shape(response, 422, "invalid_request")


# -- sizes ---------------------------------------------------------------------------------------


def raw_exchange(port: int, head: bytes, chunks: Iterable[bytes] = ()) -> tuple[int, bytes]:
    """Send a request by hand (a lying Content-Length, chunks without a length) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the gateway answered early and closed: read what it said
        data = b""
        try:
            while b"\r\n\r\n" not in data or not _complete(data):
                part = sock.recv(65536)
                if not part:
                    break
                data += part
        except ConnectionResetError:
            pass
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def request_head(method: str, path: str, extra: str) -> bytes:
    token = AUTH["Authorization"]
    return f"{method} {path} HTTP/1.1\r\nHost: kiln\r\nAuthorization: {token}\r\n{extra}\r\n".encode()


@pytest.mark.parametrize("route", ["/prompt", "/v1/jobs", "/upload/image"])
def test_declared_oversized_body_is_413_before_it_is_read(no_trace, route):
    head = request_head(
        "POST", route, f"Content-Type: application/json\r\nContent-Length: {50 * MAX_BODY}\r\n"
    )
    status, body = raw_exchange(no_trace.cluster.gateway_port, head)
    assert status == 413 and json.loads(body)["error"]["type"] == "payload_too_large"


@pytest.mark.parametrize("route", ["/prompt", "/v1/jobs"])
def test_chunked_oversized_body_is_413(no_trace, route):
    chunk = b"[" + b" " * (1024 * 1024 - 1)

    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_BODY // len(chunk) + 1):
            yield b"%x\r\n%s\r\n" % (len(chunk), chunk)
        yield b"0\r\n\r\n"

    head = request_head("POST", route, "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n")
    status, body = raw_exchange(no_trace.cluster.gateway_port, head, chunks())
    assert status == 413 and json.loads(body)["error"]["type"] == "payload_too_large"


def test_chunked_oversized_body_through_a_client_is_413(no_trace):
    def stream() -> Iterator[bytes]:
        for _ in range(9):
            yield b" " * (1024 * 1024)

    response = send(no_trace, "POST", "/prompt", content=stream(), headers=JSON)
    assert_error_shape(response, 413, "payload_too_large")


def test_oversized_upload_is_413(no_trace):
    files = {"image": ("big.png", b"\x89PNG" + b"\0" * (MAX_BODY + 10), "image/png")}
    assert_error_shape(send(no_trace, "POST", "/upload/image", files=files), 413, "payload_too_large")


# -- paths ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"filename": "../../etc/passwd"},
        {"filename": "/etc/passwd"},
        {"filename": "passwd", "subfolder": "../../../etc"},
        {"filename": "passwd", "subfolder": "/etc"},
        {"filename": "x.png", "subfolder": "..\\..\\other-tenant"},
        {"filename": "C:\\Windows\\win.ini"},
        {"filename": "a\x00.png"},
        {"filename": "x.png", "type": "../../secrets"},
        {"filename": "x.png", "type": "input", "subfolder": "../../e2e"},
        {"filename": "3_0.png", "subfolder": "../other-tenant/some-job"},
        {"filename": ""},
    ],
    ids=lambda p: repr(p)[:40],
)
def test_view_traversal_is_refused(no_trace, params):
    response = send(no_trace, "GET", "/view", params={"type": "output", **params})
    assert response.status_code in (400, 404), response.text[:300]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/files/../../etc/passwd?expires=9999999999&signature=x",
        "/v1/files/e2e/x/3_0.png?expires=9999999999&signature=forged",
        "/view/../../etc/passwd",
        "/v1/jobs/..%2F..%2Fetc%2Fpasswd",
    ],
)
def test_traversal_urls_are_404(no_trace, path):
    response = send(no_trace, "GET", path)
    assert response.status_code == 404, response.text[:300]


PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90wS\xde"
    b"\x00\x00\x00\x0cIDATx\x9cc\xf8\xcf\xc0\x00\x00\x03\x01\x01\x00\xc9\xfe\x92\xef\x00\x00\x00\x00IEND"
    b"\xaeB`\x82"
)


@pytest.mark.parametrize(
    ("name", "subfolder"),
    [
        ("x.png", "../../other-tenant"),
        ("x.png", "/abs"),
        ("x.png", "C:\\Windows"),
        ("x.png", "a/../../b"),
        ("x.png", "~/x"),
        ("..", ""),
        (".", ""),
        ("../", ""),
    ],
)
def test_upload_traversal_is_refused(no_trace, name, subfolder):
    files = {"image": (name, PNG, "image/png")}
    response = send(no_trace, "POST", "/upload/image", files=files, data={"subfolder": subfolder})
    assert response.status_code == 400, response.text[:300]
    assert response.json()["error"]["type"] in ("unsafe_path", "invalid_prompt")


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("evil.gif", b"GIF89a" + b"\0" * 20),
        ("notes.txt", b"hello"),
        ("empty.png", b""),
        ("bomb.png", PNG[:40]),
    ],
)
def test_upload_of_a_non_image_is_400(no_trace, name, data):
    response = send(no_trace, "POST", "/upload/image", files={"image": (name, data, "image/png")})
    assert response.status_code == 400, response.text[:300]


@pytest.mark.parametrize(
    "request_kwargs",
    [
        pytest.param({"json": {"prompt": invert_prompt()}}, id="json-instead-of-multipart"),
        pytest.param({"data": {"subfolder": "x"}}, id="no-file"),
        pytest.param({"content": b"\x89PNG", "headers": {"Content-Type": "image/png"}}, id="raw-bytes"),
    ],
)
def test_upload_with_the_wrong_content_type_is_422(no_trace, request_kwargs):
    response = send(no_trace, "POST", "/upload/image", **request_kwargs)
    assert response.status_code == 422, response.text[:300]


def test_mask_with_a_traversal_reference_is_refused(no_trace):
    ref = json.dumps({"filename": "../../../etc/passwd", "subfolder": "", "type": "input"})
    response = send(
        no_trace,
        "POST",
        "/upload/mask",
        files={"image": ("m.png", PNG, "image/png")},
        data={"original_ref": ref},
    )
    assert response.status_code in (400, 404), response.text[:300]


# -- auth, methods, rate ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic ZTJlLWtleTo="}, {"X-API-Key": ""}],
    ids=["none", "wrong-bearer", "basic", "empty-x-api-key"],
)
@pytest.mark.parametrize("route", ["/prompt", "/v1/jobs"])
def test_without_a_valid_key_is_401(no_trace, headers, route):
    response = no_trace.anonymous.post(route, json={"prompt": invert_prompt()}, headers=headers)
    assert_error_shape(response, 401, "unauthorized")


def test_websocket_without_a_key_is_refused(env):
    import websockets.sync.client as ws_client
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    url = env.cluster.url.replace("http", "ws") + "/ws?clientId=intruder"
    with pytest.raises((ConnectionClosed, InvalidStatus)), ws_client.connect(url, open_timeout=10) as sock:
        sock.recv(timeout=10)


@pytest.mark.parametrize(
    ("method", "path"), [("PUT", "/prompt"), ("DELETE", "/prompt"), ("PATCH", "/v1/jobs")]
)
def test_wrong_method_is_405(no_trace, method, path):
    response = send(no_trace, method, path, json={"prompt": invert_prompt()})
    if path.startswith("/v1/"):
        assert_error_shape(response, 405, "method_not_allowed")
    else:  # what ComfyUI's server answers
        assert response.status_code == 405 and response.text == "405: Method Not Allowed"


def test_over_the_rate_is_429_with_retry_after(no_trace):
    """Invalid prompts take tokens too (the limit comes before validation): a burst of them is
    refused 429 once the bucket is empty, and none leaves a trace."""
    bad = {"prompt": with_input("1", "width", 0)}
    statuses = []
    for _ in range(400):
        response = send(no_trace, "POST", "/prompt", json=bad, expect_429=True)
        statuses.append(response.status_code)
        if response.status_code == 429:
            break
    assert set(statuses[:-1]) == {400} and statuses[-1] == 429
    assert_error_shape(response, 429, "rate_limited")
    assert int(response.headers["Retry-After"]) >= 1
    time.sleep(2.5)  # let the bucket refill for whoever comes next


def test_corpus_covers_every_validation_error_type():
    """Every error type the validator can report (tests/engine/test_validation.py) is sent here."""
    sent = {case[2] for case in INVALID_PROMPTS} | {case[4] for case in INVALID_PROMPTS if case[4]}
    assert {
        "invalid_prompt",
        "prompt_no_outputs",
        "prompt_too_large",
        "prompt_outputs_failed_validation",
        "cost_limit_exceeded",
        "required_input_missing",
        "bad_linked_input",
        "return_type_mismatch",
        "invalid_input_type",
        "value_smaller_than_min",
        "value_bigger_than_max",
        "value_not_in_list",
        "dependency_cycle",
        "path_not_allowed",
        "value_too_long",
    } <= sent

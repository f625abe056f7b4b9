"""Gateway submit throughput, with real processes: redis-server (AOF, fsync every second) and the
gateway (`kiln serve`, uvicorn, API-key auth); no worker, so every accepted job stays queued.

Load comes from separate load-generator processes (raw asyncio HTTP/1.1 keep-alive clients on
uvloop: far cheaper per request than httpx, so the clients take as little as possible of the CPU
they share with the server). Each route is driven closed loop (N connections, each sending its next
request when the last is answered) and open loop (requests scheduled at a fixed rate on a pool of
connections; latency counts from the scheduled time, so a slow server cannot hide queueing). Each
run starts from an empty Redis.

The table gives, per run: requests/s, p50/p99 latency, non-2xx answers, and the CPU per request of
the gateway (all its processes), the clients and redis-server; `CPU %` is their sum over the run's
wall time and the machine's cores (100% = every core busy).

    .venv/bin/python bench/submit.py                          # both routes, ~1 minute
    .venv/bin/python bench/submit.py --gateway-processes 2 --clients 1 --concurrency 32 --rate 1000

Routing against a deep backlog of one model: with ``--models N`` the prompts load a checkpoint
(txt2img, ``CheckpointLoaderSimple``), cycling over N names that the gateway's models folder lists
(empty files: no worker runs them); with ``--fake-workers`` they are routed to idle workers' queues,
which grow. ``--backlog`` fills the queues to each depth in turn (unmeasured) and measures
``--measure`` requests closed loop there:

    .venv/bin/python bench/submit.py --fake-workers 2 --models 1 --routes /v1/jobs --backlog 0,1000,3000,6000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.services import free_port, port_open, redis_server_binary, wait_for  # noqa: E402

API_KEY = "bench-key"
TENANT = "bench"
PROMPT = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0x336699},
    },
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "bench"}},
}
# route -> (body, the status of an accepted submission)
ROUTES: dict[str, tuple[dict[str, Any], int]] = {
    "/v1/jobs": ({"prompt": PROMPT}, 202),
    "/prompt": ({"prompt": PROMPT, "client_id": "bench-client"}, 200),
}


def checkpoint_name(index: int) -> str:
    return f"bench-{index:02d}.safetensors"


def model_prompt(index: int) -> dict[str, Any]:
    """A txt2img prompt whose loader names checkpoint ``index`` (the job's models: that file)."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint_name(index)}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a glass bottle", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": 1,
                "steps": 20,
                "cfg": 8.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "bench"}},
    }


def route_body(route: str, prompt: dict[str, Any]) -> dict[str, Any]:
    return {**ROUTES[route][0], "prompt": prompt}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc); 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def group_cpu_s(pgid: int) -> float:
    """CPU seconds of every live process of a process group (uvicorn's supervisor and workers)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


# -- processes --------------------------------------------------------------------------------------


class Stack:
    """redis-server and the gateway, each in its own process group."""

    def __init__(self, workdir: Path, gateway_processes: int, models: int = 0) -> None:
        self.workdir = workdir
        self.models = models
        self.redis_port = free_port()
        self.port = free_port()
        self.gateway_processes = gateway_processes
        self.processes: dict[str, subprocess.Popen] = {}
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("KILN_")},
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])),
            "KILN_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "KILN_STORAGE_URL": (workdir / "storage").as_uri(),
            "KILN_API_KEYS": f"{API_KEY}:{TENANT}",
            "KILN_SIGNING_SECRET": "bench-signing-secret",
            "KILN_RATE_LIMIT_PER_S": "1000000",
            "KILN_RATE_LIMIT_BURST": "1000000",
            "KILN_MAX_QUEUED_PER_TENANT": "0",
            "KILN_MODELS_DIRS": str(workdir / "models"),
            "KILN_INPUT_DIR": str(workdir / "input"),
            "KILN_LOG_LEVEL": "WARNING",
        }

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 (the child keeps it)
        self.processes[name] = subprocess.Popen(
            args,
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def start_all(self) -> None:
        (self.workdir / "redis").mkdir()
        (self.workdir / "models" / "checkpoints").mkdir(parents=True)
        for index in range(self.models):
            (self.workdir / "models" / "checkpoints" / checkpoint_name(index)).write_bytes(b"bench")
        redis_args = [
            "--port",
            str(self.redis_port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir / "redis"),
        ]
        redis_args += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
        self.start("redis", [redis_server_binary(), *redis_args])
        wait_for(lambda: port_open(self.redis_port), 10, "redis-server")
        serve = [sys.executable, "-m", "kiln", "serve", "--port", str(self.port)]
        if self.gateway_processes > 1:
            serve += ["--gateway-processes", str(self.gateway_processes)]
        self.start("gateway", serve)
        wait_for(self.ready, 60, "the gateway")

    def ready(self) -> bool:
        import httpx

        return httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2).status_code == 200

    def stop(self, name: str) -> None:
        """SIGTERM the process group of ``name`` (SIGKILL after 30 s)."""
        process = self.processes.get(name)
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def stop_all(self) -> None:
        for name in reversed(list(self.processes)):  # started last, stopped first
            self.stop(name)

    def fake_workers(self, count: int, stop: threading.Event) -> threading.Thread:
        """Heartbeats of ``count`` idle workers that never take a job: submissions are routed to
        their queues, which grow, so each routing snapshot reads a growing backlog."""
        import redis

        client = redis.Redis.from_url(self.env["KILN_REDIS_URL"])

        def beat() -> None:
            while not stop.is_set():
                for index in range(count):
                    worker_id = f"bench-worker-{index}"
                    state = {"id": worker_id, "time": time.time(), "resident": [], "job_seconds": {}}
                    client.set(f"kiln:worker:{worker_id}", json.dumps(state), ex=5)
                    client.sadd("kiln:workers", worker_id)
                stop.wait(1.0)
            client.close()

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        return thread

    def empty(self) -> None:
        import redis

        client = redis.Redis.from_url(self.env["KILN_REDIS_URL"])
        client.flushdb()
        client.close()
        time.sleep(1.5)  # the gateway's cached views of the pool expire


# -- the load generator (a separate process) --------------------------------------------------------


def request_bytes(port: int, route: str, prompt: dict[str, Any] = PROMPT) -> bytes:
    body = json.dumps(route_body(route, prompt)).encode()
    head = (
        f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Connection:
    """One keep-alive HTTP/1.1 connection; answers are read by Content-Length."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, request: bytes) -> int:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await self.reader.readexactly(length)
        return status


async def connect(port: int, count: int) -> list[Connection]:
    pairs = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]
    return [Connection(r, w) for r, w in pairs]


async def closed_loop(
    port: int, requests: list[bytes], ok: int, concurrency: int, duration: float, count: int = 0
) -> dict[str, Any]:
    """Until ``duration`` has passed, or, with ``count``, until that many requests were sent;
    request i is ``requests[i % len(requests)]``."""
    connections = await connect(port, concurrency)
    latencies: list[float] = []
    errors = 0
    sent = 0
    stop_at = time.perf_counter() + duration

    async def run(connection: Connection) -> None:
        nonlocal errors, sent
        while (sent < count) if count else (time.perf_counter() < stop_at):
            request = requests[sent % len(requests)]
            sent += 1
            started = time.perf_counter()
            status = await connection.send(request)
            latencies.append((time.perf_counter() - started) * 1000)
            errors += status != ok

    began = time.perf_counter()
    await asyncio.gather(*(run(c) for c in connections))
    elapsed = time.perf_counter() - began
    for connection in connections:
        connection.writer.close()
    return {"requests": len(latencies), "seconds": elapsed, "errors": errors, "latencies": latencies}


async def open_loop(
    port: int, requests: list[bytes], ok: int, rate: float, duration: float, pool: int
) -> dict[str, Any]:
    """Requests scheduled every 1/rate s on ``pool`` keep-alive connections; latency counts from the
    scheduled time (a request waiting for a free connection is late, not excused)."""
    free: asyncio.Queue[Connection] = asyncio.Queue()
    for connection in await connect(port, pool):
        free.put_nowait(connection)
    latencies: list[float] = []
    errors = 0

    async def one(scheduled: float, request: bytes) -> None:
        nonlocal errors
        connection = await free.get()
        try:
            status = await connection.send(request)
        finally:
            free.put_nowait(connection)
        latencies.append((time.perf_counter() - scheduled) * 1000)
        errors += status != ok

    tasks = []
    began = time.perf_counter()
    for index in range(int(rate * duration)):
        scheduled = began + index / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled, requests[index % len(requests)])))
    # Requests still unanswered one duration after the last was due count as errors.
    _, pending = await asyncio.wait(tasks, timeout=duration)
    for task in pending:
        task.cancel()
    elapsed = time.perf_counter() - began
    while not free.empty():
        free.get_nowait().writer.close()
    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "errors": errors + len(pending),
        "latencies": latencies,
    }


def load_generator_main(args: argparse.Namespace) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    prompts = [model_prompt(index) for index in range(args.models)] or [PROMPT]
    requests, ok = [request_bytes(args.port, args.route, p) for p in prompts], ROUTES[args.route][1]
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    if args.rate:
        coroutine = open_loop(args.port, requests, ok, args.rate, args.duration, args.concurrency)
    else:
        coroutine = closed_loop(args.port, requests, ok, args.concurrency, args.duration, args.count)
    result = asyncio.run(coroutine)
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    print(json.dumps(result))


def run_load(
    stack: Stack, route: str, clients: int, concurrency: int, duration: float, rate: float, count: int = 0
) -> dict[str, Any]:
    """``clients`` load processes sharing ``concurrency`` connections (and ``rate``, and ``count``
    requests when it is set: then closed loop until they are answered, whatever ``duration``)."""
    share = max(1, concurrency // clients)
    command = [sys.executable, __file__, "--load-generator", "--port", str(stack.port), "--route", route]
    command += ["--concurrency", str(share), "--duration", str(duration), "--rate", str(rate / clients)]
    command += ["--models", str(stack.models)]
    if count:
        command += ["--count", str(max(1, count // clients))]
    gateway = stack.processes["gateway"].pid
    redis_pid = stack.processes["redis"].pid
    gateway_before, redis_before = group_cpu_s(gateway), process_cpu_s(redis_pid)
    began = time.perf_counter()
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(clients)]
    outputs = [child.communicate(timeout=3600)[0] for child in children]
    wall = time.perf_counter() - began
    results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    requests = sum(r["requests"] for r in results)
    per_request = 1000 / max(1, requests)
    gateway_cpu = group_cpu_s(gateway) - gateway_before
    redis_cpu = process_cpu_s(redis_pid) - redis_before
    client_cpu = sum(r["cpu_s"] for r in results)
    mode = f"open {rate:.0f}/s" if rate else f"closed {concurrency} conn"
    if count:
        mode = f"{count} req, {concurrency} conn"
    return {
        "route": route,
        "mode": f"{mode}, {clients} proc",
        "requests": requests,
        "rate": requests / max(r["seconds"] for r in results),
        "latencies": [x for r in results for x in r["latencies"]],
        "errors": sum(r["errors"] for r in results),
        "gateway_ms": gateway_cpu * per_request,
        "client_ms": client_cpu * per_request,
        "redis_ms": redis_cpu * per_request,
        "cpu_pct": 100 * (gateway_cpu + redis_cpu + client_cpu) / wall / (os.cpu_count() or 1),
    }


# -- report -------------------------------------------------------------------------------------------


def print_table(runs: list[dict[str, Any]]) -> None:
    header = (
        f"| {'route':<9} | {'load':<22} | {'requests':>8} | {'req/s':>6} | {'p50 ms':>7} | {'p99 ms':>7} "
        f"| {'errors':>6} | {'gw ms/req':>9} | {'client ms/req':>13} | {'redis ms/req':>12} | {'CPU %':>5} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for run in runs:
        p50 = statistics.median(run["latencies"]) if run["latencies"] else float("nan")
        p99 = percentile(run["latencies"], 0.99)
        print(
            f"| {run['route']:<9} | {run['mode']:<22} | {run['requests']:>8} | {run['rate']:>6.0f} "
            f"| {p50:>7.2f} | {p99:>7.2f} | {run['errors']:>6} | {run['gateway_ms']:>9.3f} "
            f"| {run['client_ms']:>13.3f} | {run['redis_ms']:>12.3f} | {run['cpu_pct']:>5.0f} |"
        )


def queued(stack: Stack) -> int:
    """Task messages waiting in every queue (the shared one and the workers')."""
    import redis

    client = redis.Redis.from_url(stack.env["KILN_REDIS_URL"])
    try:
        keys = [k for k in client.scan_iter(match="kiln.*", count=1000) if client.type(k) == b"list"]
        return sum(client.llen(k) for k in keys)
    finally:
        client.close()


def print_backlog_table(runs: list[dict[str, Any]]) -> None:
    print("| route | backlog | requests | req/s | p50 ms | p99 ms | errors | gw ms/req |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        p50 = statistics.median(run["latencies"]) if run["latencies"] else float("nan")
        p99 = percentile(run["latencies"], 0.99)
        print(
            f"| {run['route']} | {run['backlog']} | {run['requests']} | {run['rate']:.0f} | {p50:.2f} "
            f"| {p99:.2f} | {run['errors']} | {run['gateway_ms']:.3f} |"
        )


def backlog_runs(stack: Stack, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per route: from an empty Redis, fill the queues to each depth in turn (closed loop, not
    measured) and measure ``args.measure`` requests there."""
    concurrency = int(args.concurrency.split(",")[0])
    runs = []
    for route in args.routes.split(","):
        stack.empty()
        depth = 0
        for target in sorted(int(d) for d in args.backlog.split(",")):
            if target > depth:
                fill = run_load(stack, route, args.clients, concurrency, 0.0, 0.0, target - depth)
                depth += fill["requests"] - fill["errors"]
            run = run_load(stack, route, args.clients, concurrency, 0.0, 0.0, args.measure)
            run["backlog"] = queued(stack) - (run["requests"] - run["errors"])  # at the run's start
            depth += run["requests"] - run["errors"]
            runs.append(run)
            rate, cpu = run["rate"], run["gateway_ms"]
            print(f"# {route} backlog {run['backlog']}: {rate:.0f} req/s, gw {cpu:.3f} ms/req", flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--routes", default="/v1/jobs,/prompt", help="routes to drive, comma-separated")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per run")
    parser.add_argument("--concurrency", default="8,32", help="closed-loop connection counts")
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop offered rate (0: skip)")
    parser.add_argument("--pool", type=int, default=64, help="open-loop connections")
    parser.add_argument("--clients", type=int, default=1, help="load-generator processes")
    parser.add_argument(
        "--gateway-processes", type=int, default=1, help="gateway processes (kiln serve --gateway-processes)"
    )
    parser.add_argument(
        "--fake-workers", type=int, default=0, help="idle workers (heartbeats only) that jobs are routed to"
    )
    parser.add_argument(
        "--models",
        type=int,
        default=0,
        help="prompts load a checkpoint, cycling over this many (0: the model-free EmptyImage prompt)",
    )
    parser.add_argument(
        "--backlog",
        default="",
        help="instead of the runs above: fill the queues to each of these depths (comma-separated) and "
        "measure --measure requests closed loop (first --concurrency) at each",
    )
    parser.add_argument("--measure", type=int, default=500, help="requests measured per --backlog depth")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    parser.add_argument("--load-generator", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--route", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_generator:
        args.concurrency = int(args.concurrency)
        load_generator_main(args)
        return

    workdir = Path(tempfile.mkdtemp(prefix="kiln-bench-submit-"))
    stack = Stack(workdir, args.gateway_processes, args.models)
    print(
        f"# gateway submit throughput ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}); gateway processes: {args.gateway_processes}, "
        f"load processes: {args.clients}; fake workers: {args.fake_workers}; models: {args.models}; "
        f"{args.duration:.0f} s per run; "
        f"work folder {workdir}"
    )
    runs = []
    stop = threading.Event()
    try:
        stack.start_all()
        if args.fake_workers:
            stack.fake_workers(args.fake_workers, stop)
        if args.backlog:
            runs = backlog_runs(stack, args)
        for route in args.routes.split(",") if not args.backlog else ():
            for concurrency in args.concurrency.split(","):
                stack.empty()
                runs.append(run_load(stack, route, args.clients, int(concurrency), args.duration, 0.0))
            if args.rate:
                stack.empty()
                runs.append(run_load(stack, route, args.clients, args.pool, args.duration, args.rate))
    finally:
        stop.set()
        stack.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.backlog:
        print_backlog_table(runs)
        return
    print_table(runs)
    print("errors: non-2xx answers, and open-loop requests unanswered one run length after their time")


if __name__ == "__main__":
    main()

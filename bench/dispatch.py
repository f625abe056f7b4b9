"""Dispatch latency and gateway submit throughput, with real processes: redis-server, the gateway
(`kiln serve`, uvicorn) and a warm CPU worker (`kiln worker --device cpu`) running a trivial
workflow (EmptyImage 8x8 -> ImageInvert -> SaveImage).

(a) submit-to-start: one job at a time on an idle worker; latency from the client's send to the
    job's ``started_at`` (the worker's claim), also from the gateway's ``created_at``.
(b) submit throughput: ``POST /v1/jobs`` with bench/submit.py's load generator (separate
    processes, raw asyncio HTTP/1.1 keep-alive), closed loop at several concurrencies and open loop
    at a fixed arrival rate. The worker is stopped for (b): the gateway is measured alone.
    bench/submit.py measures both submit routes, with several gateway processes too.

Targets (2-core VM): dispatch p50 <= 5 ms, p99 <= 20 ms; >= 1,000 submits/s with p99 <= 20 ms.

    .venv/bin/python bench/dispatch.py                 # all of it (~1 minute)
    .venv/bin/python bench/dispatch.py --jobs 500 --duration 10 --rate 1000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import submit  # bench/submit.py (this folder is on sys.path when a bench script runs)
from submit import API_KEY, PROMPT, percentile, wait_for

# -- processes -----------------------------------------------------------------------------------------


class Stack(submit.Stack):
    """bench/submit.py's redis-server and gateway, plus one warm CPU worker."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, gateway_processes=1)
        self.env["CUDA_VISIBLE_DEVICES"] = ""

    def start_all(self) -> None:
        super().start_all()
        kiln = [sys.executable, "-m", "kiln"]
        self.start("worker", [*kiln, "worker", "--device", "cpu"], {"KILN_WORKER_ID": "bench-cpu"})


# -- (a) dispatch latency ---------------------------------------------------------------------------


def measure_dispatch(stack: Stack, jobs: int) -> dict[str, list[float]]:
    """One job at a time: submit, wait for its ``kiln_job_finished`` event (pub/sub: no polling
    that would steal CPU from the gateway and the worker), then read its timestamps."""
    import httpx
    import redis

    client = redis.Redis.from_url(stack.env["KILN_REDIS_URL"])
    events = client.pubsub(ignore_subscribe_messages=True)
    events.psubscribe("kiln:events:job:*")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    send_to_start: list[float] = []
    created_to_start: list[float] = []
    submit_rtt: list[float] = []
    with httpx.Client(base_url=f"http://127.0.0.1:{stack.port}", headers=headers, timeout=30) as http:
        wait_for(lambda: client.exists("kiln:worker:bench-cpu"), 120, "the worker's heartbeat")
        for index in range(jobs + 5):  # the first 5 warm everything up
            sent = time.time()
            response = http.post("/v1/jobs", json={"prompt": PROMPT})
            answered = time.time()
            job_id = response.json()["id"]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                message = events.get_message(timeout=1.0)
                if message is None:
                    continue
                event = json.loads(message["data"])
                if event.get("job_id") == job_id and event["type"] == "kiln_job_finished":
                    break
            else:
                raise TimeoutError(job_id)
            status, started, created = client.hmget(
                f"kiln:job:{job_id}", "status", "started_at", "created_at"
            )
            if status != b"succeeded":
                raise RuntimeError(f"job {job_id} {status!r}")
            if index >= 5:
                send_to_start.append((float(started) - sent) * 1000)
                created_to_start.append((float(started) - float(created)) * 1000)
                submit_rtt.append((answered - sent) * 1000)
    events.close()
    client.close()
    return {"send_to_start": send_to_start, "created_to_start": created_to_start, "submit_rtt": submit_rtt}


# -- (b) the load generator (a separate process) ----------------------------------------------------


def empty_queue(stack: Stack) -> None:
    """Forget every job (the worker is stopped): a throughput run starts from an empty queue."""
    import redis

    client = redis.Redis.from_url(stack.env["KILN_REDIS_URL"])
    client.flushdb()
    client.close()
    time.sleep(1.5)  # the gateway's cached views of the pool expire


# -- report -------------------------------------------------------------------------------------------


def summary(latencies: list[float]) -> tuple[float, float, float]:
    return statistics.median(latencies), percentile(latencies, 0.99), max(latencies)


def run_load(stack: Stack, concurrency: int, duration: float, rate: float = 0.0) -> dict[str, Any]:
    return submit.run_load(stack, "/v1/jobs", 1, concurrency, duration, rate)  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=300, help="jobs for the dispatch latency")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per throughput run")
    parser.add_argument("--concurrency", default="1,4,16,64", help="closed-loop connection counts")
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop offered rate (0: skip)")
    parser.add_argument("--pool", type=int, default=64, help="open-loop connection pool")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="kiln-bench-dispatch-"))
    stack = Stack(workdir)
    print(f"# dispatch and submit throughput ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}); work folder {workdir}")  # fmt: skip
    try:
        stack.start_all()
        dispatch = measure_dispatch(stack, args.jobs)
        stack.stop("worker")  # (b) measures the gateway alone
        runs = []
        for concurrency in args.concurrency.split(","):
            empty_queue(stack)  # each run starts from an empty queue (routing reads the whole queue)
            runs.append(run_load(stack, int(concurrency), args.duration))
        if args.rate:
            empty_queue(stack)
            runs.append(run_load(stack, args.pool, args.duration, args.rate))
    finally:
        stack.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n(a) submit-to-start, {len(dispatch['send_to_start'])} jobs one at a time, idle warm worker")
    print(f"{'measure':<44} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'target':>16}")
    rows = [
        ("client send -> started_at", dispatch["send_to_start"], "p50<=5, p99<=20"),
        ("gateway created_at -> started_at", dispatch["created_to_start"], ""),
        ("POST /v1/jobs round trip (1 client)", dispatch["submit_rtt"], ""),
    ]
    for name, values, target in rows:
        p50, p99, top = summary(values)
        print(f"{name:<44} {p50:>8.2f} {p99:>8.2f} {top:>8.2f} {target:>16}")
    print("\n(b) POST /v1/jobs throughput (gateway alone, each run from an empty queue; every accepted")
    print("    job stays queued, so the queue grows during a run)")
    submit.print_table(runs)
    print("targets: >= 1000 req/s with p99 <= 20 ms")


if __name__ == "__main__":
    main()

"""Discrete-event simulation of a GPU pool, comparing Kiln's router with a shared FIFO and with
round-robin on the same workload.

The Kiln policy drives the real router (``api.routing.Router``): every arrival is placed with
``Router.route`` and every ``--tick-s`` the simulation applies ``Router.plan`` (steals from
backlogs, moves, preloads), as the gateway's rebalancing loop does. The router sees what a real
gateway sees: each worker's resident models, its running job, its queue, and moving averages of
the job and load times the simulated workers *measured*; never the true durations.

Simulated workers hold up to ``--slots`` models (least recently used evicted), take ``--load-s``
to load a model that is not resident, then run the job. Models have Zipf(``--zipf``) popularity;
jobs last ``--job-s`` +- ``--job-spread`` (uniform); arrivals are Poisson at a rate that keeps
the GPUs ``--util`` busy if every job were warm: rate = util x gpus / job_s.

    .venv/bin/python bench/routing_sim.py                 # the acceptance scenario
    .venv/bin/python bench/routing_sim.py --sweep         # plus utilisation and model-count sweeps
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api.routing import JobView, Move, PoolView, Preload, Router, RoutingPolicy, RunningView, WorkerView, ema

POLICIES = ("kiln", "fifo", "rr")


@dataclass
class Scenario:
    gpus: int = 8
    models: int = 20
    zipf: float = 1.1
    load_s: float = 8.0
    job_s: float = 2.0
    job_spread: float = 0.5
    util: float = 0.7
    jobs: int = 5000
    slots: int = 1
    tick_s: float = 0.5
    seed: int = 1


@dataclass
class SimJob:
    id: int
    model: str
    arrival: float
    work: float  # true job seconds (the router never sees it)
    view: JobView
    start: float | None = None
    finish: float | None = None


@dataclass
class Gpu:
    index: int
    slots: int
    resident: list[str] = field(default_factory=list)  # least recently used first
    queue: list[SimJob] = field(default_factory=list)
    running: SimJob | None = None
    loading: str | None = None
    busy_until: float = 0.0
    busy_s: float = 0.0
    view: WorkerView | None = None

    def use(self, model: str) -> bool:
        """Make ``model`` resident (LRU); True when it had to be loaded."""
        cold = model not in self.resident
        if not cold:
            self.resident.remove(model)
        self.resident.append(model)
        while len(self.resident) > self.slots:
            self.resident.pop(0)
        return cold


@dataclass
class Result:
    policy: str
    loads: int
    busy: float
    p50: float
    p95: float
    p99: float
    max_wait: float
    makespan: float
    wall_s: float


def workload(sc: Scenario) -> list[SimJob]:
    rng = random.Random(sc.seed)
    weights = [1.0 / (rank**sc.zipf) for rank in range(1, sc.models + 1)]
    names = [f"checkpoints/model-{rank:02d}.safetensors" for rank in range(1, sc.models + 1)]
    rate = sc.util * sc.gpus / sc.job_s
    t = 0.0
    jobs = []
    for index in range(sc.jobs):
        t += rng.expovariate(rate)
        model = rng.choices(names, weights)[0]
        work = sc.job_s * (1 + rng.uniform(-sc.job_spread, sc.job_spread))
        jobs.append(SimJob(index, model, t, work, JobView(id=str(index), models=(model,), created_at=t)))
    return jobs


class Simulation:
    def __init__(self, sc: Scenario, policy: str, router_policy: RoutingPolicy | None = None) -> None:
        self.sc = sc
        self.policy = policy
        self.gpus = [Gpu(i, sc.slots) for i in range(sc.gpus)]
        self.events: list[tuple[float, int, str, object]] = []
        self.seq = itertools.count()
        self.fifo: deque[SimJob] = deque()
        self.loads = 0
        self.by_id: dict[str, SimJob] = {}
        self.rr = itertools.count()
        self.router = Router(router_policy) if policy == "kiln" else None
        if self.router is not None:
            for gpu in self.gpus:
                gpu.view = WorkerView(id=f"gpu{gpu.index}", slots=sc.slots)
            self.pool = PoolView({g.view.id: g.view for g in self.gpus if g.view is not None})

    def push(self, at: float, kind: str, payload: object) -> None:
        heapq.heappush(self.events, (at, next(self.seq), kind, payload))

    def run(self, jobs: list[SimJob]) -> Result:
        started = time.perf_counter()
        for job in jobs:
            self.push(job.arrival, "arrive", job)
            self.by_id[job.view.id] = job
        if self.router is not None:
            self.push(0.0, "tick", None)
        remaining = len(jobs)
        now = 0.0
        while self.events and remaining:
            now, _, kind, payload = heapq.heappop(self.events)
            if kind == "arrive":
                self.arrive(payload, now)  # type: ignore[arg-type]
            elif kind == "done":
                remaining -= 1
                self.done(payload, now)  # type: ignore[arg-type]
            elif kind == "loaded":
                self.loaded(payload, now)  # type: ignore[arg-type]
            elif kind == "tick":
                self.tick(now)
                self.push(now + self.sc.tick_s, "tick", None)
        latencies = sorted(j.finish - j.arrival for j in jobs if j.finish is not None)
        waits = [j.start - j.arrival for j in jobs if j.start is not None]
        busy = sum(g.busy_s for g in self.gpus) / (len(self.gpus) * now)
        return Result(
            self.policy,
            self.loads,
            busy,
            _quantile(latencies, 0.50),
            _quantile(latencies, 0.95),
            _quantile(latencies, 0.99),
            max(waits),
            now,
            time.perf_counter() - started,
        )

    # -- arrivals and dispatch ---------------------------------------------------------------------

    def arrive(self, job: SimJob, now: float) -> None:
        if self.policy == "fifo":
            self.fifo.append(job)
            for gpu in self.gpus:
                if self.idle(gpu):
                    self.start_next(gpu, now)
                    break
            return
        if self.policy == "rr":
            gpu = self.gpus[next(self.rr) % len(self.gpus)]
        else:
            assert self.router is not None
            route = self.router.route(job.view, self.pool, now)
            assert route.worker is not None
            gpu = self.gpus[int(route.worker[3:])]
            self.enqueue(gpu, job, route.position)
            if self.idle(gpu):
                self.start_next(gpu, now)
            return
        self.enqueue(gpu, job)
        if self.idle(gpu):
            self.start_next(gpu, now)

    def enqueue(self, gpu: Gpu, job: SimJob, position: int | None = None) -> None:
        if gpu.view is not None:
            if position is None:
                position = gpu.view.insert_position(job.view)
            gpu.view.queue.insert(position, job.view)
            gpu.queue.insert(position, job)
        else:
            gpu.queue.append(job)

    def idle(self, gpu: Gpu) -> bool:
        return gpu.running is None and gpu.loading is None

    def start_next(self, gpu: Gpu, now: float) -> None:
        if self.policy == "fifo":
            if not self.fifo:
                return
            job = self.fifo.popleft()
        else:
            if not gpu.queue:
                return
            job = gpu.queue.pop(0)
            if gpu.view is not None:
                gpu.view.queue.pop(0)
        cold = gpu.use(job.model)
        load = self.sc.load_s if cold else 0.0
        self.loads += cold
        job.start = now
        gpu.running = job
        gpu.busy_until = now + load + job.work
        gpu.busy_s += load + job.work
        if gpu.view is not None:
            # The router learns the load time when the job ends (done()), as from a heartbeat.
            gpu.view.running = RunningView(job.view, now, (job.model,) if cold else ())
        self.push(gpu.busy_until, "done", (gpu, job, load))

    def done(self, payload: tuple[Gpu, SimJob, float], now: float) -> None:
        gpu, job, load = payload
        job.finish = now
        gpu.running = None
        view = gpu.view
        if view is not None:
            view.running = None
            view.resident = list(gpu.resident)
            if load:
                view.load_seconds[job.model] = ema(view.load_seconds.get(job.model), load)
            view.job_seconds[job.model] = ema(view.job_seconds.get(job.model), job.work)
        self.start_next(gpu, now)

    def loaded(self, gpu: Gpu, now: float) -> None:
        model = gpu.loading
        assert model is not None and gpu.view is not None
        gpu.loading = None
        gpu.view.loading.pop(model, None)
        gpu.view.resident = list(gpu.resident)
        gpu.view.load_seconds[model] = ema(gpu.view.load_seconds.get(model), self.sc.load_s)
        self.start_next(gpu, now)

    # -- the router's rebalancing round --------------------------------------------------------------

    def tick(self, now: float) -> None:
        assert self.router is not None
        for action in self.router.plan(self.pool, now):
            if isinstance(action, Move):
                source = self.gpus[int(action.source[3:])] if action.source else None
                target = self.gpus[int(action.target[3:])]
                job = self.by_id[action.job.id]
                if source is None or job not in source.queue:
                    continue
                index = source.queue.index(job)
                source.queue.pop(index)
                assert source.view is not None
                source.view.queue.pop(index)
                self.enqueue(target, job)
                if self.idle(target):
                    self.start_next(target, now)
            elif isinstance(action, Preload):
                gpu = self.gpus[int(action.worker[3:])]
                if not self.idle(gpu) or gpu.queue or action.model in gpu.resident:
                    continue
                gpu.use(action.model)
                self.loads += 1
                gpu.loading = action.model
                gpu.busy_s += self.sc.load_s
                assert gpu.view is not None
                gpu.view.loading[action.model] = now + self.sc.load_s
                self.push(now + self.sc.load_s, "loaded", gpu)


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[index]


def simulate(sc: Scenario, policies: tuple[str, ...] = POLICIES, router_policy: RoutingPolicy | None = None):
    jobs = workload(sc)
    results = []
    for policy in policies:
        fresh = [SimJob(j.id, j.model, j.arrival, j.work, j.view) for j in jobs]  # the same arrivals
        results.append(Simulation(sc, policy, router_policy).run(fresh))
    return results


def print_table(title: str, rows: list[tuple[str, Result]]) -> None:
    print(f"\n{title}\n")
    print("| scenario | policy | cold loads | GPU busy | p50 s | p95 s | p99 s | max wait s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, r in rows:
        print(
            f"| {label} | {r.policy} | {r.loads} | {r.busy:.0%} | {r.p50:.1f} | {r.p95:.1f} | "
            f"{r.p99:.1f} | {r.max_wait:.1f} |"
        )


def acceptance(results: list[Result]) -> bool:
    by = {r.policy: r for r in results}
    kiln, fifo = by["kiln"], by["fifo"]
    loads_x = fifo.loads / max(1, kiln.loads)
    p95_x = fifo.p95 / kiln.p95
    wait_x = kiln.max_wait / fifo.max_wait
    ok = loads_x >= 5 and p95_x >= 2 and wait_x <= 3
    print(
        f"\nacceptance: cold loads {loads_x:.1f}x fewer than FIFO (>= 5), p95 {p95_x:.1f}x lower (>= 2), "
        f"max wait {wait_x:.2f}x FIFO's (<= 3): {'PASS' if ok else 'FAIL'}"
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = Scenario()
    for name, value in vars(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--sweep", action="store_true", help="also sweep utilisation and model count")
    args = parser.parse_args(argv)
    sc = Scenario(**{name: getattr(args, name) for name in vars(defaults)})
    print(
        f"{sc.gpus} GPUs, {sc.models} models (Zipf s={sc.zipf}), {sc.slots} resident per GPU, "
        f"{sc.load_s:g} s loads, {sc.job_s:g} s +- {sc.job_spread:.0%} jobs, {sc.util:.0%} utilisation, "
        f"{sc.jobs} jobs, seed {sc.seed}"
    )
    results = simulate(sc)
    print_table("Acceptance scenario", [("base", r) for r in results])
    ok = acceptance(results)
    if args.sweep:
        rows = []
        for util in (0.3, 0.5, 0.7, 0.85, 0.95):
            point = Scenario(**{**vars(sc), "util": util})
            rows += [(f"util {util:.0%}", r) for r in simulate(point)]
        print_table(f"Utilisation sweep ({sc.models} models)", rows)
        rows = []
        for models in (5, 10, 20, 50, 100):
            point = Scenario(**{**vars(sc), "models": models})
            rows += [(f"{models} models", r) for r in simulate(point)]
        print_table(f"Model-count sweep ({sc.util:.0%} utilisation)", rows)
        rows = []
        for slots in (1, 2, 4):
            point = Scenario(**{**vars(sc), "slots": slots})
            rows += [(f"{slots} resident", r) for r in simulate(point)]
        print_table(f"Models resident per GPU ({sc.models} models, {sc.util:.0%} utilisation)", rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

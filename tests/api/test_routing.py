"""Model-affinity routing: the router's decisions (pure), the gateway's routing service and the
scripts that move task messages (real Redis), the heartbeat's routing fields, and /metrics."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

import api.routing
from api.routing import (
    Estimates,
    JobView,
    Move,
    PoolView,
    Preload,
    Router,
    RoutingPolicy,
    RoutingService,
    RoutingSettings,
    RunningView,
    Timelines,
    WorkerView,
    _advance,
    priority_step,
    timeline,
    touch,
)
from api.submit import models_needed
from engine.registry import default_registry
from engine.settings import EngineSettings
from engine.validation import validate_prompt
from tests.api.conftest import AUTH_A
from worker import lua
from worker.celery_wire import redis_list_for, task_message
from worker.heartbeat import Heartbeat, WorkerStats, parse_nvidia_smi
from worker.jobstore import JobStore
from worker.protocol import (
    DEFAULT_QUEUE,
    KOMBU_UNACKED,
    KOMBU_UNACKED_INDEX,
    JobRecord,
    JobStatus,
    Keys,
    worker_queue,
)
from worker.settings import WorkerSettings

A = "checkpoints/a.safetensors"
B = "checkpoints/b.safetensors"
C = "checkpoints/c.safetensors"
NOW = 10_000.0
POLICY = RoutingPolicy(default_job_s=2.0, default_load_s=8.0)


def job(job_id: str, *models: str, priority: int = 5, age: float = 0.0, **pins: str) -> JobView:
    return JobView(id=job_id, models=models, priority=priority, created_at=NOW - age, **pins)


def worker(
    worker_id: str, resident: tuple[str, ...] = (), queue: tuple[JobView, ...] = (), **kw: Any
) -> WorkerView:
    return WorkerView(
        id=worker_id,
        resident=list(resident),
        queue=list(queue),
        job_seconds={A: 2.0, B: 2.0, C: 2.0},
        load_seconds={A: 8.0, B: 8.0, C: 8.0},
        **kw,
    )


def pool(*workers: WorkerView, shared: tuple[JobView, ...] = ()) -> PoolView:
    return PoolView({w.id: w for w in workers}, list(shared))


# -- routing one job --------------------------------------------------------------------------------


def test_a_job_goes_where_its_model_is_resident():
    route = Router(POLICY).route(job("j", A), pool(worker("w1", (B,)), worker("w2", (A,))), NOW)
    assert (route.worker, route.reason, route.cold_models) == ("w2", "warm", ())
    assert route.expected_finish == pytest.approx(NOW + 2.0)


def test_a_long_warm_backlog_loses_to_a_cold_load_elsewhere():
    backlog = tuple(job(f"q{i}", A) for i in range(6))  # 12 s of work > 8 s load + 2 s job
    route = Router(POLICY).route(job("j", A), pool(worker("w1", (A,), backlog), worker("w2", ())), NOW)
    assert (route.worker, route.reason, route.cold_models) == ("w2", "cold", (A,))
    short = tuple(job(f"q{i}", A) for i in range(3))  # 6 s < 10 s
    route = Router(POLICY).route(job("j", A), pool(worker("w1", (A,), short), worker("w2", ())), NOW)
    assert route.worker == "w1"


def test_the_running_job_counts_in_the_expected_finish():
    busy = worker("w1", (A,), running=RunningView(job("r", A), started_at=NOW - 0.5))
    route = Router(POLICY).route(job("j", A), pool(busy), NOW)
    assert route.expected_finish == pytest.approx(NOW + 1.5 + 2.0)
    cold_running = worker("w1", (), running=RunningView(job("r", A), started_at=NOW, cold=(A,)))
    assert Router(POLICY).route(job("j", A), pool(cold_running), NOW).expected_finish == pytest.approx(
        NOW + 12.0
    )


def test_a_job_joins_the_batch_of_its_model_instead_of_reloading_it():
    # w1 will run A then B (slots=1: B evicts A). A new A job goes right after the queued A job,
    # ahead of the B job, instead of after B (which would load A a second time).
    queue = (job("a1", A, age=1.0), job("b1", B, age=1.0))
    w1 = worker("w1", (A,), queue, slots=1, running=RunningView(job("r", A), started_at=NOW))
    w2 = worker("w2", (C,), tuple(job(f"c{i}", C) for i in range(10)), slots=1)
    route = Router(POLICY).route(job("a2", A), pool(w1, w2), NOW)
    assert (route.worker, route.position, route.after, route.back) == ("w1", 1, "a1", False)
    assert route.reason == "warm"


def test_bounded_unfairness_no_overtaking_a_job_older_than_the_limit():
    queue = (job("a1", A, age=70.0), job("b1", B, age=61.0))  # b1 waited past overtake_age_s=60
    w1 = worker("w1", (A,), queue, slots=1, running=RunningView(job("r", A), started_at=NOW))
    route = Router(POLICY).route(job("a2", A), pool(w1), NOW)
    assert route.position == 2 and route.back  # behind b1, at the cost of a reload
    assert route.cold_models == (A,)


def test_priorities_a_more_urgent_job_runs_before_less_urgent_ones_never_before_more_urgent():
    queue = (job("u", A, priority=9), job("n1", B), job("n2", B), job("low", B, priority=0))
    assert [j.step for j in queue] == [0, 3, 3, 9]
    w1 = worker("w1", (A, B), queue)
    urgent = Router(POLICY).route(job("x", C, priority=8), pool(w1), NOW)
    assert urgent.position == 1  # after the priority-9 job, before the normal ones
    normal = Router(POLICY).route(job("y", C), pool(w1), NOW)
    assert normal.position == 3  # after both normal jobs, before the low one
    assert priority_step(9) == 0 and priority_step(5) == 3 and priority_step(0) == 9


def test_pins_and_allow_lists():
    w1 = worker("w1", (A,), gpu_class="nvidia-a10g")
    w2 = worker("w2", (), gpu_class="nvidia-h100-80gb-hbm3", allow=("checkpoints/b*", "checkpoints/c*"))
    router = Router(POLICY)
    assert router.route(job("j", A, pin_worker="w2"), pool(w1, worker("w2")), NOW).worker == "w2"
    assert router.route(job("j", A, pin_worker="w2"), pool(w1, worker("w2")), NOW).reason == "pinned"
    assert router.route(job("j", B, pin_gpu_class="H100"), pool(w1, w2), NOW).worker == "w2"
    # w2 may not load A: a job for A pinned to H100s has no eligible worker.
    assert router.route(job("j", A, pin_gpu_class="h100"), pool(w1, w2), NOW).reason == "no_eligible"
    assert router.route(job("j", A, pin_worker="gone"), pool(w1, w2), NOW).reason == "no_eligible"
    assert router.route(job("j", C), pool(w1, w2), NOW).worker in {"w1", "w2"}


def test_no_live_worker_means_the_shared_queue_unless_the_job_is_pinned():
    dead = WorkerView(id="w1", live=False)
    assert Router(POLICY).route(job("j", A), pool(dead), NOW).reason == "no_workers"
    assert Router(POLICY).route(job("j", A), pool(), NOW).worker is None
    assert Router(POLICY).route(job("j", A, pin_worker="w1"), pool(dead), NOW).reason == "no_eligible"


def test_a_cold_load_evicts_the_least_wanted_model():
    router = Router(POLICY)
    for i in range(30):  # A is in demand, B is not
        router.demand.record([A], NOW - i)
    route = router.route(job("j", C), pool(worker("w1", (A,), slots=1), worker("w2", (B,), slots=1)), NOW)
    assert route.worker == "w2"


# -- rebalancing --------------------------------------------------------------------------------------


def test_plan_reaps_a_dead_workers_queue_but_leaves_jobs_pinned_to_it():
    dead = WorkerView(
        id="dead", live=False, queue=[job("j1", A), job("j2", B), job("p", A, pin_worker="dead")]
    )
    live_a, live_b = worker("wa", (A,)), worker("wb", (B,))
    actions = Router(POLICY).plan(pool(dead, live_a, live_b), NOW)
    moves = {a.job.id: (a.source, a.target, a.reason) for a in actions if isinstance(a, Move)}
    assert moves == {"j1": ("dead", "wa", "reap"), "j2": ("dead", "wb", "reap")}


def test_plan_routes_the_shared_queue_once_workers_are_up():
    actions = Router(POLICY).plan(pool(worker("w1", (A,)), shared=(job("s", A),)), NOW)
    assert actions == [Move(job("s", A), None, "w1", "shared")]


def test_an_idle_worker_steals_when_the_job_finishes_sooner_there():
    backlog = tuple(job(f"q{i}", A) for i in range(8))
    busy = worker("w1", (A,), backlog, running=RunningView(job("r", A), started_at=NOW))
    idle = worker("w2", (A,))
    steals = [a for a in Router(POLICY).plan(pool(busy, idle), NOW) if isinstance(a, Move)]
    assert steals == [Move(backlog[-1], "w1", "w2", "steal")]  # the one that would finish last
    # A cold idle worker steals only when the gain beats the load.
    cold_idle = worker("w2", (B,))
    short = worker("w1", (A,), backlog[:4], running=RunningView(job("r", A), started_at=NOW))
    assert not [a for a in Router(POLICY).plan(pool(short, cold_idle), NOW) if isinstance(a, Move)]
    steals = [a for a in Router(POLICY).plan(pool(busy, cold_idle), NOW) if isinstance(a, Move)]
    assert [m.job.id for m in steals] == ["q7"]


def test_stealing_never_moves_a_job_pinned_to_its_worker_and_takes_urgent_jobs_first():
    backlog = (job("n", A), job("n2", A), job("p", A, pin_worker="w1"), job("u", A, priority=9), job("n3", A))
    busy = worker("w1", (A,), backlog, running=RunningView(job("r", A), started_at=NOW))
    steals = [a for a in Router(POLICY).plan(pool(busy, worker("w2", (A,))), NOW) if isinstance(a, Move)]
    assert [m.job.id for m in steals] == ["u"]


def test_preloads_for_pinned_models_and_growing_backlogs():
    idle = worker("w2", (), pinned=frozenset({B}))
    assert Preload("w2", B, "pinned") in Router(POLICY).plan(pool(worker("w1", (A,)), idle), NOW)
    requested = worker("w2", (), pinned=frozenset({B}), preload_requested=frozenset({B}))
    assert not [
        a for a in Router(POLICY).plan(pool(worker("w1", (A,)), requested), NOW) if isinstance(a, Preload)
    ]
    # A's backlog is long on w1 (and stays there: pinned), so a new A job would wait: preload A on w3.
    backlog = tuple(job(f"q{i}", A, pin_worker="w1") for i in range(10))
    busy = worker("w1", (A,), backlog, running=RunningView(job("r", A), started_at=NOW))
    actions = Router(POLICY).plan(pool(busy, worker("w3", (C,))), NOW)
    assert Preload("w3", A, "backlog") in actions


def test_kept_timelines_match_timelines_computed_afresh():
    """Routing on one snapshot keeps each worker's timeline and re-runs only what changed; after
    any sequence of inserts and removals it must say what a fresh computation says."""
    rng = random.Random(7)
    models = (A, B, C)
    w = worker("w", resident=(A,), slots=2, running=RunningView(job("r", B), started_at=NOW - 1.0))
    est = Estimates(pool(w), POLICY)
    kept = Timelines()
    for step in range(600):
        now = NOW + step * 0.01
        roll = rng.random()
        if w.queue and roll < 0.3:
            w.queue.pop(rng.randrange(len(w.queue)))
        elif w.queue and roll < 0.6:  # batched: the newest job, right after one like it
            at = rng.randrange(len(w.queue))
            like = w.queue[at]
            w.queue.insert(at + 1, JobView(f"j{step}", like.models, like.priority, now, like.pin_worker))
        else:
            new = job(
                f"j{step}",
                *rng.sample(models, rng.randint(0, 2)),
                priority=rng.choice((2, 5, 8)),
                age=rng.uniform(0.0, 90.0),
            )
            w.queue.insert(rng.randint(0, len(w.queue)), new)
        got, want = kept.timeline(w, now, est), timeline(w, now, est)
        assert got.start == want.start and got.resident == want.resident
        assert got.resident_before == want.resident_before
        assert got.finishes == pytest.approx(want.finishes) and got.free_at == pytest.approx(want.free_at)
        # The indexes kept with it (models, groups, the older-jobs chain) as if built afresh; times
        # shifted rather than summed again agree to rounding.
        got_run = vars(kept.run(w, now, est)[1]).copy()
        want_run = vars(Timelines().run(w, now, est)[1]).copy()
        sums = [(r.pop("seconds_to"), r.pop("created_sum"), r.pop("ref")) for r in (got_run, want_run)]
        assert got_run == want_run
        assert sums[0][0] == pytest.approx(sums[1][0])
        created = [[c + ref * i for i, c in enumerate(column)] for _, column, ref in sums]
        assert created[0] == pytest.approx(created[1])


# -- deep queues: the decisions of a walk over the queue, at a cost that does not grow with it ----------


def reference_placement(
    router: Router, w: WorkerView, new: JobView, now: float, est: Estimates, pressure: float
) -> dict[int, float]:
    """Score of every place the router tried before deep queues were indexed: after each job of the
    new job's models in the overtaking window (and first, when they are resident then), each scored
    by running the whole queue behind it again."""
    policy, queue = router.policy, w.queue
    end = w.insert_position(new)
    base = timeline(w, now, est)
    positions = {end}
    if new.models:
        limit = end
        while (
            limit > 0
            and queue[limit - 1].step == new.step
            and now - queue[limit - 1].created_at < policy.overtake_age_s
        ):
            limit -= 1
        positions |= {i + 1 for i in range(limit, end) if any(m in queue[i].models for m in new.models)}
        if limit < end and all(m in base.resident_before[limit] for m in new.models):
            positions.add(limit)
    scores = {}
    copies = router._copies([w])
    for position in sorted(positions):
        t0 = base.finishes[position - 1] if position > 0 else base.start
        resident = base.resident_before[position] if position < len(queue) else base.resident
        line = _advance(w, t0, resident, [new, *queue[position:]], est)
        delay = 0.0
        for i in range(position, len(queue)):
            age = max(0.0, now - queue[i].created_at)
            delay += (line.finishes[i - position + 1] - base.finishes[i]) * (1.0 + age / policy.age_tau_s)
        after = touch(resident, new.models, w.slots, w.pinned)
        penalty = router._eviction_cost([m for m in resident if m not in after], w, copies, now, est)
        loads = sum(est.load_s(w, m) for m in new.models if m not in resident)
        scores[position] = (line.finishes[0] - now) + delay + policy.eviction_weight * penalty
        scores[position] += (penalty + loads) * pressure
    return scores


def reference_steals(router: Router, pool: PoolView, now: float) -> list[tuple[str, str, str]]:
    """The steals as plan() found them before: every queued job of every victim looked at."""
    policy, est, live = router.policy, Estimates(pool, router.policy), pool.live()
    lines = {w.id: timeline(w, now, est) for w in live}
    copies = router._copies(live)
    pressure = policy.load_pressure_weight * router._pressure(live, now, est)
    moves = []
    for thief in sorted(live, key=lambda w: (lines[w.id].free_at, w.id)):
        mine = lines[thief.id]
        if mine.free_at > now + policy.steal_horizon_s:
            continue
        start = max(now, mine.free_at)
        best = None
        for victim in live:
            for index, queued in enumerate(victim.queue if victim is not thief else ()):
                if queued.pin_worker is not None or not thief.can_run(queued):
                    continue
                cold = [m for m in queued.models if m not in mine.resident]
                loads = sum(est.load_s(thief, m) for m in cold)
                gain = lines[victim.id].finishes[index] - (start + loads + est.job_s(thief, queued))
                if gain < policy.steal_min_gain_s:
                    continue
                if cold:
                    after = touch(mine.resident, queued.models, thief.slots, thief.pinned)
                    evicted = [m for m in mine.resident if m not in after]
                    penalty = router._eviction_cost(evicted, thief, copies, now, est)
                    cost = policy.eviction_weight * penalty + (penalty + loads) * pressure
                    if gain < policy.steal_load_ratio * loads + cost:
                        continue
                if best is None or (float(queued.step), -gain) < best[0]:
                    best = ((float(queued.step), -gain), victim, index)
        if best is not None:
            _, victim, index = best
            stolen = victim.queue.pop(index)
            thief.queue.insert(thief.insert_position(stolen), stolen)
            moves.append((stolen.id, victim.id, thief.id))
            lines[victim.id], lines[thief.id] = timeline(victim, now, est), timeline(thief, now, est)
    return moves


MODELS = (A, B, C, "loras/d.safetensors")


def random_worker(rng: random.Random, worker_id: str, depth: int) -> WorkerView:
    slots = rng.choice((None, 1, 2, 3))
    resident = rng.sample(MODELS, rng.randint(0, min(3, slots or 3)))
    queue: list[JobView] = []
    for i in range(depth):
        created = NOW - rng.uniform(0.0, 120.0) if rng.random() > 0.03 else NOW + rng.random()
        if queue and rng.random() < 0.5:  # like the one before: stretches of one model
            last = queue[-1]
            queue.append(JobView(f"{worker_id}-{i}", last.models, last.priority, created, last.pin_worker))
        elif rng.random() < 0.05:
            queue.append(JobView(f"{worker_id}-{i}", stale=True, created_at=created))
        else:
            models = tuple(sorted(rng.sample(MODELS, rng.choice((0, 1, 1, 1, 2)))))
            pin = "elsewhere" if rng.random() < 0.05 else None
            queue.append(JobView(f"{worker_id}-{i}", models, rng.choice((2, 5, 5, 8)), created, pin))
    if rng.random() < 0.9:
        queue.sort(key=lambda j: j.step)  # run order (kombu's priority lists), else any order
    running = None
    if rng.random() < 0.6:
        running = RunningView(job("r", rng.choice(MODELS)), started_at=NOW - rng.uniform(0, 3))
    return WorkerView(
        id=worker_id,
        resident=resident,
        slots=slots,
        pinned=frozenset(resident[:1]) if resident and rng.random() < 0.2 else frozenset(),
        running=running,
        queue=queue,
        job_seconds={m: rng.uniform(0.5, 4.0) for m in MODELS},
        load_seconds={m: rng.uniform(2.0, 12.0) for m in MODELS},
    )


def test_placements_match_a_walk_over_the_whole_queue():
    """Indexes, skipped stretches and settled timelines change no decision: the same place, the
    same score as trying every place and running the whole queue behind each (bounds lifted)."""
    rng = random.Random(11)
    router = Router(replace(POLICY, batch_places=10**6, settle_jobs=10**6))
    for demand in rng.choices(MODELS, k=40):
        router.demand.record([demand], NOW - rng.uniform(0, 60))
    for case in range(400):
        w = random_worker(rng, "w", rng.randint(0, 40))
        new = job("new", *sorted(rng.sample(MODELS, rng.choice((1, 1, 2)))), priority=rng.choice((2, 5, 8)))
        est, pressure = Estimates(pool(w), router.policy), rng.choice((0.0, 0.7, 4.0))
        got = router._best_placement(w, new, NOW, est, router._copies([w]), True, pressure, Timelines())
        scores = reference_placement(router, w, new, NOW, est, pressure)
        best = min(scores, key=lambda p: (scores[p], p))
        assert got.score == pytest.approx(scores[best], rel=1e-9, abs=1e-9), case
        # The same place, or one the walk scores the same (a tie broken by rounding).
        assert got.position == best or scores[got.position] == pytest.approx(scores[best], abs=1e-9), case


def test_steals_match_a_walk_over_every_queued_job():
    rng = random.Random(5)
    router = Router(POLICY)
    steals = 0
    for case in range(300):
        workers = [random_worker(rng, f"w{i}", rng.randint(0, 30)) for i in range(rng.randint(2, 4))]
        for w in workers[: rng.randint(1, 2)]:  # soon idle
            w.queue.clear()
            w.running = None if rng.random() < 0.7 else RunningView(job("r", A), started_at=NOW - 1.9)
        view = pool(*workers)
        want = reference_steals(router, view.copy(), NOW)
        mine = view.copy()
        moves = router._steals(mine, mine.live(), NOW, Estimates(mine, router.policy))
        assert [(m.job.id, m.source, m.target) for m in moves] == want, case
        steals += len(want)
    assert steals > 50


def test_kept_timelines_give_the_decisions_of_fresh_ones():
    """The gateway routes on a snapshot with its timelines kept between decisions; the simulation
    computes them afresh each time. Both must decide alike through routing, claims and rounds."""
    rng = random.Random(3)
    workers = [random_worker(rng, f"w{i}", rng.randint(0, 30)) for i in range(3)]
    kept_pool, fresh_pool = pool(*workers), pool(*workers).copy()
    kept_router, fresh_router, kept = Router(POLICY), Router(POLICY), Timelines()
    for step in range(300):
        now = NOW + step * 0.05
        roll = rng.random()
        if roll < 0.1:  # a worker takes the job at the front of its queue
            w = rng.choice(list(kept_pool.workers))
            if kept_pool.workers[w].queue:
                kept_pool.workers[w].queue.pop(0)
                fresh_pool.workers[w].queue.pop(0)
            continue
        if roll < 0.2:
            got, want = kept_router.plan(kept_pool, now, kept), fresh_router.plan(fresh_pool, now)
            assert got == want, step
            continue
        models = sorted(rng.sample(MODELS, rng.choice((1, 1, 2))))
        new = JobView(f"n{step}", tuple(models), rng.choice((2, 5, 8)), now - rng.uniform(0, 2))
        got, want = kept_router.route(new, kept_pool, now, kept), fresh_router.route(new, fresh_pool, now)
        assert got == want, step
        kept_pool.workers[got.worker].queue.insert(got.position, new)
        fresh_pool.workers[want.worker].queue.insert(want.position, new)


def one_model_backlog(depth: int, idle: bool = False, stretch: int = 0) -> PoolView:
    """Two busy workers with ``depth`` queued jobs of model A between them, all younger than
    overtake_age_s (a burst), and optionally an idle worker that holds nothing. ``stretch``: every
    that many jobs, one of model B (the A jobs then form that many stretches)."""
    workers = []
    for w in range(2):
        queue = []
        for i in range(depth // 2):
            models = (B,) if stretch and i % stretch == stretch - 1 else (A,)
            queue.append(JobView(f"w{w}-{i}", models, created_at=NOW - 30.0 + 30.0 * i / max(1, depth)))
        busy = RunningView(job(f"r{w}", A), started_at=NOW - 1.0)
        workers.append(worker(f"w{w}", (A,), tuple(queue), slots=1, running=busy))
    if idle:
        workers.append(worker("idle", (), slots=1))
    return pool(*workers)


def counting(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, limit: int) -> dict[str, int]:
    """Count calls of ``owner.name``; more than ``limit`` fails at once (a quadratic walk over a deep
    queue would otherwise run for minutes before failing)."""
    calls = {"n": 0}
    original = getattr(owner, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        assert calls["n"] <= limit, f"{name} called more than {limit} times"
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.mark.parametrize("depth", [50, 5000])
def test_routing_into_a_deep_one_model_backlog_costs_what_it_costs_into_a_short_one(monkeypatch, depth):
    """A burst of one model: each new job may batch after any of thousands of young jobs of its
    model. Scoring each of those places by running the queue behind it cost ~depth^2 / 2 job
    costs per decision; now a decision costs a few, whatever the depth."""
    backlog = one_model_backlog(depth)
    router, kept = Router(POLICY), Timelines()
    router.route(job("first", A), backlog, NOW, kept)  # the first decision on a snapshot runs the queues
    # Per decision: the job's cost at each place tried (after the last A job, and the end of each
    # worker's queue: the same place), and the new job added to the kept timeline.
    costs = counting(monkeypatch, api.routing, "_cost", 50 * 6)
    places = counting(monkeypatch, Router, "_place_at", 50 * 2 * 2)
    for i in range(50):
        now = NOW + 0.01 * i
        new = JobView(f"n{i}", (A,), created_at=now)
        route = router.route(new, backlog, now, kept)
        assert route.back  # behind every queued A job: each waited longer than it will
        backlog.workers[route.worker].queue.insert(route.position, new)
    assert costs["n"] >= 50 and places["n"] >= 50


def test_batch_places_are_bounded_when_a_model_is_spread_over_many_stretches(monkeypatch):
    backlog = one_model_backlog(5000, stretch=2)  # A B A B ...: 1,250 stretches of A per worker
    router, kept = Router(POLICY), Timelines()
    router.route(job("first", A), backlog, NOW, kept)
    # At most batch_places stretches back, plus the end and the front of the window, per worker; each
    # place settles within a few jobs (the B job behind it loads B either way).
    places = counting(monkeypatch, Router, "_place_at", 2 * (POLICY.batch_places + 2))
    costs = counting(monkeypatch, api.routing, "_cost", 2 * (POLICY.batch_places + 2) * 4)
    route = router.route(job("new", A), backlog, NOW + 0.01, kept)
    assert route.worker is not None and places["n"] > POLICY.batch_places and costs["n"] > 0


def test_the_steal_search_does_not_look_at_every_queued_job(monkeypatch):
    backlog = one_model_backlog(5000, idle=True)
    router, kept = Router(POLICY), Timelines()
    router.plan(backlog, NOW, kept)  # runs the queues once
    # A thief looks at one group of like jobs per victim, not at 5,000 jobs.
    checks = counting(monkeypatch, WorkerView, "can_run", 10)
    counting(monkeypatch, api.routing, "_cost", 10)  # the kept timelines: no job re-run
    actions = router.plan(backlog, NOW + 0.01, kept)
    steals = [a for a in actions if isinstance(a, Move)]
    # The job that would finish last (the end of the longer queue, w0's on a tie) moves.
    assert [(m.job.id, m.source, m.target) for m in steals] == [("w0-2499", "w0", "idle")]
    assert checks["n"] >= 1


def test_the_simulation_drives_this_router():
    from bench.routing_sim import Scenario, simulate

    results = {r.policy: r for r in simulate(Scenario(jobs=400, util=0.5, seed=3))}
    assert results["kiln"].loads * 3 < results["fifo"].loads
    assert results["kiln"].p95 < results["fifo"].p95


# -- models a prompt needs ------------------------------------------------------------------------------


def test_models_needed_come_from_model_combos(tmp_path: Path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "x.safetensors").write_bytes(b"x")
    registry = default_registry(["tests.e2e.affinity_nodes"])
    from engine.inventory import StaticInventory

    inventory = StaticInventory({"models:checkpoints": ["x.safetensors"]})
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
        "2": {"class_type": "TestModelProbe", "inputs": {"model": ["1", 0], "seconds": 0.1}},
    }
    validated = validate_prompt(prompt, registry, inventory, EngineSettings().validation_limits())
    assert models_needed(validated, registry) == ["checkpoints/x.safetensors"]


# -- Redis: moving task messages --------------------------------------------------------------------------


def message_ids(client: redis.Redis, key: str) -> list[str]:
    """Job ids of a list's messages, in the order a worker takes them."""
    return [json.loads(m)["headers"]["id"] for m in reversed(client.lrange(key, 0, -1))]


def test_move_job_is_atomic_and_moves_a_message_once(redis_client: redis.Redis):
    source, target = worker_queue("a"), worker_queue("b")
    for job_id in ("j1", "j2", "j3"):
        redis_client.lpush(source, task_message(job_id, source))
    redis_client.hset(Keys.job("j2"), "id", "j2")
    move = redis_client.register_script(lua.MOVE_JOB)
    results: list[int] = []
    barrier = threading.Barrier(8)

    def race() -> None:
        barrier.wait()
        results.append(int(move(keys=[source, target, Keys.job("j2")], args=["j2", "", target, "back", ""])))

    threads = [threading.Thread(target=race) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [0] * 7 + [1]
    assert message_ids(redis_client, source) == ["j1", "j3"]
    assert message_ids(redis_client, target) == ["j2"]
    assert redis_client.hget(Keys.job("j2"), "queue") == target.encode()
    # A job whose record is gone gets no partial record.
    assert move(keys=[source, target, Keys.job("j1")], args=["j1", "", target, "back", ""]) == 1
    assert not redis_client.exists(Keys.job("j1"))


def test_move_job_places_after_a_pivot_or_first(redis_client: redis.Redis):
    queue = worker_queue("a")
    for job_id in ("a1", "b1", "b2", "new"):
        redis_client.lpush(queue, task_message(job_id, queue))
    move = redis_client.register_script(lua.MOVE_JOB)
    assert move(keys=[queue, queue, Keys.job("new")], args=["new", "", queue, "after", "a1"]) == 1
    assert message_ids(redis_client, queue) == ["a1", "new", "b1", "b2"]
    assert move(keys=[queue, queue, Keys.job("b2")], args=["b2", "", queue, "front", ""]) == 1
    assert message_ids(redis_client, queue) == ["b2", "a1", "new", "b1"]
    # The pivot was taken by the worker meanwhile: the job stays last.
    assert move(keys=[queue, queue, Keys.job("a1")], args=["a1", "", queue, "after", "gone"]) == 1
    assert message_ids(redis_client, queue) == ["b2", "new", "b1", "a1"]
    assert move(keys=[queue, queue, Keys.job("x")], args=["x", "", queue, "back", ""]) == 0


# -- Redis: the gateway's routing service -----------------------------------------------------------------


def heartbeat(client: redis.Redis, worker_id: str, ttl: int = 30, **fields: Any) -> None:
    beat = {"id": worker_id, "time": time.time(), "resident": [], "job_seconds": {}, "load_seconds": {}}
    beat.update(fields)
    client.set(Keys.worker(worker_id), json.dumps(beat), ex=ttl)
    client.sadd(Keys.workers(), worker_id)


def queued_record(client: redis.Redis, job_id: str, queue: str, models: list[str], **extra: Any) -> None:
    record = JobRecord(
        id=job_id,
        tenant="t",
        status=JobStatus.QUEUED,
        number=1,
        priority=5,
        prompt={},
        models=models,
        **extra,
    )
    # What CREATE_JOB writes: the record, its place in the pending set, its task message.
    client.hset(Keys.job(job_id), mapping=record.to_redis())
    client.zadd(Keys.pending(), {job_id: lua.priority_base(record.priority) * 1e12 + record.number})
    client.lpush(redis_list_for(queue, record.priority), task_message(job_id, queue, record.priority))


def run_service(redis_url: str, body: Any, **settings: Any) -> Any:
    async def main() -> Any:
        client = aioredis.from_url(redis_url)
        try:
            service = RoutingService(client, RoutingSettings(**settings))
            return await body(service)
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_the_reaper_moves_a_dead_workers_queue_and_redelivers_its_running_job(redis_client, redis_server):
    dead, live = worker_queue("dead"), worker_queue("live")
    heartbeat(redis_client, "live", resident=[{"name": A, "hash": "h"}])
    redis_client.zadd(Keys.worker_queues(), {dead: time.time(), live: time.time()})
    queued_record(redis_client, "q1", dead, [A])
    queued_record(redis_client, "q2", dead, [B], pin={"worker": "dead"})
    # "r" was running on the dead worker: its message sits in kombu's unacked hash.
    record = JobRecord(id="r", tenant="t", status=JobStatus.RUNNING, number=2, prompt={}, worker="dead")
    redis_client.hset(Keys.job("r"), mapping=record.to_redis())
    redis_client.sadd(Keys.running(), "r")
    message = json.loads(task_message("r", dead))
    redis_client.hset(KOMBU_UNACKED, "tag-r", json.dumps([message, "", dead]))
    redis_client.zadd(KOMBU_UNACKED_INDEX, {"tag-r": time.time()})

    async def body(service: RoutingService) -> list[Any]:
        return await service.tick()

    applied = run_service(redis_server.url, body, orphan_grace_s=0)
    assert {(a.job.id, a.reason) for a in applied} == {("q1", "reap"), ("r", "reap")}
    assert sorted(message_ids(redis_client, redis_list_for(live, 5))) == ["q1", "r"]
    assert message_ids(redis_client, redis_list_for(dead, 5)) == ["q2"]  # pinned: waits for its worker
    assert not redis_client.hexists(KOMBU_UNACKED, "tag-r")
    assert redis_client.hget(Keys.job("q1"), "queue") == live.encode()


def test_idle_workers_steal_through_the_service(redis_client, redis_server):
    busy, idle = worker_queue("busy"), worker_queue("idle")
    heartbeat(
        redis_client,
        "busy",
        resident=[{"name": A}],
        running_job="r",
        running_models=[A],
        running_since=time.time(),
        job_seconds={A: 5.0},
        load_seconds={A: 1.0},
    )
    heartbeat(redis_client, "idle", job_seconds={A: 5.0}, load_seconds={A: 1.0})
    for i in range(4):
        queued_record(redis_client, f"q{i}", busy, [A])

    async def body(service: RoutingService) -> list[Any]:
        return await service.tick()

    applied = run_service(redis_server.url, body)
    assert [(a.job.id, a.reason) for a in applied] == [("q3", "steal")]
    assert message_ids(redis_client, redis_list_for(idle, 5)) == ["q3"]


def command_calls(client: redis.Redis, command: str) -> int:
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_a_snapshot_reads_each_queued_job_once_and_sees_it_leave(redis_client, redis_server):
    heartbeat(redis_client, "w", job_seconds={A: 1.0})
    queue = worker_queue("w")
    for i in range(50):
        queued_record(redis_client, f"q{i}", queue, [A])
    queued_record(redis_client, "other", worker_queue("gone"), [B])  # a dead worker's queue
    redis_client.zadd(Keys.worker_queues(), {worker_queue("gone"): time.time()})
    cancel = redis_client.register_script(lua.CANCEL_JOB)

    async def body(service: RoutingService) -> tuple[Any, Any, int, int]:
        redis_client.config_resetstat()
        first = await service.snapshot()
        reads = command_calls(redis_client, "hmget")
        cancel(
            keys=[Keys.job("q0"), Keys.pending(), Keys.running(), Keys.tenant_active("t"), Keys.webhooks()],
            args=[1, 60, "{}", ""],
        )
        assert JobStore(redis_client).claim("q1", "w") == "queued"
        second = await service.snapshot()
        return first, second, reads, command_calls(redis_client, "hmget") - reads

    first, second, reads, rereads = run_service(redis_server.url, body)
    assert reads == 51 and rereads == 0  # what routing reads of a job never changes
    assert [(j.id, j.models, j.stale) for j in first.pool.workers["w"].queue[:2]] == [
        ("q0", (A,), False),
        ("q1", (A,), False),
    ]
    # Cancelled, or claimed by a worker: stale (runs in no time), the others unchanged.
    assert [(j.id, j.stale) for j in second.pool.workers["w"].queue[:3]] == [
        ("q0", True),
        ("q1", True),
        ("q2", False),
    ]
    assert [j.models for j in second.pool.workers["gone"].queue] == [(B,)]


def test_without_live_workers_a_snapshot_reads_queue_depths_only(redis_client, redis_server):
    for i in range(20):
        queued_record(redis_client, f"s{i}", DEFAULT_QUEUE, [A])
    heartbeat(redis_client, "dead", ttl=1)
    redis_client.delete(Keys.worker("dead"))  # its heartbeat expired

    async def body(service: RoutingService) -> Any:
        redis_client.config_resetstat()
        return await service.snapshot()

    snapshot = run_service(redis_server.url, body)
    assert snapshot.depths[DEFAULT_QUEUE] == 20 and snapshot.pool.shared == []
    assert snapshot.pool.live() == [] and "dead" in snapshot.pool.workers
    assert command_calls(redis_client, "lrange") == 0 and command_calls(redis_client, "hmget") == 0


def test_submissions_are_routed_to_worker_queues(make_client, redis_client, tmp_path, monkeypatch):
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    for name in ("a", "b"):
        (models / "checkpoints" / f"{name}.safetensors").write_bytes(name.encode())
    heartbeat(
        redis_client, "w1", resident=[{"name": A, "hash": "ha"}], job_seconds={A: 1.0}, load_seconds={A: 5.0}
    )
    heartbeat(
        redis_client, "w2", resident=[{"name": B, "hash": "hb"}], job_seconds={B: 1.0}, load_seconds={B: 5.0}
    )
    monkeypatch.setenv("KILN_REBALANCE_INTERVAL_S", "0")  # only routing moves messages here
    client = make_client(EngineSettings(node_modules=["tests.e2e.affinity_nodes"], models_dirs=[models]))

    def submit(name: str, **extra: Any) -> Any:
        prompt = {
            "1": {
                "class_type": "CheckpointLoaderSimple",
                "inputs": {"ckpt_name": f"{name}.safetensors"},
            },
            "2": {"class_type": "TestModelProbe", "inputs": {"model": ["1", 0], "seconds": 0.1}},
        }
        return client.post("/v1/jobs", json={"prompt": prompt, **extra}, headers=AUTH_A)

    ids = [submit(name).json()["id"] for name in "abab"]
    assert message_ids(redis_client, redis_list_for(worker_queue("w1"), 5)) == [ids[0], ids[2]]
    assert message_ids(redis_client, redis_list_for(worker_queue("w2"), 5)) == [ids[1], ids[3]]
    stored = redis_client.hgetall(Keys.job(ids[0]))
    assert json.loads(stored[b"models"]) == [A] and stored[b"queue"] == worker_queue("w1").encode()
    # Pinned to w2 although A is resident on w1; pinned to an unknown worker: 503.
    pinned = submit("a", extra_data={"kiln": {"worker": "w2"}}).json()["id"]
    assert message_ids(redis_client, redis_list_for(worker_queue("w2"), 5))[-1] == pinned
    refused = submit("a", extra_data={"kiln": {"worker": "nope"}})
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "no_eligible_worker"
    assert submit("a", extra_data={"kiln": "w1"}).status_code == 400
    # The pool view, and configuring a worker (admins only).
    workers = client.get("/v1/workers", headers=AUTH_A).json()["workers"]
    assert {w["id"]: [r["name"] for r in w["resident"]] for w in workers} == {"w1": [A], "w2": [B]}
    body = {"pinned": [A], "allow": ["checkpoints/a*"]}
    assert client.put("/v1/workers/w1/config", json=body, headers=AUTH_A).status_code == 403


def test_worker_config_through_the_api(make_client, redis_client, redis_server, monkeypatch):
    body = {"pinned": [A], "allow": ["checkpoints/a*"]}
    assert make_client().put("/v1/workers/w1/config", json=body, headers=AUTH_A).status_code == 403
    monkeypatch.setenv("KILN_ROUTING_ADMIN_TENANTS", '["tenant-a"]')
    admin = make_client()
    response = admin.put("/v1/workers/w1/config", json=body, headers=AUTH_A)
    assert response.status_code == 200, response.text
    assert response.json()["config"] == {"pinned": [A], "allow": ["checkpoints/a*"]}
    assert json.loads(redis_client.hget(Keys.worker_config("w1"), "pinned")) == [A]
    cleared = admin.put("/v1/workers/w1/config", json={"allow": []}, headers=AUTH_A).json()["config"]
    assert cleared == {"pinned": [A], "allow": None}
    # The allow-list is enforced: w1 may load only checkpoints/a*.
    admin.put("/v1/workers/w1/config", json=body, headers=AUTH_A)
    heartbeat(redis_client, "w1")

    async def body_(service: RoutingService) -> tuple[str | None, str | None]:
        snapshot = await service.snapshot()
        router = service.router
        return (
            router.route(job("x", A), snapshot.pool, time.time()).worker,
            router.route(job("y", B), snapshot.pool, time.time()).reason,
        )

    assert run_service(redis_server.url, body_) == ("w1", "no_eligible")


# -- the worker side: heartbeats and measured figures ----------------------------------------------------


@dataclass
class FakeHost:
    pid: int = 4242

    def status(self) -> Any:
        from worker.engine_host import HostStatus

        return HostStatus(self.pid, True, True, False, "shared", 0, 0)


@dataclass
class FakeRunner:
    stats: WorkerStats
    host: FakeHost = field(default_factory=FakeHost)
    current_job: str | None = None
    jobs_run: int = 0


def test_worker_stats_and_the_heartbeat(redis_client: redis.Redis):
    stats = WorkerStats(redis_client, "w1")
    stats.job_started("j1", [A], host_pid=4242)
    stats.model_loaded(A, 3.0, "hash-a", host_pid=4242)
    stats.job_finished("j1", succeeded=True)
    stats.job_started("j2", [A], host_pid=4242)
    stats.job_finished("j2", succeeded=True)
    report = stats.report(4242)
    assert [(r["name"], r["hash"]) for r in report["resident"]] == [(A, "hash-a")]
    assert report["load_seconds"] == {A: 3.0} and report["loads"] == {A: 1}
    assert A in report["job_seconds"] and report["job_seconds"][A] < 1.0
    assert stats.report(999)["resident"] == []  # another engine host: nothing resident
    assert redis_client.hget(Keys.stats("model-loads"), json.dumps(["w1", A])) == b"1"
    assert redis_client.hget(Keys.stats("affinity"), "miss:w1") == b"1"
    assert redis_client.hget(Keys.stats("affinity"), "hit:w1") == b"1"

    redis_client.hset(Keys.worker_config("w1"), "pinned", json.dumps([B]))
    redis_client.lpush(worker_queue("w1"), "m1")
    redis_client.lpush(redis_list_for(worker_queue("w1"), 9), "m2")
    settings = WorkerSettings(worker_id="w1", heartbeat_ttl_s=7)
    runner = FakeRunner(stats, current_job="j3")
    stats.job_started("j3", [B], host_pid=4242)
    beat = Heartbeat(redis_client, settings, EngineSettings(device="cpu"), runner).beat()  # type: ignore[arg-type]
    stored = json.loads(redis_client.get(Keys.worker("w1")))
    assert stored == json.loads(json.dumps(beat, default=str))
    assert 0 < redis_client.ttl(Keys.worker("w1")) <= 7
    assert stored["queue_depth"] == 2 and stored["running_job"] == "j3"
    assert stored["running_models"] == [B] and stored["running_cold"] == [B]
    assert stored["pinned"] == [B] and stored["gpu_class"] == "cpu" and stored["memory_total"] > 0
    stats.preload_requested(C, "backlog")
    assert [p["model"] for p in stats.report(4242)["preload_requests"]] == [C]


def test_nvidia_smi_output():
    info = parse_nvidia_smi("NVIDIA H100 80GB HBM3, 81559, 80811\n")
    assert info == {
        "gpu_name": "NVIDIA H100 80GB HBM3",
        "gpu_class": "nvidia-h100-80gb-hbm3",
        "memory_total": 81559 * 2**20,
        "memory_free": 80811 * 2**20,
    }


# -- /metrics -------------------------------------------------------------------------------------------


def test_metrics_report_cluster_figures_from_redis(make_client, redis_client, monkeypatch):
    monkeypatch.setenv("KILN_REBALANCE_INTERVAL_S", "0")  # keep the queued message where it is
    client = make_client()
    store = JobStore(redis_client)
    created = time.time() - 3.0
    record = JobRecord(id="m1", tenant="t", status=JobStatus.QUEUED, number=1, prompt={}, created_at=created)
    redis_client.hset(Keys.job("m1"), mapping=record.to_redis())
    assert store.claim("m1", "w1") == "queued"
    assert store.finish(record, JobStatus.SUCCEEDED)
    assert not store.finish(record, JobStatus.FAILED)  # counted once
    WorkerStats(redis_client, "w1").model_loaded(A, 2.5, "h", host_pid=1)
    heartbeat(redis_client, "w1", memory_total=8 * 2**30, memory_free=6 * 2**30)
    redis_client.lpush(DEFAULT_QUEUE, task_message("x", DEFAULT_QUEUE))
    text = client.get("/metrics").text
    assert 'kiln_jobs_total{status="succeeded"} 1.0' in text
    assert 'kiln_job_seconds_bucket{le="5",phase="total"} 1.0' in text
    assert 'kiln_job_seconds_count{phase="run"} 1.0' in text
    assert f'kiln_model_loads_total{{model="{A}",worker="w1"}} 1.0' in text
    assert 'kiln_model_load_seconds_bucket{le="5"} 1.0' in text
    assert 'kiln_gpu_memory_bytes{kind="total",worker="w1"} 8.589934592e+09' in text
    assert 'kiln_queue_depth{queue="kiln.jobs"} 1.0' in text
    assert "kiln_workers_live 1.0" in text


# -- micro-benchmark: .venv/bin/python -m tests.api.test_routing -----------------------------------------


def three_model_backlog(depth: int) -> PoolView:
    """Two workers that hold one model, each queue ``depth // 2`` young jobs batched in three stretches
    (A..., B..., C...): a new job goes after its model's stretch, ahead of the others."""
    workers = []
    for w in range(2):
        share = depth // 2
        queue = tuple(
            JobView(
                f"w{w}-{i}", ((A, B, C)[3 * i // max(1, share)],), created_at=NOW - 30.0 + 30.0 * i / share
            )
            for i in range(share)
        )
        busy = RunningView(job(f"r{w}", C), started_at=NOW - 1.0)
        workers.append(worker(f"w{w}", (C,), queue, slots=1, running=busy))
    return pool(*workers)


def benchmark(depths: tuple[int, ...] = (0, 100, 300, 1000, 2000, 6000, 20000)) -> None:
    """CPU per Router.route (a kept Timelines, as the gateway routes on a snapshot; each routed job is
    inserted where it was routed) and per Router.plan (with an idle worker: the steal search) on
    synthetic backlogs; a depth is skipped once the previous one took over a second per decision."""
    print(
        "| backlog | route, 1 model (ms) | route, 3 models, 1 slot (ms) | plan, 1 model + idle worker (ms) |"
    )
    print("|---:|---:|---:|---:|")
    slow = False
    for depth in depths:
        if slow:
            print(f"| {depth} | (skipped) | (skipped) | (skipped) |")
            continue
        cells = []
        for build, models in ((one_model_backlog, (A,)), (three_model_backlog, (A, B, C))):
            backlog, router, kept = build(depth), Router(RoutingPolicy()), Timelines()
            router.route(job("first", A), backlog, NOW, kept)
            reps = 20 if depth <= 2000 else 50
            began = time.process_time()
            for i in range(reps):
                now = NOW + 0.01 * (i + 1)
                new = JobView(f"n{i}", (models[i % len(models)],), created_at=now)
                route = router.route(new, backlog, now, kept)
                backlog.workers[route.worker].queue.insert(route.position, new)
            cells.append((time.process_time() - began) / reps * 1000)
        backlog, router, kept = one_model_backlog(depth, idle=True), Router(RoutingPolicy()), Timelines()
        router.plan(backlog, NOW, kept)
        began = time.process_time()
        for i in range(10):
            router.plan(backlog, NOW + 0.01 * (i + 1), kept)
        cells.append((time.process_time() - began) / 10 * 1000)
        print(f"| {depth} | " + " | ".join(f"{cell:.3f}" for cell in cells) + " |", flush=True)
        slow = max(cells) > 1000


if __name__ == "__main__":
    benchmark()

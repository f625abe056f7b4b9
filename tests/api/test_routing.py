"""Model-affinity routing: the router's decisions (pure), the gateway's routing service and the
scripts that move task messages (real Redis), the heartbeat's routing fields, and /metrics."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

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
    priority_step,
    timeline,
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
    for step in range(300):
        if w.queue and rng.random() < 0.3:
            w.queue.pop(rng.randrange(len(w.queue)))
        else:
            new = job(f"j{step}", *rng.sample(models, rng.randint(0, 2)), priority=rng.choice((2, 5, 8)))
            w.queue.insert(rng.randint(0, len(w.queue)), new)
        now = NOW + step * 0.01
        got, want = kept.timeline(w, now, est), timeline(w, now, est)
        assert got.start == want.start and got.resident == want.resident
        assert got.resident_before == want.resident_before
        assert got.finishes == pytest.approx(want.finishes) and got.free_at == pytest.approx(want.free_at)


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

"""Model-affinity routing across the worker pool.

Two halves:

* **Decisions** (``Router``, the ``*View`` classes, ``Route``/``Move``/``Preload``): plain Python,
  no I/O, no clock, no randomness. They take a ``PoolView`` (what the heartbeats and the queues
  say) and ``now``, and answer where a job should go (``Router.route``) and which queued jobs
  should move or which models should be preloaded (``Router.plan``). ``bench/routing_sim.py``
  drives exactly this code with simulated workers.
* **The gateway's adapter** (``RoutingService``, at the bottom): reads heartbeats and queues from
  Redis into a ``PoolView``, asks the router, and applies its answers with atomic scripts (a task
  message is moved between Redis lists with ``worker.lua.MOVE_MESSAGE``: removed from one list and
  pushed onto the other in one step, so it is never in two lists or in none).

The cost model (see docs/routing.md): a worker runs its queue in order (priority step, then first
in first out), each job taking its measured job time, plus the measured load time of every model
the job needs that is not resident at that point of the queue. The expected completion time of a
job on a worker is where that timeline ends once the job is placed in it; the router picks the
eligible worker where it is earliest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from bisect import bisect_left, insort
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.celery_wire import DEFAULT_PRIORITY, MAX_PRIORITY, PRIORITY_STEPS, redis_list_for
from worker.protocol import (
    DEFAULT_QUEUE,
    KOMBU_UNACKED,
    KOMBU_UNACKED_INDEX,
    Channels,
    Keys,
    primary_model,
    queue_worker,
    worker_queue,
)

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from api.state import Metrics
    from worker.protocol import JobRecord

log = logging.getLogger(__name__)


# == decisions ===================================================================================


def priority_step(priority: int) -> int:
    """The kombu priority list a Kiln priority lands in (0 is consumed first)."""
    kombu_priority = MAX_PRIORITY - max(0, min(MAX_PRIORITY, priority))
    return max(step for step in PRIORITY_STEPS if step <= kombu_priority)


def ema(previous: float | None, sample: float, alpha: float = 0.2) -> float:
    """Exponential moving average; the first sample starts it."""
    return sample if previous is None else previous + alpha * (sample - previous)


def gpu_class_matches(wanted: str, gpu_class: str) -> bool:
    """A pin like ``"h100"`` matches a worker whose class is ``"nvidia-h100-80gb-hbm3"``."""
    return wanted.strip().lower() in gpu_class.lower()


@dataclass(frozen=True)
class JobView:
    """What routing knows of a job: the models it loads, its priority, its placement pins."""

    id: str
    models: tuple[str, ...] = ()
    priority: int = DEFAULT_PRIORITY
    created_at: float = 0.0
    pin_worker: str | None = None
    pin_gpu_class: str | None = None
    # Cancelled or expired while its message still waits: runs in no time, loads nothing.
    stale: bool = False
    # The job-time statistics key (its primary model) and its priority step, derived.
    key: str = field(init=False, compare=False)
    step: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", primary_model(self.models))
        object.__setattr__(self, "step", priority_step(self.priority))


@dataclass
class RunningView:
    job: JobView
    started_at: float
    # Models the job had to load when it started (they were not resident).
    cold: tuple[str, ...] = ()


@dataclass
class WorkerView:
    """One worker as its heartbeat and its queue describe it."""

    id: str
    live: bool = True
    # Resident models, least recently used first.
    resident: list[str] = field(default_factory=list)
    # How many models fit at once (None: no limit known, nothing is predicted to be evicted).
    slots: int | None = None
    pinned: frozenset[str] = frozenset()
    # Model name patterns (fnmatch) this worker may load; None allows every model.
    allow: tuple[str, ...] | None = None
    gpu_class: str = ""
    running: RunningView | None = None
    # Queued jobs in the order the worker will run them.
    queue: list[JobView] = field(default_factory=list)
    # Moving averages measured by the worker: job seconds by primary model, load seconds by model.
    job_seconds: dict[str, float] = field(default_factory=dict)
    load_seconds: dict[str, float] = field(default_factory=dict)
    # Models being preloaded -> when they will be resident.
    loading: dict[str, float] = field(default_factory=dict)
    # Preloads asked for and not yet done (not sent again).
    preload_requested: frozenset[str] = frozenset()

    def allows(self, model: str) -> bool:
        return self.allow is None or any(fnmatchcase(model, pattern) for pattern in self.allow)

    def can_run(self, job: JobView) -> bool:
        if not self.live:
            return False
        if job.pin_worker is not None and job.pin_worker != self.id:
            return False
        if job.pin_gpu_class is not None and not gpu_class_matches(job.pin_gpu_class, self.gpu_class):
            return False
        return all(self.allows(model) for model in job.models)

    def insert_position(self, job: JobView) -> int:
        """Where ``job`` lands in the run order: after every queued job of its priority step or a
        more urgent one (kombu consumes the more urgent lists first, each first in first out)."""
        position = len(self.queue)
        while position > 0 and self.queue[position - 1].step > job.step:
            position -= 1
        return position

    def copy(self) -> WorkerView:
        return replace(self, resident=list(self.resident), queue=list(self.queue), loading=dict(self.loading))


@dataclass
class PoolView:
    workers: dict[str, WorkerView] = field(default_factory=dict)
    # Jobs waiting in the shared queue, in run order.
    shared: list[JobView] = field(default_factory=list)

    def live(self) -> list[WorkerView]:
        return [w for w in self.workers.values() if w.live]

    def copy(self) -> PoolView:
        return PoolView({k: w.copy() for k, w in self.workers.items()}, list(self.shared))


@dataclass(frozen=True)
class RoutingPolicy:
    """The router's knobs. Defaults are what the simulation was tuned with (docs/routing.md)."""

    # Used until a worker has measured a model: job seconds and load seconds.
    default_job_s: float = 5.0
    default_load_s: float = 10.0
    # Batching: a new job may be placed right after a queued job that uses its model, ahead of
    # jobs queued behind that one, but never ahead of a job of its priority that has waited
    # this long (the bound on unfairness) ...
    overtake_age_s: float = 60.0
    # ... and delaying a queued job costs (1 + its age / age_tau_s) x the delay (cost inflation).
    age_tau_s: float = 10.0
    # Bounds that keep a placement's cost flat in the depth of the queue (docs/routing.md, "Deep
    # queues"): batch places are tried after at most this many stretches of jobs using the job's
    # models, the nearest to the end of its priority first ...
    batch_places: int = 32
    # ... and a place whose effect on the timeline behind it has not settled (the same models
    # resident as without it) within this many jobs that load a model is not tried.
    settle_jobs: int = 64
    # A queued job moves to a soon-idle worker when it finishes at least this much sooner there,
    steal_min_gain_s: float = 1.0
    # and the gain is at least this multiple of the load seconds the move causes.
    steal_load_ratio: float = 1.0
    # "Soon idle": the worker's timeline ends within this many seconds.
    steal_horizon_s: float = 0.5
    # Preload a model on an idle worker when at least this many queued jobs need it and a new
    # job for it would otherwise finish later than a load there.
    preload_min_backlog: int = 3
    # Demand (arrivals per second by model) decays with this time constant.
    demand_tau_s: float = 120.0
    # Weight of the expected reload seconds of the models a placement evicts ...
    eviction_weight: float = 1.0
    # ... counting a reload when the evicted model is wanted again within this horizon.
    eviction_horizon_s: float = 5.0
    # GPU time spent loading delays the work that arrives after it: a load (and an expected
    # reload) also costs its seconds x this weight x rho / (1 - rho), rho being the pool's
    # offered utilisation (arrivals x job seconds / workers, capped at max_rho).
    load_pressure_weight: float = 1.0
    max_rho: float = 0.95


@dataclass(frozen=True)
class Route:
    worker: str | None
    # warm | cold | pinned: a worker was chosen; no_workers: the shared queue;
    # no_eligible: live workers exist but none may run the job.
    reason: str
    expected_finish: float | None = None
    cold_models: tuple[str, ...] = ()
    # Where in the worker's run order: ``position`` is the index the job takes in
    # ``WorkerView.queue``; ``after`` the id of the queued job it runs right after when that job
    # has the same priority (None: first of its priority, or last when ``position`` is the end).
    position: int | None = None
    after: str | None = None
    back: bool = True


@dataclass(frozen=True)
class Move:
    job: JobView
    source: str | None  # worker id; None: the shared queue
    target: str
    reason: str  # reap | shared | steal


@dataclass(frozen=True)
class Preload:
    worker: str
    model: str
    reason: str  # pinned | backlog


class Estimates:
    """Job and load seconds for a worker: its own measurement, else the pool's mean, else the
    policy's default."""

    def __init__(self, pool: PoolView, policy: RoutingPolicy) -> None:
        self.policy = policy
        self.pool_job = _means(w.job_seconds for w in pool.workers.values())
        self.pool_load = _means(w.load_seconds for w in pool.workers.values())

    def job_s(self, worker: WorkerView, job: JobView) -> float:
        if job.stale:
            return 0.0
        key = job.key
        found = worker.job_seconds.get(key)
        if found is None:
            found = self.pool_job.get(key, self.policy.default_job_s)
        return found

    def load_s(self, worker: WorkerView, model: str) -> float:
        found = worker.load_seconds.get(model)
        if found is None:
            found = self.pool_load.get(model, self.policy.default_load_s)
        return found


def _means(tables: Iterable[dict[str, float]]) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for table in tables:
        for key, value in table.items():
            sums.setdefault(key, []).append(value)
    return {key: sum(values) / len(values) for key, values in sums.items()}


def touch(resident: list[str], models: Iterable[str], slots: int | None, pinned: frozenset[str]) -> list[str]:
    """Resident models after using ``models`` (least recently used first; evicts past ``slots``,
    never a pinned model nor one just used)."""
    used = list(models)
    if not used:
        return resident
    after = [m for m in resident if m not in used] + used
    if slots is not None:
        while len(after) > slots:
            victim = next((m for m in after if m not in pinned and m not in used), None)
            if victim is None:
                break
            after.remove(victim)
    return after


@dataclass
class Timeline:
    """A worker's predicted future: when each queued job finishes, when the worker is free, and
    what is resident before each queued job (``resident_before[i]``) and at the end."""

    start: float
    free_at: float
    resident: list[str]
    finishes: list[float]
    resident_before: list[list[str]]


def timeline(worker: WorkerView, now: float, est: Estimates) -> Timeline:
    """Run the worker's queue forward from ``now``."""
    t, resident = _start(worker, now, est)
    return _advance(worker, t, resident, worker.queue, est)


def _start(worker: WorkerView, now: float, est: Estimates) -> tuple[float, list[str]]:
    """When the worker can start on its queue (after its loads and its running job), and what is
    resident then."""
    t = now
    resident = list(worker.resident)
    for model, ready_at in worker.loading.items():
        t = max(t, ready_at)
        resident = touch(resident, [model], worker.slots, worker.pinned)
    running = worker.running
    if running is not None:
        expected = sum(est.load_s(worker, m) for m in running.cold) + est.job_s(worker, running.job)
        t = max(t, running.started_at + expected)
        resident = touch(resident, running.job.models, worker.slots, worker.pinned)
    return t, resident


def _alike(a: JobView, b: JobView) -> bool:
    """Jobs that cost the same wherever they run: the same models, pins and staleness."""
    return (
        a.models == b.models
        and a.pin_worker == b.pin_worker
        and a.pin_gpu_class == b.pin_gpu_class
        and a.stale == b.stale
    )


@dataclass
class _Run:
    """A worker's queue run forward from its start, in seconds from the start, with the indexes that
    let placements and steals look at a deep queue without walking it (one entry per job unless said)."""

    resident_at_start: list[str]
    jobs: list[JobView] = field(default_factory=list)
    seconds_to: list[float] = field(default_factory=list)  # to the end of each job
    resident_before: list[list[str]] = field(default_factory=list)
    resident: list[str] = field(default_factory=list)  # after the last job
    # First index of the stretch of jobs of this job's priority step that ends here.
    step_start: list[int] = field(default_factory=list)
    # First index of the stretch of jobs like this one (models, step, pins, stale) that ends here.
    group_start: list[int] = field(default_factory=list)
    # created_sum[i]: the sum of created_at - ref over the first i jobs (i = 0 .. n); newest[i]: the
    # latest created_at among the first i + 1 jobs. Suffix sums of the delay weights come from them.
    ref: float = 0.0
    created_sum: list[float] = field(default_factory=lambda: [0.0])
    newest: list[float] = field(default_factory=list)
    # Indexes of the jobs that load a model (one not resident before them), and of the jobs by model.
    cold: list[int] = field(default_factory=list)
    by_model: dict[str, list[int]] = field(default_factory=dict)
    duplicates: int = 0  # jobs that name a model twice
    # The older-jobs chain, node i + 1 for job i (0: the root): a job's parent is the nearest earlier
    # job created strictly before it; ``jump`` pointers find the nearest job older than a limit in
    # O(log n) steps (Myers' skew-binary jump pointers).
    parent: list[int] = field(default_factory=lambda: [0])
    jump: list[int] = field(default_factory=lambda: [0])
    depth: list[int] = field(default_factory=lambda: [0])

    def append(self, worker: WorkerView, job: JobView, est: Estimates) -> None:
        jobs, i = self.jobs, len(self.jobs)
        resident, models, created = self.resident, job.models, job.created_at
        previous = jobs[-1] if jobs else None
        if previous is None:
            self.ref = created
        seconds = self.seconds_to[-1] if previous is not None else 0.0
        seconds += _cost(worker, job, resident, est)
        jobs.append(job)
        self.resident_before.append(resident)
        self.seconds_to.append(seconds)
        self.resident = touch(resident, models, worker.slots, worker.pinned)
        if previous is not None and previous.step == job.step:
            self.step_start.append(self.step_start[-1])
            self.group_start.append(self.group_start[-1] if _alike(previous, job) else i)
        else:
            self.step_start.append(i)
            self.group_start.append(i)
        self.created_sum.append(self.created_sum[-1] + (created - self.ref))
        self.newest.append(max(self.newest[-1], created) if previous is not None else created)
        for model in models:
            self.by_model.setdefault(model, []).append(i)
        if len(models) > 1 and len(set(models)) < len(models):
            self.duplicates += 1
        if any(m not in resident for m in models):
            self.cold.append(i)
        parent, jump, depth = self.parent, self.jump, self.depth
        node = i  # the previous job's node
        while node and jobs[node - 1].created_at >= created:
            node = parent[node]
        up = jump[node]
        parent.append(node)
        depth.append(depth[node] + 1)
        jump.append(jump[up] if depth[node] - depth[up] == depth[up] - depth[jump[up]] else node)

    def insert(self, worker: WorkerView, position: int, job: JobView, est: Estimates) -> bool:
        """Account for ``job`` inserted before job ``position`` without running the jobs behind it
        again, when that is exact: the job finds its models resident and leaves the same models
        resident (a job batched after one like it), so every job behind it runs as before, later by
        its seconds; and it is the newest job (the older-jobs chain behind it is unchanged). False
        (nothing changed) otherwise: the caller re-runs the queue from ``position``."""
        jobs, count, models = self.jobs, len(self.jobs), job.models
        created = job.created_at
        resident = self.resident_before[position]
        if (
            position >= count
            or created < self.newest[-1]
            or (len(models) > 1 and len(set(models)) < len(models))
            or touch(resident, models, worker.slots, worker.pinned) != resident
        ):
            return False
        seconds = _cost(worker, job, resident, est)
        before = self.seconds_to[position - 1] if position > 0 else 0.0
        self.seconds_to[position:] = [before + seconds] + [s + seconds for s in self.seconds_to[position:]]
        jobs.insert(position, job)
        self.resident_before.insert(position, resident)
        moved = created - self.ref
        self.created_sum[position + 1 :] = [self.created_sum[position] + moved] + [
            s + moved for s in self.created_sum[position + 1 :]
        ]
        self.newest[position:] = [created] * (count + 1 - position)  # the newest job: the latest from here
        for uses in self.by_model.values():
            at = bisect_left(uses, position)
            uses[at:] = [i + 1 for i in uses[at:]]
        for model in models:
            insort(self.by_model.setdefault(model, []), position)
        at = bisect_left(self.cold, position)
        self.cold[at:] = [i + 1 for i in self.cold[at:]]
        # Stretches: indexes from ``position`` on move up one; then the stretches around the new job
        # are mended from it on, until they agree with what was there.
        for column in (self.step_start, self.group_start):
            column[position:] = [position] + [i + 1 if i >= position else i for i in column[position:]]
        for i in range(position, count + 1):
            current, previous = jobs[i], jobs[i - 1] if i > 0 else None
            same_step = previous is not None and previous.step == current.step
            step_start = self.step_start[i - 1] if same_step else i
            group_start = self.group_start[i - 1] if same_step and _alike(previous, current) else i
            if i > position and (step_start, group_start) == (self.step_start[i], self.group_start[i]):
                break  # from here on as before
            self.step_start[i], self.group_start[i] = step_start, group_start
        # The older-jobs chain: nodes from position + 1 on move up one; the new node joins it (the newest
        # job is nobody's parent).
        for column in (self.parent, self.jump):
            column[position + 1 :] = [n + 1 if n > position else n for n in column[position + 1 :]]
        node = position  # the node of the job before it
        while node and jobs[node - 1].created_at >= created:
            node = self.parent[node]
        parent, jump, depth = self.parent, self.jump, self.depth
        up = jump[node]
        skip = jump[up] if depth[node] - depth[up] == depth[up] - depth[jump[up]] else node
        parent.insert(position + 1, node)
        jump.insert(position + 1, skip)
        depth.insert(position + 1, depth[node] + 1)
        return True

    def truncate(self, kept: int) -> None:
        """Forget the jobs from index ``kept`` on (the queue changed there)."""
        if kept >= len(self.jobs):
            return
        self.resident = self.resident_before[kept]
        for i in range(len(self.jobs) - 1, kept - 1, -1):
            models = self.jobs[i].models
            for model in models:
                uses = self.by_model[model]
                uses.pop()
                if not uses:
                    del self.by_model[model]
            if len(models) > 1 and len(set(models)) < len(models):
                self.duplicates -= 1
        while self.cold and self.cold[-1] >= kept:
            self.cold.pop()
        for column in (
            self.jobs,
            self.seconds_to,
            self.resident_before,
            self.step_start,
            self.group_start,
            self.newest,
        ):
            del column[kept:]
        for column in (self.created_sum, self.parent, self.jump, self.depth):
            del column[kept + 1 :]

    def insert_position(self, step: int) -> int:
        """``WorkerView.insert_position`` in O(priority steps)."""
        position = len(self.jobs)
        while position > 0 and self.jobs[position - 1].step > step:
            position = self.step_start[position - 1]
        return position

    def overtake_limit(self, step: int, end: int, now: float, overtake_age_s: float) -> int:
        """How early a job of ``step`` may be placed before ``end``: after the last job before it
        that is of another priority step or has waited ``overtake_age_s`` (0: from the front). The
        walk of the older-jobs chain takes O(log n) steps, however many young jobs there are."""
        if end == 0:
            return 0
        jobs = self.jobs
        if jobs[end - 1].step != step:
            return end
        other_step = self.step_start[end - 1] - 1  # the last job of another step before them, or -1
        # The nearest job before ``end`` that has waited overtake_age_s is on the older-jobs chain
        # from job end - 1 (each job it skips is younger than the one it skips to), where ages grow:
        # jump while the jump lands on a job still younger, else step to the parent.
        parent, jump = self.parent, self.jump
        node = end
        while node - 1 > other_step and now - jobs[node - 1].created_at < overtake_age_s:
            up = jump[node]
            if up - 1 > other_step and now - jobs[up - 1].created_at < overtake_age_s:
                node = up
            else:
                node = parent[node]
        return max(other_step, node - 1) + 1

    def weight(self, first: int, stop: int, now: float, tau: float) -> float:
        """The delay weight of the jobs ``first .. stop - 1``: sum of 1 + their age / tau."""
        if stop <= first:
            return 0.0
        if self.newest[stop - 1] <= now:
            count = stop - first
            return (
                count + (count * (now - self.ref) - (self.created_sum[stop] - self.created_sum[first])) / tau
            )
        return sum(1.0 + max(0.0, now - self.jobs[i].created_at) / tau for i in range(first, stop))

    def next_use(self, models: Iterable[str], first: int) -> int:
        """The first index at or after ``first`` of a job that loads a model in the base timeline or
        names one of ``models`` (len(jobs) when none)."""
        found = len(self.jobs)
        at = bisect_left(self.cold, first)
        if at < len(self.cold):
            found = self.cold[at]
        for model in models:
            uses = self.by_model.get(model)
            if uses:
                at = bisect_left(uses, first)
                if at < len(uses) and uses[at] < found:
                    found = uses[at]
        return found

    def used_between(self, model: str, first: int, stop: int) -> bool:
        uses = self.by_model.get(model)
        if not uses:
            return False
        at = bisect_left(uses, first)
        return at < len(uses) and uses[at] < stop


def _common_prefix(a: list[JobView], b: list[JobView]) -> int:
    """How many first items ``a`` and ``b`` share, by bisection over C-level slice comparisons (each
    item is compared about twice; a loop comparing views one by one costs ~50x more)."""
    size = min(len(a), len(b))
    if a[:size] == b[:size]:
        return size
    low, high = 0, size  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low


class Timelines:
    """The timelines of one pool's workers, kept between the routing decisions made on that pool:
    a decision re-runs only the part of a worker's queue that changed since the last one (usually
    just the job that decision added at its end), not the whole queue. For a pool whose workers'
    figures do not change (one snapshot read from Redis); ``timeline`` is the uncached answer."""

    def __init__(self) -> None:
        self._runs: dict[str, _Run] = {}

    def run(self, worker: WorkerView, now: float, est: Estimates) -> tuple[float, _Run]:
        """When the worker starts on its queue, and its queue run forward from then (kept)."""
        t, resident = _start(worker, now, est)
        run = self._runs.get(worker.id)
        if run is None or run.resident_at_start != resident:
            run = self._runs[worker.id] = _Run(resident, resident=resident)
        queue = worker.queue
        kept = len(run.jobs)
        # The common case, a job added at the end, in one C-level comparison (identical views compare
        # by identity first; equal views cost the same); else where the queue changed, also at C speed.
        if queue[:kept] != run.jobs:
            kept = _common_prefix(queue, run.jobs)
            # One job placed among the others (batched after a like job): shift what runs behind it.
            if (
                len(queue) == len(run.jobs) + 1
                and queue[kept + 1 :] == run.jobs[kept:]
                and run.insert(worker, kept, queue[kept], est)
            ):
                return t, run
        run.truncate(kept)
        for job in queue[kept:]:
            run.append(worker, job, est)
        return t, run

    def timeline(self, worker: WorkerView, now: float, est: Estimates) -> Timeline:
        t, run = self.run(worker, now, est)
        seconds = run.seconds_to[-1] if run.seconds_to else 0.0
        finishes = [t + s for s in run.seconds_to]
        return Timeline(t, t + seconds, run.resident, finishes, list(run.resident_before))


def _advance(
    worker: WorkerView, t: float, resident: list[str], jobs: Iterable[JobView], est: Estimates
) -> Timeline:
    start = t
    finishes = []
    before = []
    for job in jobs:
        before.append(resident)
        t += _cost(worker, job, resident, est)
        resident = touch(resident, job.models, worker.slots, worker.pinned)
        finishes.append(t)
    return Timeline(start, t, resident, finishes, before)


def _cost(worker: WorkerView, job: JobView, resident: list[str], est: Estimates) -> float:
    if job.stale:
        return 0.0
    loads = sum(est.load_s(worker, m) for m in job.models if m not in resident)
    return loads + est.job_s(worker, job)


class Demand:
    """Arrivals per second by model, exponentially decayed (the router's only memory)."""

    def __init__(self, tau_s: float) -> None:
        self.tau_s = tau_s
        self._level: dict[str, float] = {}
        self._at: dict[str, float] = {}

    def record(self, models: Iterable[str], now: float) -> None:
        for model in models:
            self._level[model] = self.rate(model, now) * self.tau_s + 1.0
            self._at[model] = now

    def models(self) -> list[str]:
        return list(self._level)

    def rate(self, model: str, now: float) -> float:
        level = self._level.get(model)
        if level is None:
            return 0.0
        return level * math.exp(-max(0.0, now - self._at[model]) / self.tau_s) / self.tau_s


# Relative difference below which two places' scores count as equal.
TIE = 1e-9


@dataclass(frozen=True)
class _Placement:
    score: float
    finish: float
    position: int
    cold: tuple[str, ...]
    end: int  # the end of the job's priority (the first in first out place)


class Router:
    """Routes jobs and plans rebalancing. Its only state is a decayed estimate of demand."""

    def __init__(self, policy: RoutingPolicy | None = None) -> None:
        self.policy = policy or RoutingPolicy()
        self.demand = Demand(self.policy.demand_tau_s)
        self.arrivals = Demand(self.policy.demand_tau_s)

    # -- routing one job -------------------------------------------------------------------------

    def route(self, job: JobView, pool: PoolView, now: float, timelines: Timelines | None = None) -> Route:
        """Where a new job goes (worker and place in its run order). Records its models' demand.
        ``timelines``: kept across the decisions made on this same ``pool`` (see Timelines)."""
        self.demand.record(job.models, now)
        self.arrivals.record([job.key], now)
        timelines = timelines if timelines is not None else Timelines()
        return self._choose(job, pool, now, Estimates(pool, self.policy), timelines=timelines)

    def _choose(
        self,
        job: JobView,
        pool: PoolView,
        now: float,
        est: Estimates,
        batch: bool = True,
        timelines: Timelines | None = None,
    ) -> Route:
        live = pool.live()
        pinned = job.pin_worker is not None or job.pin_gpu_class is not None
        if not live and not pinned:
            return Route(None, "no_workers")
        candidates = [w for w in live if w.can_run(job)]
        if not candidates:
            return Route(None, "no_eligible")
        timelines = timelines if timelines is not None else Timelines()
        copies = self._copies(live)
        pressure = self.policy.load_pressure_weight * self._pressure(live, now, est)
        best: tuple[tuple[float, int, str], WorkerView, _Placement] | None = None
        for worker in candidates:
            placement = self._best_placement(worker, job, now, est, copies, batch, pressure, timelines)
            key = (placement.score, len(worker.queue), worker.id)
            if best is None or key < best[0]:
                best = (key, worker, placement)
        assert best is not None
        _, worker, placement = best
        reason = "pinned" if job.pin_worker else ("cold" if placement.cold else "warm")
        position = placement.position
        previous = worker.queue[position - 1] if position > 0 else None
        after = previous.id if previous is not None and previous.step == job.step else None
        return Route(
            worker.id, reason, placement.finish, placement.cold, position, after, position == placement.end
        )

    def _best_placement(
        self,
        worker: WorkerView,
        job: JobView,
        now: float,
        est: Estimates,
        copies: dict[str, int],
        batch: bool,
        pressure: float = 0.0,
        timelines: Timelines | None = None,
    ) -> _Placement:
        """The cheapest place for ``job`` in ``worker``'s run order.

        Places tried: the end of its priority (first in first out), and, to batch loads, right
        after queued jobs of its priority that use one of its models, or first of its priority when
        its models will be resident then. A place ahead of a job of its priority older than
        ``overtake_age_s`` is not allowed. The score is the job's own expected time to finish, plus
        the delay it causes every job behind it (inflated by their age), plus the expected reload
        cost of what it evicts.

        The cost does not grow with the queue (docs/routing.md, "Deep queues"): the queued jobs'
        timeline is kept (``Timelines``) and indexed; of a stretch of jobs with the job's models only
        the place after its last job is tried (any earlier one scores more: the jobs it passes last
        as long as the job and have waited longer); at most ``batch_places`` stretches back from the
        end are tried; and a place is scored by re-running the timeline behind it only until it runs
        as it did without the job, the rest shifted by the same delay (suffix sums of the weights)."""
        t, run = (timelines if timelines is not None else Timelines()).run(worker, now, est)
        end = run.insert_position(job.step)
        positions = [end]
        if batch and job.models:
            # How early it may go: back over the jobs of its priority, up to the first that has
            # waited overtake_age_s (the bound on unfairness).
            limit = run.overtake_limit(job.step, end, now, self.policy.overtake_age_s)
            positions += self._batch_positions(worker, run, job, limit, end, now, est)
            if limit < end and all(m in run.resident_before[limit] for m in job.models):
                positions.append(limit)
        best: _Placement | None = None
        for position in sorted(set(positions)):
            placement = self._place_at(worker, run, t, job, position, end, now, est, copies, pressure)
            # Scores within TIE of each other are equal (they are sums in another order than a walk
            # over the queue would take): the earlier place wins, as it did there.
            if placement is not None and (
                best is None or placement.score < best.score - TIE * abs(best.score)
            ):
                best = placement
        assert best is not None  # the end of its priority settles at once: nothing runs behind it
        return best

    def _batch_positions(
        self, worker: WorkerView, run: _Run, job: JobView, limit: int, end: int, now: float, est: Estimates
    ) -> list[int]:
        """Places right after the queued jobs in ``limit .. end - 1`` that use one of ``job``'s
        models, the nearest to the end first, at most ``batch_places`` of them. Of a stretch of jobs
        with exactly ``job``'s models (its group) only the place after its last job is returned: each
        place inside it scores more than the next one (both leave the same models resident, and the
        next one adds the job's own seconds to its wait but spares the job it passes that much delay,
        inflated by its age), so none of them can be the cheapest."""
        uses = [run.by_model.get(m, []) for m in set(job.models)]
        job_s = est.job_s(worker, job)
        positions: list[int] = []
        below = end  # the next pivot is before this index
        while len(positions) < self.policy.batch_places:
            pivot = -1
            for indexes in uses:
                at = bisect_left(indexes, below) - 1
                if at >= 0 and indexes[at] > pivot:
                    pivot = indexes[at]
            if pivot < limit:
                break
            positions.append(pivot + 1)
            first = max(run.group_start[pivot], limit)
            if (
                first < pivot
                and run.jobs[pivot].models == job.models
                and job_s > 0
                and run.newest[pivot] < now
            ):
                below = first
            else:
                below = pivot
        return positions

    def _place_at(
        self,
        worker: WorkerView,
        run: _Run,
        t: float,
        job: JobView,
        position: int,
        end: int,
        now: float,
        est: Estimates,
        copies: dict[str, int],
        pressure: float,
    ) -> _Placement | None:
        """The score of ``job`` placed at ``position`` (None: its effect did not settle in time)."""
        t0 = t + run.seconds_to[position - 1] if position > 0 else t
        resident = run.resident_before[position] if position < len(run.jobs) else run.resident
        finish = t0 + _cost(worker, job, resident, est)
        after = touch(resident, job.models, worker.slots, worker.pinned)
        delay = self._delay(worker, run, t, position, after, finish, now, est)
        if delay is None:
            return None
        evicted = [m for m in resident if m not in after]
        penalty = self._eviction_cost(evicted, worker, copies, now, est)
        cold = tuple(m for m in job.models if m not in resident)
        loads = sum(est.load_s(worker, m) for m in cold)
        score = (finish - now) + delay + self.policy.eviction_weight * penalty + (penalty + loads) * pressure
        return _Placement(score, finish, position, cold, end)

    def _delay(
        self,
        worker: WorkerView,
        run: _Run,
        t: float,
        first: int,
        resident: list[str],
        start: float,
        now: float,
        est: Estimates,
    ) -> float | None:
        """The delay a job placed before queued job ``first`` causes the jobs from there on, each
        slip weighted by 1 + the job's age / age_tau_s, when job ``first`` starts at ``start`` with
        ``resident`` loaded instead of as in the timeline ``run``.

        Once the same models are resident as in ``run`` (the same list; the same set when nothing is
        ever evicted) every later job slips by the same seconds: the rest is one suffix sum. Between
        the jobs that load a model in either timeline (found with the indexes, not by walking) the
        jobs only reorder resident models, so they too slip alike. None when it has not settled after
        ``settle_jobs`` such steps (the place is not tried)."""
        tau = self.policy.age_tau_s
        slots, pinned = worker.slots, worker.pinned
        jobs, seconds_to, before = run.jobs, run.seconds_to, run.resident_before
        count = len(jobs)
        delay = 0.0
        index = first
        for _ in range(self.policy.settle_jobs):
            if index >= count:
                return delay
            base = before[index]
            base_start = t + seconds_to[index - 1] if index > 0 else t
            if resident == base or (slots is None and set(resident) == set(base)):
                return delay + (start - base_start) * run.weight(index, count, now, tau)
            plain = not run.duplicates and len(set(resident)) == len(resident) and len(set(base)) == len(base)
            if plain and (slots is None or (len(resident) <= slots and len(base) <= slots)):
                # Within the slots, a job whose models are resident in both timelines evicts nothing
                # in either: up to the next job that loads one in either, the jobs slip alike.
                stop = run.next_use(set(base).difference(resident), index)
                if stop > index:
                    slip = start - base_start
                    delay += slip * run.weight(index, stop, now, tau)
                    if stop >= count:
                        return delay
                    # What those jobs touched moved to the end in both, in the order they last did.
                    resident_then = before[stop]
                    touched = {m for m in resident_then if run.used_between(m, index, stop)}
                    resident = [m for m in resident if m not in touched] + [
                        m for m in resident_then if m in touched
                    ]
                    start = t + seconds_to[stop - 1] + slip
                    index = stop
            queued = jobs[index]
            start += _cost(worker, queued, resident, est)
            slip = start - (t + seconds_to[index])
            delay += slip * (1.0 + max(0.0, now - queued.created_at) / tau)
            resident = touch(resident, queued.models, slots, pinned)
            index += 1
        return delay if index >= count else None

    def utilisation(self, live: list[WorkerView], now: float, est: Estimates) -> float:
        """The pool's offered utilisation: recent arrivals x their job seconds per live worker
        (what the GPUs would be busy with if no job had to load a model)."""
        if not live:
            return 0.0
        reference = live[0]
        work = sum(
            self.arrivals.rate(key, now) * est.job_s(reference, JobView(id="", models=(key,) if key else ()))
            for key in self.arrivals.models()
        )
        return work / len(live)

    def _pressure(self, live: list[WorkerView], now: float, est: Estimates) -> float:
        rho = min(self.policy.max_rho, self.utilisation(live, now, est))
        return rho / (1.0 - rho)

    def _copies(self, live: list[WorkerView]) -> dict[str, int]:
        copies: dict[str, int] = {}
        for worker in live:
            for model in worker.resident:
                copies[model] = copies.get(model, 0) + 1
        return copies

    def _eviction_cost(
        self, evicted: list[str], worker: WorkerView, copies: dict[str, int], now: float, est: Estimates
    ) -> float:
        """Expected reload seconds caused by evicting ``evicted``: a model wanted ``rate`` times a
        second is wanted again within one load time with probability ~ rate x load; copies on
        other workers share that need."""
        cost = 0.0
        for model in evicted:
            load = est.load_s(worker, model)
            wanted = self.demand.rate(model, now) * self.policy.eviction_horizon_s
            cost += load * wanted / max(1, copies.get(model, 1))
        return cost

    # -- rebalancing -----------------------------------------------------------------------------

    def plan(self, pool: PoolView, now: float, timelines: Timelines | None = None) -> list[Move | Preload]:
        """Moves and preloads for this moment: reap the queues of dead workers and the shared
        queue, let soon-idle workers steal jobs that finish sooner there, preload models.

        Moved jobs go to the end of their priority in the target queue (never ahead of anyone)."""
        pool = pool.copy()
        est = Estimates(pool, self.policy)
        live = pool.live()
        if not live:
            return []
        timelines = timelines if timelines is not None else Timelines()
        actions: list[Move | Preload] = []
        for dead in [w for w in pool.workers.values() if not w.live and w.queue]:
            for job in list(dead.queue):
                if job.pin_worker == dead.id:
                    continue  # waits for its worker to come back
                route = self._choose(job, pool, now, est, batch=False, timelines=timelines)
                if route.worker is not None:
                    dead.queue.remove(job)
                    self._append(pool.workers[route.worker], job)
                    actions.append(Move(job, dead.id, route.worker, "reap"))
        for job in list(pool.shared):
            route = self._choose(job, pool, now, est, batch=False, timelines=timelines)
            if route.worker is not None:
                pool.shared.remove(job)
                self._append(pool.workers[route.worker], job)
                actions.append(Move(job, None, route.worker, "shared"))
        actions.extend(self._steals(pool, live, now, est, timelines))
        actions.extend(self._preloads(pool, live, now, est, timelines))
        return actions

    @staticmethod
    def _append(worker: WorkerView, job: JobView) -> None:
        worker.queue.insert(worker.insert_position(job), job)

    def _steals(
        self,
        pool: PoolView,
        live: list[WorkerView],
        now: float,
        est: Estimates,
        cache: Timelines | None = None,
    ) -> list[Move]:
        """Each soon-idle worker (most idle first) takes the queued job that finishes soonest there
        compared with where it is: the most urgent priority first, then the largest gain (the first
        in the pool's order among equals).

        Not a walk over every queued job: a victim's queue is looked at from its end, one group of
        like jobs at a time (the same models, priority and pins: the same cost on the thief, so its
        last job, which finishes latest, gains most), and the walk stops where a job's finish minus
        the thief's start, an upper bound of any earlier job's gain, cannot beat the best found."""
        cache = cache if cache is not None else Timelines()
        policy = self.policy
        moves: list[Move] = []
        runs = {w.id: cache.run(w, now, est) for w in live}

        def free_at(worker: WorkerView) -> float:
            t, run = runs[worker.id]
            return t + (run.seconds_to[-1] if run.seconds_to else 0.0)

        copies = self._copies(live)
        pressure = policy.load_pressure_weight * self._pressure(live, now, est)
        for thief in sorted(live, key=lambda w: (free_at(w), w.id)):
            free = free_at(thief)
            if free > now + policy.steal_horizon_s:
                continue
            start = max(now, free)
            mine = runs[thief.id][1].resident
            # ((step, -gain, victim's place in the pool, index), victim, index)
            best: tuple[tuple[float, float, int, int], WorkerView, int] | None = None
            for order, victim in enumerate(live):
                if victim is thief or not victim.queue:
                    continue
                t, run = runs[victim.id]
                seconds_to = run.seconds_to
                index = len(run.jobs) - 1
                while index >= 0:
                    finish = t + seconds_to[index]
                    bound = finish - start  # no job up to here gains more
                    if bound < policy.steal_min_gain_s:
                        break
                    job = run.jobs[index]
                    if best is not None and (
                        job.step > best[0][0] or (job.step == best[0][0] and bound < -best[0][1])
                    ):
                        index = run.step_start[index] - 1  # nothing else of this priority here wins
                        continue
                    group = run.group_start[index]
                    if job.pin_worker is None and thief.can_run(job):
                        cold = [m for m in job.models if m not in mine]
                        loads = sum(est.load_s(thief, m) for m in cold)
                        spent = start + loads + est.job_s(thief, job)
                        gain = finish - spent
                        allowed = gain >= policy.steal_min_gain_s
                        if allowed and cold:
                            # A cold steal pays for its loads and what they evict, as a placement does.
                            after = touch(mine, job.models, thief.slots, thief.pinned)
                            evicted = [m for m in mine if m not in after]
                            penalty = self._eviction_cost(evicted, thief, copies, now, est)
                            cost = policy.eviction_weight * penalty + (penalty + loads) * pressure
                            allowed = gain >= policy.steal_load_ratio * loads + cost
                        if allowed:
                            # The first job of the group that gains as much (they differ by finish only).
                            first = bisect_left(
                                range(group, index + 1), gain, key=lambda i: (t + seconds_to[i]) - spent
                            )
                            key = (float(job.step), -gain, order, group + first)
                            if best is None or key < best[0]:
                                best = (key, victim, group + first)
                    index = group - 1
            if best is None:
                continue
            _, victim, index = best
            job = victim.queue.pop(index)
            self._append(thief, job)
            moves.append(Move(job, victim.id, thief.id, "steal"))
            runs[victim.id] = cache.run(victim, now, est)
            runs[thief.id] = cache.run(thief, now, est)
        return moves

    def _preloads(
        self,
        pool: PoolView,
        live: list[WorkerView],
        now: float,
        est: Estimates,
        timelines: Timelines | None = None,
    ) -> list[Preload]:
        preloads: list[Preload] = []
        idle = [w for w in live if not w.queue and w.running is None and not w.loading]
        if not idle:
            return preloads
        timelines = timelines if timelines is not None else Timelines()
        # Queued jobs by model: counted from the live workers' indexes, the dead workers' queues walked.
        backlog: dict[str, int] = {}
        for worker in pool.workers.values():
            if worker.live:
                for model, uses in timelines.run(worker, now, est)[1].by_model.items():
                    if uses:
                        backlog[model] = backlog.get(model, 0) + len(uses)
                continue
            for job in worker.queue:
                for model in job.models:
                    backlog[model] = backlog.get(model, 0) + 1
        copies = self._copies(live)
        pressure = self.policy.load_pressure_weight * self._pressure(live, now, est)
        for worker in idle:
            waiting = set(worker.resident) | set(worker.loading) | set(worker.preload_requested)
            pinned = sorted(m for m in worker.pinned if m not in waiting)
            if pinned:
                preloads.append(Preload(worker.id, pinned[0], "pinned"))
                continue
            ranked = sorted(
                (-count, model)
                for model, count in backlog.items()
                if count >= self.policy.preload_min_backlog and model not in waiting and worker.allows(model)
            )
            for _, model in ranked:
                after = touch(worker.resident, [model], worker.slots, worker.pinned)
                evicted = [m for m in worker.resident if m not in after]
                if any(backlog.get(m) for m in evicted):
                    continue  # it would evict a model that queued jobs still need
                penalty = self._eviction_cost(evicted, worker, copies, now, est)
                probe = JobView(id="", models=(model,), created_at=now)
                others = [w for w in live if w is not worker and w.can_run(probe)]
                # What a new job for the model would cost elsewhere (its wait and the delay it
                # causes), against a load and the job here.
                elsewhere = min(
                    (
                        self._best_placement(w, probe, now, est, copies, True, timelines=timelines).score
                        for w in others
                    ),
                    default=math.inf,
                )
                load = est.load_s(worker, model)
                cost = load + est.job_s(worker, probe) + self.policy.eviction_weight * penalty
                if elsewhere > cost + (penalty + load) * pressure:
                    preloads.append(Preload(worker.id, model, "backlog"))
                    break
        return preloads


# == the gateway's adapter ======================================================================

# A pool snapshot is re-read at most once per this many times the duration of the last read, and
# kept at most READ_REUSE_MAX_S for that reason (a read slowed by a Redis restart must not freeze it).
READ_SPACING = 20.0
READ_REUSE_MAX_S = 5.0


class RoutingSettings(BaseSettings):
    """Routing settings: ``KILN_*`` environment or the config file's ``routing`` section."""

    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore")

    rebalance_interval_s: float = Field(
        0.5, ge=0, description="Seconds between rebalancing rounds (steal, reap, preload); 0 disables."
    )
    pool_max_age_s: float = Field(1.0, gt=0, description="Oldest pool snapshot a routing decision uses.")
    pinned_models: dict[str, list[str]] = Field(
        default_factory=dict, description='Worker id -> models kept resident: {"gpu-0": ["checkpoints/a"]}.'
    )
    model_allow_lists: dict[str, list[str]] = Field(
        default_factory=dict, description="Worker id -> model name patterns it may load (fnmatch)."
    )
    routing_admin_tenants: list[str] = Field(
        default_factory=list, description="Tenants allowed to change pins and allow-lists through the API."
    )
    default_job_s: float = Field(5.0, gt=0, description="Job seconds assumed before any measurement.")
    default_load_s: float = Field(10.0, gt=0, description="Load seconds assumed before any measurement.")
    orphan_grace_s: float = Field(
        30.0,
        ge=0,
        description="A running job whose worker's heartbeat has been gone this long is redelivered.",
    )
    worker_queue_retention_s: float = Field(
        24 * 3600.0, gt=0, description="How long an empty queue of a dead worker is still watched."
    )

    def policy(self) -> RoutingPolicy:
        return RoutingPolicy(default_job_s=self.default_job_s, default_load_s=self.default_load_s)


def load_routing_settings() -> RoutingSettings:
    from engine.settings import load_section

    return load_section(RoutingSettings, "routing", None, {})


@dataclass
class _Queued:
    """Where a job's task message sits: the list key and the exact message (for MOVE_MESSAGE)."""

    list_key: str
    payload: bytes


def queue_lists(queue: str) -> list[str]:
    """The Redis lists of a queue, most urgent priority step first."""
    return [redis_list_for(queue, MAX_PRIORITY - step) for step in PRIORITY_STEPS]


def job_view(record: JobRecord) -> JobView:
    return JobView(
        id=record.id,
        models=tuple(record.models),
        priority=record.priority,
        created_at=record.created_at,
        pin_worker=record.pin.get("worker"),
        pin_gpu_class=record.pin.get("gpu_class"),
    )


def worker_view(beat: dict[str, Any], config: dict[str, Any], live: bool = True) -> WorkerView:
    """A WorkerView from a heartbeat (worker/heartbeat.py) and the worker's routing config."""
    resident = [r["name"] if isinstance(r, dict) else str(r) for r in beat.get("resident") or []]
    running = None
    if beat.get("running_job"):
        models = tuple(beat.get("running_models") or ())
        running = RunningView(
            JobView(id=beat["running_job"], models=models),
            started_at=float(beat.get("running_since") or beat.get("time") or 0.0),
            cold=tuple(beat.get("running_cold") or ()),
        )
    allow = config.get("allow")
    return WorkerView(
        id=beat["id"],
        live=live,
        resident=resident,
        slots=beat.get("model_slots"),
        pinned=frozenset(config.get("pinned") or beat.get("pinned") or ()),
        allow=tuple(allow) if allow is not None else None,
        gpu_class=beat.get("gpu_class") or "",
        running=running,
        job_seconds={k: float(v) for k, v in (beat.get("job_seconds") or {}).items()},
        load_seconds={k: float(v) for k, v in (beat.get("load_seconds") or {}).items()},
        preload_requested=frozenset(r["model"] for r in beat.get("preload_requests") or ()),
    )


@dataclass
class PoolSnapshot:
    """A PoolView read from Redis, with where each queued job's message is."""

    pool: PoolView
    at: float
    heartbeats: dict[str, dict[str, Any]]
    configs: dict[str, dict[str, Any]]
    messages: dict[str, _Queued] = field(default_factory=dict)
    # Messages waiting per queue name (every priority list), dead workers' queues included.
    depths: dict[str, int] = field(default_factory=dict)
    # The workers' timelines, kept across the routing decisions made on this snapshot.
    timelines: Timelines = field(default_factory=Timelines)


class RoutingService:
    """The gateway's routing: picks the queue (and place) of each job, and runs the rebalancing
    loop that reaps dead workers' queues, lets idle workers steal, and asks for preloads."""

    def __init__(
        self, client: aioredis.Redis, settings: RoutingSettings, metrics: Metrics | None = None
    ) -> None:
        from worker import lua

        self.redis = client
        self.settings = settings
        self.metrics = metrics
        self.router = Router(settings.policy())
        self._move = client.register_script(lua.MOVE_JOB)
        self._redeliver = client.register_script(lua.REDELIVER_UNACKED)
        self._missing_since: dict[str, float] = {}
        self._snapshot: PoolSnapshot | None = None
        self._refreshing: asyncio.Lock | None = None
        # Jobs routed here that a read may miss (their create was in flight): id -> (worker, job, at).
        self._inflight: dict[str, tuple[str, JobView, float]] = {}
        self._preloads_sent: dict[tuple[str, str], float] = {}
        # Caches of what never changes, kept for what is queued now: message -> job id, job id ->
        # its view (models, priority, pins). A snapshot then reads each queued job once, not per read.
        self._message_ids: dict[bytes, str | None] = {}
        self._views: dict[str, JobView] = {}
        self._queue_marked: dict[str, float] = {}
        self._read_s = 0.0  # how long the last snapshot read took
        self._config_written = False
        self._token = uuid.uuid4().hex

    # -- reading the pool -------------------------------------------------------------------------

    async def snapshot(self, max_age_s: float | None = None) -> PoolSnapshot:
        """The pool as Redis holds it, read at most ``max_age_s`` ago (now when None)."""
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        if self._fresh(max_age_s):
            assert self._snapshot is not None
            return self._snapshot
        async with self._refreshing:
            if not self._fresh(max_age_s):
                began = time.perf_counter()
                self._snapshot = await self._read()
                self._read_s = time.perf_counter() - began
            assert self._snapshot is not None
            return self._snapshot

    def _reuse_s(self) -> float:
        """How long a snapshot is good for the routing and rebalancing it takes: a read costs time in
        proportion to the queued messages, so with a deep backlog reads are spaced out to stay under
        ~1/READ_SPACING of the gateway's time (0 while reads are quick: always read afresh)."""
        return min(READ_SPACING * self._read_s, READ_REUSE_MAX_S)

    def _fresh(self, max_age_s: float | None) -> bool:
        current = self._snapshot
        return current is not None and max_age_s is not None and time.time() - current.at <= max_age_s

    async def _read(self) -> PoolSnapshot:
        now = time.time()
        await self._write_config_once()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.smembers(Keys.workers())
            pipe.zrange(Keys.worker_queues(), 0, -1)
            members, queues = await pipe.execute()
        worker_ids = {w.decode() for w in members}
        worker_ids |= {w for w in (queue_worker(q.decode()) for q in queues) if w}
        ordered = sorted(worker_ids)
        all_lists = [(None, key) for key in queue_lists(DEFAULT_QUEUE)]
        all_lists += [(w, key) for w in ordered for key in queue_lists(worker_queue(w))]
        async with self.redis.pipeline(transaction=False) as pipe:
            for worker_id in ordered:
                pipe.get(Keys.worker(worker_id))
                pipe.hgetall(Keys.worker_config(worker_id))
            for _, key in all_lists:
                pipe.llen(key)
            rows = await pipe.execute()
        beats: dict[str, dict[str, Any]] = {}
        configs: dict[str, dict[str, Any]] = {}
        for index, worker_id in enumerate(ordered):
            raw, config = rows[2 * index], rows[2 * index + 1]
            if raw is not None:
                beats[worker_id] = json.loads(raw)
            configs[worker_id] = self._config(worker_id, config)
        lengths = rows[2 * len(ordered) :]
        depths: dict[str, int] = {}
        for (owner, _), length in zip(all_lists, lengths, strict=True):
            queue = worker_queue(owner) if owner else DEFAULT_QUEUE
            depths[queue] = depths.get(queue, 0) + int(length)
        # What is queued matters only when a live worker may take it (routing, stealing, reaping):
        # without one, the depths are all a snapshot needs, whatever the backlog.
        placed = await self._list_contents(all_lists, lengths) if beats else []
        views = await self._job_views([job_id for *_, job_id in placed])
        pool = PoolView()
        for worker_id in ordered:
            beat = beats.get(worker_id)
            if beat is not None:
                pool.workers[worker_id] = worker_view(beat, configs[worker_id])
            else:
                pool.workers[worker_id] = WorkerView(id=worker_id, live=False)
        messages: dict[str, _Queued] = {}
        for owner, key, payload, job_id in placed:
            messages[job_id] = _Queued(key, payload)
            view = views.get(job_id) or JobView(id=job_id, stale=True)
            (pool.workers[owner].queue if owner else pool.shared).append(view)
        self._add_inflight(pool, messages, now)
        return PoolSnapshot(pool, now, beats, configs, messages, depths)

    async def _list_contents(
        self, lists: list[tuple[str | None, str]], lengths: list[int]
    ) -> list[tuple[str | None, str, bytes, str]]:
        """(owner, list key, message, job id) of every queued message, in run order: the most urgent
        list first, each list from its right end. Job ids are parsed once per message, not per read."""
        wanted = [(owner, key) for (owner, key), length in zip(lists, lengths, strict=True) if int(length)]
        if not wanted:
            self._message_ids = {}
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for _, key in wanted:
                pipe.lrange(key, 0, -1)
            rows = await pipe.execute()
        known, seen = self._message_ids, {}
        placed = []
        for (owner, key), items in zip(wanted, rows, strict=True):
            for payload in reversed(items):
                job_id = known[payload] if payload in known else message_job_id(payload)
                seen[payload] = job_id
                if job_id is not None:
                    placed.append((owner, key, payload, job_id))
        self._message_ids = seen
        return placed

    def _add_inflight(self, pool: PoolView, messages: dict[str, _Queued], now: float) -> None:
        running = {w.running.job.id for w in pool.workers.values() if w.running is not None}
        for job_id, (worker_id, job, at) in list(self._inflight.items()):
            if job_id in messages or job_id in running or now - at > 2.0:
                del self._inflight[job_id]
                continue
            worker = pool.workers.get(worker_id)
            if worker is not None:
                worker.queue.insert(worker.insert_position(job), job)

    async def _job_views(self, job_ids: list[str]) -> dict[str, JobView]:
        """Views of the jobs among ``job_ids`` that are still queued (the others are stale: gone,
        cancelled, or claimed by a worker). What routing reads of a job never changes, so each job
        is read once; whether it is still queued is one ZMSCORE on the pending set for them all."""
        known = self._views
        missing = [job_id for job_id in job_ids if job_id not in known]
        scores: list[float | None] = []
        rows: list[list[bytes | None]] = []
        if job_ids:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zmscore(Keys.pending(), job_ids)
                for job_id in missing:
                    pipe.hmget(Keys.job(job_id), "models", "priority", "created_at", "pin")
                scores, *rows = await pipe.execute()
        read = {job_id: known[job_id] for job_id in job_ids if job_id in known}
        for job_id, row in zip(missing, rows, strict=True):
            if all(value is None for value in row):
                continue  # the record is gone
            models, priority, created_at, pin = (v.decode() if v is not None else None for v in row)
            pins = json.loads(pin) if pin else {}
            read[job_id] = JobView(
                id=job_id,
                models=tuple(json.loads(models) if models else ()),
                priority=int(priority) if priority else DEFAULT_PRIORITY,
                created_at=float(created_at) if created_at else 0.0,
                pin_worker=pins.get("worker"),
                pin_gpu_class=pins.get("gpu_class"),
            )
        # Keep only what is queued now (the cache never outgrows the queues), and the jobs routed here
        # meanwhile (their messages may have been written after the lists were read).
        for job_id, (_, job, _) in self._inflight.items():
            read.setdefault(job_id, job)
        self._views = read
        # Queued <=> in the pending set (CREATE, REQUEUE add; CLAIM, CANCEL, FINISH remove).
        return {
            job_id: read[job_id]
            for job_id, score in zip(job_ids, scores, strict=True)
            if score is not None and job_id in read
        }

    def _config(self, worker_id: str, stored: dict[bytes, bytes]) -> dict[str, Any]:
        config: dict[str, Any] = {k.decode(): json.loads(v) for k, v in stored.items()}
        if "pinned" not in config and worker_id in self.settings.pinned_models:
            config["pinned"] = self.settings.pinned_models[worker_id]
        if "allow" not in config and worker_id in self.settings.model_allow_lists:
            config["allow"] = self.settings.model_allow_lists[worker_id]
        return config

    async def _write_config_once(self) -> None:
        """Configured pins and allow-lists go to Redis once, where workers read them; values set
        through the API are kept."""
        if self._config_written:
            return
        self._config_written = True
        for worker_id, models in self.settings.pinned_models.items():
            await self.redis.hsetnx(Keys.worker_config(worker_id), "pinned", json.dumps(models))
        for worker_id, patterns in self.settings.model_allow_lists.items():
            await self.redis.hsetnx(Keys.worker_config(worker_id), "allow", json.dumps(patterns))

    async def worker_config(self, worker_id: str) -> dict[str, Any]:
        return self._config(worker_id, await self.redis.hgetall(Keys.worker_config(worker_id)))

    async def set_worker_config(
        self, worker_id: str, *, pinned: list[str] | None = None, allow: list[str] | None = None
    ) -> dict[str, Any]:
        """Pin models resident on a worker and/or set its allow-list (None leaves either as it is;
        an empty allow-list removes it: every model is allowed)."""
        key = Keys.worker_config(worker_id)
        if pinned is not None:
            await self.redis.hset(key, "pinned", json.dumps(sorted(set(pinned))))
        if allow is not None:
            if allow:
                await self.redis.hset(key, "allow", json.dumps(allow))
            else:
                await self.redis.hset(key, "allow", "null")
        self._snapshot = None
        return await self.worker_config(worker_id)

    # -- routing a job ---------------------------------------------------------------------------

    async def route(self, record: JobRecord) -> Route:
        """Choose a new job's queue and place (sets ``record.queue``); ``create`` comes next."""
        snapshot = await self.snapshot(max(self.settings.pool_max_age_s, self._reuse_s()))
        job = job_view(record)
        now = time.time()
        route = self.router.route(job, snapshot.pool, now, snapshot.timelines)
        log.debug("Job %s routed: %s (%d live workers)", job.id, route, len(snapshot.pool.live()))
        if self.metrics is not None:
            self.metrics.routed.labels(route.reason).inc()
        if route.worker is None:
            record.queue = DEFAULT_QUEUE
            return route
        record.queue = worker_queue(route.worker)
        worker = snapshot.pool.workers[route.worker]
        worker.queue.insert(route.position if route.position is not None else len(worker.queue), job)
        self._inflight[job.id] = (route.worker, job, now)
        self._views[job.id] = job
        # The reaper's set needs the queue before the job is in it; once a second is enough (the
        # score only counts against a retention of hours), not a round trip per submit.
        if now - self._queue_marked.get(record.queue, 0.0) >= 1.0:
            await self.redis.zadd(Keys.worker_queues(), {record.queue: now})
            self._queue_marked[record.queue] = now
        return route

    async def place(self, record: JobRecord, route: Route) -> bool:
        """Move a just-created job's message from the back of its priority to the place the router
        chose (right after a queued job of the same model). A worker that took it meanwhile wins."""
        if route.worker is None or route.back:
            return False
        queue = worker_queue(route.worker)
        key = redis_list_for(queue, record.priority)
        where = "after" if route.after else "front"
        moved = await self._move(
            keys=[key, key, Keys.job(record.id)], args=[record.id, "", queue, where, route.after or ""]
        )
        return bool(moved)

    # -- rebalancing -----------------------------------------------------------------------------

    async def tick(self) -> list[Move | Preload]:
        """One rebalancing round; returns what was applied. Only the gateway process holding the
        lease runs rounds: the others (replicas, ``kiln serve --gateway-processes``) would read the same pool
        and find the same moves."""
        if not await self._lease():
            return []
        snapshot = await self.snapshot(self._reuse_s())
        now = time.time()
        await self._watch_queues(snapshot, now)
        if await self._redeliver_orphans(snapshot, now):
            snapshot = await self.snapshot()
        actions = [
            a
            for a in self.router.plan(snapshot.pool, now, snapshot.timelines)
            if not isinstance(a, Preload) or self._preload_due(a, now)
        ]
        if not actions:
            return []
        applied: list[Move | Preload] = []
        for action in actions:
            if isinstance(action, Move):
                if await self._apply_move(snapshot, action, now):
                    applied.append(action)
                continue
            message = json.dumps({"preload": action.model, "reason": action.reason})
            await self.redis.publish(Channels.control(action.worker), message)
            self._preloads_sent[(action.worker, action.model)] = now
            applied.append(action)
            if self.metrics is not None:
                self.metrics.preloads.labels(action.reason).inc()
        if applied:
            self._snapshot = None
        return applied

    async def _redeliver_orphans(self, snapshot: PoolSnapshot, now: float) -> int:
        """Put back the running jobs of workers whose heartbeat has been gone ``orphan_grace_s``
        (a killed worker never acknowledges its job; kombu alone would wait for the visibility
        timeout, by default the job timeout x attempts + 10 minutes). The message goes to the
        front of the queue it was sent to; the reaper moves it on from a dead worker's queue."""
        for worker_id in snapshot.pool.workers:
            if worker_id in snapshot.heartbeats:
                self._missing_since.pop(worker_id, None)
            else:
                self._missing_since.setdefault(worker_id, now)
        gone = {w for w, since in self._missing_since.items() if now - since >= self.settings.orphan_grace_s}
        if not gone:
            return 0
        running = [j.decode() for j in await self.redis.smembers(Keys.running())]
        if not running:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in running:
                pipe.hget(Keys.job(job_id), "worker")
            owners = await pipe.execute()
        orphans = {j for j, w in zip(running, owners, strict=True) if w is not None and w.decode() in gone}
        if not orphans:
            return 0
        redelivered = 0
        for tag, raw in (await self.redis.hgetall(KOMBU_UNACKED)).items():
            with contextlib.suppress(ValueError, KeyError, TypeError, IndexError):
                message, _exchange, routing_key = json.loads(raw)
                job_id = message["headers"]["id"]
                if job_id not in orphans:
                    continue
                priority = MAX_PRIORITY - int(message["properties"].get("priority") or 0)
                target = redis_list_for(routing_key or DEFAULT_QUEUE, priority)
                if await self._redeliver(
                    keys=[KOMBU_UNACKED, KOMBU_UNACKED_INDEX, target], args=[tag, json.dumps(message)]
                ):
                    redelivered += 1
                    log.warning(
                        "Job %s was running on a worker that is gone; redelivered to %r", job_id, target
                    )
                    if self.metrics is not None:
                        self.metrics.moved.labels("redeliver").inc()
        return redelivered

    def _preload_due(self, preload: Preload, now: float) -> bool:
        sent = self._preloads_sent.get((preload.worker, preload.model))
        return sent is None or now - sent > 60.0

    async def _lease(self) -> bool:
        """One gateway applies a round at a time (each move is atomic anyway; this keeps two
        gateways from stealing for the same idle worker)."""
        key = Keys.rebalance_lock()
        if await self.redis.set(key, self._token, nx=True, px=2000):
            return True
        holder = await self.redis.get(key)
        if holder is not None and holder.decode() == self._token:
            await self.redis.pexpire(key, 2000)
            return True
        return False

    async def _apply_move(self, snapshot: PoolSnapshot, move: Move, now: float) -> bool:
        queued = snapshot.messages.get(move.job.id)
        if queued is None:
            return False
        source_queue = worker_queue(move.source) if move.source else DEFAULT_QUEUE
        suffix = queued.list_key[len(source_queue) :]  # the same priority list in the target
        target_queue = worker_queue(move.target)
        moved = await self._move(
            keys=[queued.list_key, f"{target_queue}{suffix}", Keys.job(move.job.id)],
            args=[move.job.id, queued.payload, target_queue, "back", ""],
        )
        if moved:
            await self.redis.zadd(Keys.worker_queues(), {target_queue: now})
            if self.metrics is not None:
                self.metrics.moved.labels(move.reason).inc()
            log.info("Job %s moved %s -> %s (%s)", move.job.id, source_queue, target_queue, move.reason)
        return bool(moved)

    async def _watch_queues(self, snapshot: PoolSnapshot, now: float) -> None:
        """Keep live workers' queues in the reaper's set; forget queues of workers gone longer
        than the retention once they are empty (a message kombu restores after a crash goes back
        to the queue it was first sent to, so an empty queue is watched a long while)."""
        live = set(snapshot.heartbeats)
        if live:
            await self.redis.zadd(Keys.worker_queues(), {worker_queue(w): now for w in live})
        cutoff = now - self.settings.worker_queue_retention_s
        for raw in await self.redis.zrangebyscore(Keys.worker_queues(), 0, cutoff):
            queue = raw.decode()
            if queue_worker(queue) not in live and snapshot.depths.get(queue, 0) == 0:
                await self.redis.zrem(Keys.worker_queues(), queue)

    async def run(self, stop: asyncio.Event) -> None:
        """The rebalancing loop, every ``rebalance_interval_s`` (0 disables it), until ``stop``."""
        interval = self.settings.rebalance_interval_s
        if interval <= 0:
            return
        while not stop.is_set():
            try:
                await self.tick()
            except Exception as exc:  # Redis down or restarting: try again next round
                log.warning("Rebalancing round failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


def message_job_id(payload: bytes) -> str | None:
    """The job id of a Celery task message (its task id)."""
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return json.loads(payload)["headers"]["id"]
    return None

"""The engine host: a long-lived subprocess that runs jobs on a warm ``EngineRuntime``.

One Celery worker per GPU owns one ``EngineHost``. The engine runs in a child process so that a
crash, a hang or an out-of-memory in a node never takes the worker down, and so that the worker
can always get the GPU back by killing the child.

Process model
    The child is started with multiprocessing's **spawn** method (never fork: a forked CUDA
    context is unusable), as ``worker.host_main.main``. Its first act is ``os.setsid()``: it leads
    its own session and process group (group id = its pid), so ``os.killpg(pid, ...)`` kills it
    and everything it started, and terminal signals sent to the worker's group do not reach it.
    We chose spawn + ``setsid`` in the child over ``subprocess.Popen(start_new_session=True)``
    because multiprocessing gives us pickled messages over a ``Pipe`` and a shared ``Event`` with
    no wire format of our own. The price is a short window before ``setsid`` in which the child is
    still in our group; we only ever signal the child's own group id (never ours), and fall back
    to signalling its pid, so nothing else is hit.

Detecting failures (``run``)
    * crash: the child's process sentinel fires / the pipe hits end-of-file before a result ->
      ``HostCrashed`` with the exit code or signal (SIGKILL usually means ``kill -9`` or the
      kernel's out-of-memory killer).
    * hang: no result by ``deadline_s`` -> the group gets SIGTERM, then SIGKILL after a short
      grace -> ``JobDeadlineExceeded``.
    * out of memory inside a node (MemoryError, torch's OutOfMemoryError, allocator messages):
      the child classifies it and reports an error of type ``out_of_memory`` with a restart
      request -> ``JobFailed`` (retryable), after the child was replaced.
    In every case the host is restarted before the exception propagates: a fresh child is
    launched at once (torch imports while the caller handles the error) and the next ``run``
    waits for it to be ready.

Cancellation
    ``cancel`` (a ``threading.Event``) is watched while the job runs. When it is set, the parent
    sets a multiprocessing Event shared with the child, which the engine's interrupt checks read
    (between nodes and at every ``ctx.progress``): a message on the pipe would not be read while
    the child is busy executing. A child that has not stopped within ``cancel_grace_s`` is killed
    and restarted. Either way ``JobInterrupted`` is raised.

Models
    The child's model manager keeps models warm across jobs. The child reports each load
    (``MODEL_LOADED_EVENT``) and the residency (``MODELS_EVENT``) as events, through the same
    ``on_event`` callback (see ``worker.host_main``); ``preload`` loads a model ahead of a job.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any, Literal

from engine.settings import EngineSettings
from worker.host_io import ProducedOutput
from worker.host_main import OUT_OF_MEMORY, HostConfig
from worker.host_main import main as host_main
from worker.protocol import JobError, JobRecord

__all__ = [
    "OUT_OF_MEMORY",
    "EngineHost",
    "EngineHostError",
    "HostCrashed",
    "HostJob",
    "HostResult",
    "HostStartFailed",
    "HostStatus",
    "JobDeadlineExceeded",
    "JobFailed",
    "JobInterrupted",
    "PreloadFailed",
    "ProducedOutput",
]

log = logging.getLogger(__name__)

Isolation = Literal["shared", "per-job"]
EventCallback = Callable[[str, dict[str, Any]], None]

# How often run() looks at the cancel event while the child works.
_CANCEL_POLL_S = 0.05
# SIGTERM -> SIGKILL grace when killing the child's process group.
_TERM_GRACE_S = 2.0
# How long a child that was asked to exit may take before it is killed.
_EXIT_TIMEOUT_S = 10.0


# -- errors ------------------------------------------------------------------------------------


class EngineHostError(Exception):
    """Base of the engine host's errors: raised when a job produced no result.

    ``retryable`` says whether running the same job again on the (restarted) host may succeed.
    """

    retryable = False


class HostStartFailed(EngineHostError):
    """Raised when the host's child does not become ready: broken settings or node modules, or it
    did not start within ``start_timeout_s``."""


class JobFailed(EngineHostError):
    """Raised when the engine reports the job failed: the prompt failed validation, a node raised,
    or a node ran out of memory (type ``out_of_memory``; the host was restarted and the job may be
    retried).

    ``error`` holds ``type``, ``message``, ``node_id``, ``class_type``, ``traceback`` (and
    ``exception_type`` for node errors); validation errors add ComfyUI's ``error`` and
    ``node_errors``.
    """

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('type')}: {error.get('message')}")
        self.error = error

    @property
    def type(self) -> str:
        return str(self.error.get("type"))

    @property
    def node_id(self) -> str | None:
        return self.error.get("node_id")

    @property
    def class_type(self) -> str | None:
        return self.error.get("class_type")

    @property
    def traceback(self) -> list[str] | None:
        return self.error.get("traceback")

    @property
    def node_errors(self) -> dict[str, Any]:
        return self.error.get("node_errors") or {}

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        return self.type == OUT_OF_MEMORY

    def job_error(self) -> JobError:
        """The error as the job record stores it."""
        return JobError(
            type=self.type,
            message=str(self.error.get("message", "")),
            node_id=self.node_id,
            class_type=self.class_type,
            traceback=self.traceback,
        )


class JobInterrupted(EngineHostError):
    """Raised when a job stopped because it was cancelled. ``restarted`` is True when the child
    did not stop within the grace period and was killed and replaced."""

    def __init__(self, message: str, *, node_id: str | None = None, restarted: bool = False) -> None:
        super().__init__(message)
        self.node_id = node_id
        self.restarted = restarted


class HostCrashed(EngineHostError):
    """Raised when the host's child died while running a job (segfault, ``os._exit``, ``kill -9``,
    the kernel's out-of-memory killer). The host was restarted."""

    retryable = True

    def __init__(self, message: str, *, exitcode: int | None) -> None:
        super().__init__(message)
        self.exitcode = exitcode


class JobDeadlineExceeded(EngineHostError):
    """Raised when a job ran past its deadline: the child's process group was killed and the host
    restarted."""

    retryable = True

    def __init__(self, message: str, *, deadline_s: float) -> None:
        super().__init__(message)
        self.deadline_s = deadline_s


class PreloadFailed(EngineHostError):
    """Raised when a preload did not complete: the model cannot be loaded here (the message says
    why), or the child crashed, ran out of memory or passed the deadline while loading it (it was
    restarted)."""


# -- jobs and results --------------------------------------------------------------------------


@dataclass
class HostJob:
    """One prompt to run. ``outputs_to_execute`` empty means every output node. ``models``: the
    models the gateway routed it by (``folder/name``); the host names the files it loads after
    them (and after the prompt's own model combos)."""

    job_id: str
    tenant: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any] = field(default_factory=dict)
    outputs_to_execute: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)

    @classmethod
    def from_record(cls, record: JobRecord) -> HostJob:
        return cls(
            job_id=record.id,
            tenant=record.tenant,
            prompt=record.prompt,
            extra_data=record.extra_data,
            outputs_to_execute=record.outputs_to_execute,
            models=list(record.models),
        )


@dataclass
class HostResult:
    """What a job produced. ``outputs`` has ComfyUI's history shape; ``produced`` holds the files
    (upload each at ``object_key(tenant, p.subfolder, p.filename)``)."""

    job_id: str
    outputs: dict[str, dict[str, list[Any]]]
    produced: list[ProducedOutput]
    executed: list[str]
    cached: list[str]
    node_seconds: dict[str, float]
    seconds: float
    host_pid: int


@dataclass(frozen=True)
class HostStatus:
    """What the worker's heartbeat reports about its engine host."""

    pid: int | None
    alive: bool
    ready: bool
    busy: bool
    isolation: str
    jobs_run: int
    restarts: int


# -- the child, seen from the parent ------------------------------------------------------------


@dataclass
class _Child:
    pid: int
    process: BaseProcess
    conn: Connection
    interrupt: Any  # multiprocessing Event shared with the child
    reaper: weakref.finalize
    ready: bool = False
    # Set when the process has been reaped and its handle closed.
    final_exitcode: int | None = None
    stopped: bool = False

    def is_alive(self) -> bool:
        try:
            return not self.stopped and self.process.is_alive()
        except ValueError:  # closed by another thread meanwhile
            return False

    @property
    def exitcode(self) -> int | None:
        return self.final_exitcode if self.stopped else self.process.exitcode


def _signal_group(process: BaseProcess, sig: int) -> None:
    """Send ``sig`` to the child's process group, and to the child itself if it has not been
    reaped (it may not have called setsid yet)."""
    pid = process.pid
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    if process.exitcode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` still has a running member.

    Zombies do not count: orphans killed with the group wait for init to reap them, which can take
    a second or more in a container.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True  # no procfs (macOS): trust killpg
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _kill_group_at_exit(pgid: int) -> None:
    """Last resort when the host is garbage-collected or the interpreter exits without close()."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def describe_exit(exitcode: int | None) -> str:
    """``exited with code 3`` / ``was killed by SIGKILL`` / ``ended (exit status unknown)``."""
    if exitcode is None:
        return "ended (exit status unknown)"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (kill -9, or the kernel's out-of-memory killer)" if -exitcode == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {exitcode}"


# -- the host ----------------------------------------------------------------------------------


class EngineHost:
    """Runs jobs in an isolated, long-lived engine subprocess.

    ``isolation="shared"``: one child serves every job, models and the node-output cache stay
    warm. ``isolation="per-job"``: every job runs in a fresh child that exits afterwards (all its
    memory, GPU included, is released); the next child is launched as soon as a job ends.

    One job at a time: ``run`` is called from one thread (the Celery task's). ``status`` may be
    called from any thread (the heartbeat). Create the host in the process that runs the jobs.

    Each child inherits the environment at its launch (``CUDA_VISIBLE_DEVICES``, ``AWS_*``,
    ``HF_*``), restarts included. As with any spawn-started process, a *script* that creates a
    host must guard its entry point with ``if __name__ == "__main__":`` (spawn re-imports the
    parent's main script in the child); console scripts (``celery``, ``kiln``) and ``python -m``
    are fine.
    """

    def __init__(
        self,
        engine_settings: EngineSettings,
        *,
        storage_url: str | None = None,
        storage_options: dict[str, Any] | None = None,
        isolation: Isolation = "shared",
        start_timeout_s: float = 120,
    ) -> None:
        if isolation not in ("shared", "per-job"):
            raise ValueError(f"isolation must be 'shared' or 'per-job', not {isolation!r}")
        self.settings = engine_settings
        self.storage_url = storage_url
        self.storage_options = dict(storage_options or {})
        self.isolation: Isolation = isolation
        self.start_timeout_s = start_timeout_s
        self._mp = multiprocessing.get_context("spawn")
        self._lock = threading.RLock()
        self._child: _Child | None = None
        self._busy = False
        self._closed = False
        self._jobs_run = 0
        self._restarts = 0

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> EngineHost:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start the child if none is running and wait until it is ready (models load lazily, on
        first use); raises HostStartFailed."""
        with self._lock:
            self._ready_child()

    def close(self) -> None:
        """Ask the child to exit, wait for it, then kill whatever is left of its process group."""
        with self._lock:
            self._closed = True
            child, self._child = self._child, None
            if child is not None:
                self._stop(child, graceful=child.ready)

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.pid if child is not None else None

    @property
    def alive(self) -> bool:
        child = self._child
        return child is not None and child.is_alive()

    @property
    def restarts(self) -> int:
        """Children replaced after a crash, a deadline, a cancel that needed a kill, or an OOM."""
        return self._restarts

    @property
    def jobs_run(self) -> int:
        return self._jobs_run

    def status(self) -> HostStatus:
        child = self._child
        return HostStatus(
            pid=child.pid if child is not None else None,
            alive=child is not None and child.is_alive(),
            ready=child is not None and child.ready,
            busy=self._busy,
            isolation=self.isolation,
            jobs_run=self._jobs_run,
            restarts=self._restarts,
        )

    # -- running a job -------------------------------------------------------------------------

    def run(
        self,
        job: HostJob,
        on_event: EventCallback,
        *,
        deadline_s: float,
        cancel: threading.Event | None = None,
        cancel_grace_s: float = 10,
    ) -> HostResult:
        """Run ``job`` in the child; ``on_event(type, data)`` is called from this thread for each
        engine event, in order, as it happens.

        ``deadline_s`` counts from when the job reaches a ready child (a child still starting
        is waited for under ``start_timeout_s``). Raises JobFailed, JobInterrupted, HostCrashed,
        JobDeadlineExceeded or HostStartFailed. If ``run`` is left while the child still works on
        the job (``on_event`` raised, Celery's soft time limit fired), the child is killed and
        restarted and the exception propagates.
        """
        if deadline_s <= 0:
            raise ValueError("deadline_s must be positive")
        with self._lock:
            if self._busy:
                raise RuntimeError("EngineHost.run is not reentrant: one job at a time")
            self._busy = True
            try:
                if cancel is not None and cancel.is_set():
                    raise JobInterrupted(f"Job {job.job_id} was cancelled before it started")
                child = self._ready_child()
                return self._run_on(child, job, on_event, deadline_s, cancel, cancel_grace_s)
            finally:
                self._busy = False

    def _run_on(
        self,
        child: _Child,
        job: HostJob,
        on_event: EventCallback,
        deadline_s: float,
        cancel: threading.Event | None,
        cancel_grace_s: float,
    ) -> HostResult:
        child.interrupt.clear()
        self._jobs_run += 1
        settled = False  # True once the child is idle again, or has been replaced
        try:
            try:
                child.conn.send(("job", job))
            except OSError:
                settled = True
                raise self._crashed(child, job) from None
            deadline = time.monotonic() + deadline_s
            cancelled_at: float | None = None
            while True:
                now = time.monotonic()
                if cancelled_at is None and cancel is not None and cancel.is_set():
                    log.info("Cancelling job %s on engine host pid %s", job.job_id, child.pid)
                    child.interrupt.set()
                    cancelled_at = now
                if cancelled_at is not None and now - cancelled_at >= cancel_grace_s:
                    settled = True
                    self._replace(child, f"job {job.job_id} ignored its cancel for {cancel_grace_s:g}s")
                    raise JobInterrupted(
                        f"Job {job.job_id} was cancelled; it did not stop within {cancel_grace_s:g}s, "
                        "so the engine host was killed and restarted",
                        restarted=True,
                    )
                if now >= deadline:
                    settled = True
                    self._replace(child, f"job {job.job_id} ran past its {deadline_s:g}s deadline")
                    raise JobDeadlineExceeded(
                        f"Job {job.job_id} ran past its deadline of {deadline_s:g}s; "
                        "the engine host was killed and restarted",
                        deadline_s=deadline_s,
                    )
                timeout = deadline - now
                if cancelled_at is not None:
                    timeout = min(timeout, cancelled_at + cancel_grace_s - now)
                elif cancel is not None:
                    timeout = min(timeout, _CANCEL_POLL_S)
                ready = wait([child.conn, child.process.sentinel], max(timeout, 0))
                if not ready:
                    continue
                if not child.conn.poll(0):
                    settled = True
                    raise self._crashed(child, job)
                try:
                    message = child.conn.recv()
                except (EOFError, OSError):
                    settled = True
                    raise self._crashed(child, job) from None
                kind = message[0]
                if kind == "event":
                    on_event(message[1], message[2])
                    continue
                settled = True
                if kind == "result":
                    return message[1]
                if kind == "interrupted":
                    info = message[1]
                    raise JobInterrupted(f"Job {job.job_id} was cancelled", node_id=info.get("node_id"))
                if kind == "error":
                    error, restart = message[1], message[2]
                    if restart:
                        self._replace(child, f"job {job.job_id} failed with {error.get('type')}")
                    raise JobFailed(error)
                settled = False
                raise RuntimeError(f"Unexpected message from the engine host: {kind!r}")
        finally:
            if self._child is child:
                if not settled:
                    self._replace(child, f"run() left job {job.job_id} while the engine host was busy")
                elif self.isolation == "per-job":
                    # The next child imports torch while this one exits; it touches no GPU memory
                    # before its first job, and this one is gone before run() returns.
                    self._child = None if self._closed else self._launch()
                    self._stop(child, graceful=True)

    # -- preloading a model ------------------------------------------------------------------

    def preload(
        self,
        model: str,
        on_event: EventCallback,
        *,
        deadline_s: float,
        cancel: threading.Event | None = None,
    ) -> None:
        """Load ``model`` (``folder/name``) into the child's model manager ahead of a job (the
        router's preload request); ``on_event`` gets the model events, from this thread.

        Waits for a running job to end first (one thing at a time). A load cannot be interrupted:
        ``cancel`` (the worker stopping) kills the child, the next use starts a fresh one. Raises
        PreloadFailed (after replacing the child if it crashed, ran out of memory or passed
        ``deadline_s``) or HostStartFailed.
        """
        with self._lock:
            if self._busy:
                raise RuntimeError("EngineHost.preload is not reentrant: one thing at a time")
            self._busy = True
            try:
                child = self._ready_child()
                self._preload_on(child, model, on_event, deadline_s, cancel)
            finally:
                self._busy = False

    def _preload_on(
        self,
        child: _Child,
        model: str,
        on_event: EventCallback,
        deadline_s: float,
        cancel: threading.Event | None,
    ) -> None:
        settled = False
        try:
            with contextlib.suppress(OSError):  # a dead child shows below as end-of-file
                child.conn.send(("preload", model))
            deadline = time.monotonic() + deadline_s
            while True:
                remaining = deadline - time.monotonic()
                if cancel is not None and cancel.is_set():
                    settled = True
                    self._discard(child)
                    raise PreloadFailed(f"Preloading {model} was cancelled; the host was stopped")
                if remaining <= 0:
                    settled = True
                    self._replace(child, f"preloading {model} took over {deadline_s:g}s")
                    raise PreloadFailed(f"Preloading {model} took over {deadline_s:g}s; the host restarted")
                timeout = min(remaining, _CANCEL_POLL_S) if cancel is not None else remaining
                if not wait([child.conn, child.process.sentinel], timeout):
                    continue
                try:
                    message = child.conn.recv() if child.conn.poll(0) else None
                except (EOFError, OSError):
                    message = None
                if message is None:
                    settled = True
                    child.process.join(_TERM_GRACE_S)
                    how = describe_exit(child.process.exitcode)
                    self._replace(child, f"it {how} while preloading {model}")
                    raise PreloadFailed(f"Engine host pid {child.pid} {how} while preloading {model}")
                if message[0] == "event":
                    on_event(message[1], message[2])
                    continue
                if message[0] != "preloaded":
                    raise RuntimeError(f"Unexpected message from the engine host: {message[0]!r}")
                settled = True
                info = message[1]
                if info.get("restart"):
                    self._replace(child, f"preloading {model} failed: {info.get('error')}")
                if info.get("error"):
                    raise PreloadFailed(f"Preloading {model} failed: {info['error']}")
                return
        finally:
            if self._child is child and not settled:
                self._replace(child, f"preload() left {model} while the engine host was busy")

    def _crashed(self, child: _Child, job: HostJob) -> HostCrashed:
        child.process.join(_TERM_GRACE_S)
        exitcode = child.process.exitcode
        self._replace(child, f"it {describe_exit(exitcode)} while running job {job.job_id}")
        return HostCrashed(
            f"Engine host pid {child.pid} {describe_exit(exitcode)} while running job {job.job_id}; "
            "it was restarted",
            exitcode=exitcode,
        )

    # -- children --------------------------------------------------------------------------

    def _ready_child(self) -> _Child:
        if self._closed:
            raise RuntimeError("EngineHost is closed")
        child = self._child
        if child is not None and not child.is_alive():
            self._child = None
            self._stop(child, graceful=False)
            if child.ready:
                self._restarts += 1
                log.warning(
                    "Engine host pid %s %s while idle; starting a new one",
                    child.pid,
                    describe_exit(child.exitcode),
                )
            child = None
        if child is None:
            child = self._child = self._launch()
        if not child.ready:
            self._await_ready(child)
        return child

    def _launch(self) -> _Child:
        parent_conn, child_conn = self._mp.Pipe(duplex=True)
        interrupt = self._mp.Event()
        config = HostConfig(
            settings=self.settings,
            storage_url=self.storage_url,
            storage_options=self.storage_options,
            one_shot=self.isolation == "per-job",
            sys_path=list(sys.path),
            parent_pid=os.getpid(),
            log_level=logging.getLogger().getEffectiveLevel(),
        )
        # daemon: multiprocessing's exit handler terminates it rather than waiting for it forever.
        process = self._mp.Process(
            target=host_main, args=(config, child_conn, interrupt), name="kiln-engine-host", daemon=True
        )
        process.start()
        child_conn.close()  # so that the child's death shows as end-of-file on our end
        assert process.pid is not None
        reaper = weakref.finalize(self, _kill_group_at_exit, process.pid)
        log.info("Started engine host pid %s (%s isolation)", process.pid, self.isolation)
        return _Child(pid=process.pid, process=process, conn=parent_conn, interrupt=interrupt, reaper=reaper)

    def _await_ready(self, child: _Child) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._discard(child)
                raise HostStartFailed(
                    f"Engine host pid {child.pid} did not start within {self.start_timeout_s:g}s"
                )
            if not wait([child.conn, child.process.sentinel], remaining):
                continue
            try:
                message = child.conn.recv() if child.conn.poll(0) else None
            except (EOFError, OSError):
                message = None
            if message is None:
                child.process.join(_TERM_GRACE_S)
                self._discard(child)
                raise HostStartFailed(
                    f"Engine host pid {child.pid} {describe_exit(child.exitcode)} while starting"
                )
            if message[0] == "ready":
                child.ready = True
                return
            if message[0] == "fatal":
                self._discard(child)
                error = message[1]
                raise HostStartFailed(
                    f"Engine host failed to start: {error['exception_type']}: {error['message']}"
                )

    def _discard(self, child: _Child) -> None:
        if self._child is child:
            self._child = None
        self._stop(child, graceful=False)

    def _replace(self, child: _Child, reason: str) -> None:
        """Kill ``child`` (whole process group) and launch a new one without waiting for it."""
        log.warning("Restarting engine host pid %s: %s", child.pid, reason)
        if self._child is child:
            self._child = None
        self._stop(child, graceful=False)
        self._restarts += 1
        if not self._closed:
            self._child = self._launch()

    def _stop(self, child: _Child, *, graceful: bool) -> None:
        """End ``child`` and anything left in its process group.

        Graceful: ask it to exit and give it ``_EXIT_TIMEOUT_S``. Then (or at once) SIGTERM the
        group, wait up to ``_TERM_GRACE_S`` for the group to empty, and SIGKILL what is left.
        """
        process = child.process
        if graceful and process.exitcode is None:
            with contextlib.suppress(OSError):
                child.conn.send(("shutdown",))
            process.join(_EXIT_TIMEOUT_S)
        pid = child.pid
        if process.exitcode is None or _group_alive(pid):
            _signal_group(process, signal.SIGTERM)
            grace_ends = time.monotonic() + _TERM_GRACE_S
            process.join(_TERM_GRACE_S)
            while _group_alive(pid) and time.monotonic() < grace_ends:
                time.sleep(0.02)
            _signal_group(process, signal.SIGKILL)
            process.join(_EXIT_TIMEOUT_S)
        child.reaper.detach()
        child.conn.close()
        if process.exitcode is not None:
            child.final_exitcode = process.exitcode
            child.stopped = True
            process.close()

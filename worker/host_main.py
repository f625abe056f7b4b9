"""The engine host's child process: builds one ``EngineRuntime`` and runs the jobs its parent sends.

``worker.engine_host.EngineHost`` starts ``main`` with multiprocessing's *spawn* method. The parent
imports this module to name ``main`` as the process target, so its top-level imports stay light:
the engine (and torch) are imported inside ``main``, in the child only.

Messages on the pipe, parent -> child: ``("job", HostJob)``, ``("preload", "folder/name")``,
``("shutdown",)``. Child -> parent: ``("ready", info)`` or ``("fatal", error)`` once at start; then
per job any number of ``("event", type, data)``, ending with one of ``("result", HostResult)``,
``("error", error, restart)`` or ``("interrupted", info)``; per preload any number of events, then
``("preloaded", {"model", "error", "restart"})``. Interruption does not travel on the pipe (the
child does not read it while a job runs): the parent sets a shared multiprocessing Event that the
engine's interrupt checks read.

Model events: the model manager records its loads; before each engine event, and before a job's or
preload's last message, the child sends the new ones (``MODEL_LOADED_EVENT``) and then the
residency (``MODELS_EVENT``: after loads, and at the end when it changed), so the worker counts
real loads as they happen (``worker.host_io.ModelReporter``).
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from engine.errors import ExecutionInterrupted, KilnError, NodeExecutionError, PromptValidationError
from engine.interrupt import InterruptFlag
from engine.settings import EngineSettings

if TYPE_CHECKING:
    from engine.models.manager import ModelManager
    from engine.registry import NodeRegistry
    from engine.runtime import EngineRuntime
    from engine.validation import ValidatedPrompt
    from worker.engine_host import HostJob
    from worker.host_io import MemorySink, ModelReporter, StorageInputResolver

log = logging.getLogger(__name__)

OUT_OF_MEMORY = "out_of_memory"
_OOM_MARKERS = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "cublas_status_alloc_failed",
)
_PARENT_CHECK_S = 1.0


@dataclass(frozen=True)
class HostConfig:
    """Everything the child needs, pickled to it at start.

    ``sys_path`` is the parent's ``sys.path``: the child imports ``settings.node_modules`` by name,
    and those may only be importable through entries the parent added at run time (pytest's
    rootdir, a Celery ``--workdir``) that a fresh interpreter does not have. multiprocessing's
    spawn happens to copy ``sys.path`` today, but that is its internal detail; we pass it
    explicitly and apply it before importing any node module.
    """

    settings: EngineSettings
    storage_url: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    # Per-job isolation: run one job, then exit (all GPU memory goes with the process).
    one_shot: bool = False
    sys_path: list[str] = field(default_factory=list)
    parent_pid: int = 0
    log_level: int = logging.WARNING


def main(config: HostConfig, conn: Connection, interrupt_event: Any) -> None:
    """Child entry point: serve jobs from ``conn`` until told to stop or the parent goes away."""
    _new_session()
    sys.path[:] = [*config.sys_path, *(p for p in sys.path if p not in config.sys_path)]
    _configure_logging(config.log_level)
    _watch_parent(config.parent_pid)
    try:
        host = ChildHost.build(config, SharedInterrupt(interrupt_event))
    except Exception as exc:
        log.exception("Engine host failed to start")
        conn.send(("fatal", _exception_error("host_start_failed", exc)))
        conn.close()
        raise SystemExit(1) from None
    conn.send(("ready", {"pid": os.getpid()}))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            log.warning("Engine host: the parent closed the pipe; exiting")
            break
        if message[0] == "shutdown":
            break
        if message[0] == "job":
            host.run(message[1], conn)
            if config.one_shot:
                break
        elif message[0] == "preload":
            host.preload(message[1], conn)
        else:
            log.warning("Engine host: unknown message %r", message[0])
    conn.close()


def _new_session() -> None:
    """Become the leader of a new session and process group (id = our pid), first thing.

    The parent then kills the whole group (``killpg``): anything the engine started (helper
    processes, compilers) dies with it. It also keeps terminal signals (Ctrl-C to the worker)
    away from us: the parent decides when we stop.
    """
    try:
        os.setsid()
    except OSError as exc:  # already a group leader: cannot happen under spawn, harmless if so
        log.warning("Engine host could not start a new session: %s", exc)


def _configure_logging(level: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s [engine-host %(process)d] %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)


def _watch_parent(parent_pid: int) -> None:
    """Kill our whole process group if the parent dies without closing us (kill -9 of the worker):
    an orphaned host would hold the GPU forever."""
    if not parent_pid:
        return

    def watch() -> None:
        while True:
            time.sleep(_PARENT_CHECK_S)
            if os.getppid() != parent_pid:
                os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="kiln-parent-watch", daemon=True).start()


class SharedInterrupt(InterruptFlag):
    """The engine's interrupt flag over a multiprocessing Event that the parent sets."""

    def __init__(self, event: Any) -> None:
        super().__init__()
        self._shared = event

    def request(self) -> None:
        self._shared.set()

    def clear(self) -> None:
        self._shared.clear()

    @property
    def requested(self) -> bool:
        return self._shared.is_set()

    def check(self) -> None:
        if self._shared.is_set():
            raise ExecutionInterrupted()


class PipeSink:
    """An EventSink that sends each engine event to the parent as it happens, after the model
    loads that happened before it (when given a ``ModelReporter``)."""

    def __init__(self, conn: Connection, models: ModelReporter | None = None) -> None:
        self._conn = conn
        self._models = models

    def emit(self, event: str, data: dict[str, Any]) -> None:
        self.send_models()
        self._conn.send(("event", event, data))

    def send_models(self, *, residency: bool = False) -> None:
        """New loads, then the residency (``ModelReporter.events``). A failing report is logged,
        never raised: the job's own messages matter more."""
        if self._models is None:
            return
        try:
            events = self._models.events(residency=residency)
        except Exception:
            log.exception("Engine host could not report its models")
            return
        for event, data in events:
            self._conn.send(("event", event, data))


class ChildHost:
    """One warm runtime and its in-memory sink and storage resolver; runs one job at a time."""

    def __init__(
        self,
        runtime: EngineRuntime,
        outputs: MemorySink,
        inputs: StorageInputResolver | None,
        interrupt: InterruptFlag,
    ) -> None:
        from worker.host_io import ModelReporter

        self.runtime = runtime
        self.outputs = outputs
        self.inputs = inputs
        self.interrupt = interrupt
        self.models = ModelReporter(runtime.models)

    @classmethod
    def build(cls, config: HostConfig, interrupt: InterruptFlag) -> ChildHost:
        from engine.inventory import FolderInventory
        from engine.registry import default_registry
        from worker.host_io import MemorySink, StorageInputResolver, TenantInventory
        from worker.storage import storage_from_url

        settings = config.settings
        # Node modules first: a broken one fails the start before torch is imported.
        registry = default_registry(settings.node_modules)
        outputs = MemorySink()
        inputs = None
        inventory = None
        if config.storage_url:
            storage = storage_from_url(config.storage_url, **config.storage_options)
            inputs = StorageInputResolver(storage, max_bytes=settings.max_image_bytes)
            inventory = TenantInventory(inputs, FolderInventory(settings.input_dir, settings.models_dirs))

        from engine.runtime import EngineRuntime

        runtime = EngineRuntime(
            settings, registry=registry, outputs=outputs, inputs=inputs, inventory=inventory
        )
        return cls(runtime, outputs, inputs, interrupt)

    def run(self, job: HostJob, conn: Connection) -> None:
        """Run ``job``, streaming its events; end with one result, error or interrupted message."""
        from worker.engine_host import HostResult

        reply: tuple[Any, ...]
        self.outputs.begin(job.job_id)
        events = PipeSink(conn, self.models)
        self.models.expect(job.models)
        scope: AbstractContextManager[Any] = (
            self.inputs.bound(job.tenant) if self.inputs is not None else nullcontext()
        )
        try:
            with scope:
                validated = restrict_outputs(self.runtime.validate(job.prompt), job.outputs_to_execute)
                self.models.expect([*job.models, *prompt_models(validated, self.runtime.registry)])
                result = self.runtime.execute(
                    job.prompt,
                    prompt_id=job.job_id,
                    extra_data=job.extra_data,
                    events=events,
                    interrupt=self.interrupt,
                    validated=validated,
                )
            reply = (
                "result",
                HostResult(
                    job_id=job.job_id,
                    outputs=result.outputs,
                    produced=self.outputs.drain(),
                    executed=result.executed,
                    cached=result.cached,
                    node_seconds=result.node_seconds,
                    seconds=result.seconds,
                    host_pid=os.getpid(),
                ),
            )
        except PromptValidationError as exc:
            reply = ("error", validation_error(exc), False)
        except ExecutionInterrupted as exc:
            reply = ("interrupted", {"node_id": exc.node_id, "class_type": exc.class_type})
        except NodeExecutionError as exc:
            error = exc.to_dict()
            oom = node_ran_out_of_memory(exc)
            if oom:
                error["type"] = OUT_OF_MEMORY
                error["message"] = error["message"] or exc.exception_type
            reply = ("error", error, oom)
        except KilnError as exc:
            reply = (
                "error",
                {**exc.to_dict(), "node_id": None, "class_type": None, "traceback": None},
                False,
            )
        except Exception as exc:
            # A bug outside the nodes: the host's state is unknown, so the parent restarts it.
            log.exception("Engine host failed running job %s", job.job_id)
            oom = is_out_of_memory(exc)
            reply = ("error", _exception_error(OUT_OF_MEMORY if oom else "host_error", exc), True)
        finally:
            self.outputs.drain()
        events.send_models(residency=True)
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            log.exception("Engine host could not send the result of job %s", job.job_id)
            conn.send(("error", _exception_error("host_error", exc), True))

    def preload(self, model: str, conn: Connection) -> None:
        """Load ``model`` (``folder/name``) into the model manager ahead of a job; end with one
        ``("preloaded", {"model", "error", "restart"})``."""
        events = PipeSink(conn, self.models)
        self.models.expect([model])
        info: dict[str, Any] = {"model": model, "error": None, "restart": False}
        try:
            preload_model(self.runtime.models, model)
        except Exception as exc:
            if not isinstance(exc, KilnError):
                log.exception("Engine host failed preloading %s", model)
            oom = is_out_of_memory(exc)
            info.update(error=f"{type(exc).__name__}: {exc}", restart=oom)
        events.send_models(residency=True)
        conn.send(("preloaded", info))


# Model folders whose files can be preloaded -> the manager's loader (their canonical names).
_PRELOADERS = {
    "checkpoints": "load_checkpoint",
    "diffusion_models": "load_diffusion_model",
    "text_encoders": "load_text_encoder",
    "upscale_models": "load_upscale_model",
    "vae": "load_vae",
}


def preload_model(manager: ModelManager, model: str) -> None:
    """Load every part of ``model`` (``folder/name``, the router's name) onto the device when it
    fits, as its loader node would; raises ModelError for a folder that has no loader here."""
    from engine.errors import ModelError
    from engine.models.known_models import canonical_folder

    folder, _, name = model.partition("/")
    loader = getattr(manager, _PRELOADERS.get(canonical_folder(folder), ""), None) if folder else None
    if loader is None or not name:
        raise ModelError(f"{model!r} cannot be preloaded: only {', '.join(sorted(_PRELOADERS))} can")
    loaded = loader(manager.resolve(folder, name), preload=False)
    for handle in loaded if isinstance(loaded, tuple) else (loaded,):
        if handle is not None:
            manager.preload(handle)


def prompt_models(validated: ValidatedPrompt, registry: NodeRegistry) -> list[str]:
    """Model files a validated prompt names, as ``folder/name``: its model combos' values (the
    gateway's rule, api/submit.py ``models_needed``)."""
    from engine.schema import ChoiceSource

    needed: list[str] = []
    for node in validated.prompt.values():
        spec = registry.get(node["class_type"])
        for declared in spec.declared_inputs if spec is not None else ():
            value, kind = node["inputs"].get(declared.name), declared.choices
            if isinstance(kind, ChoiceSource) and kind.kind.startswith("models:") and isinstance(value, str):
                needed.append(f"{kind.kind.removeprefix('models:')}/{value}")
    return needed


def restrict_outputs(validated: ValidatedPrompt, wanted: list[str]) -> ValidatedPrompt:
    """Keep only the nodes that the output nodes in ``wanted`` need (all outputs when empty).

    The prompt was validated whole; an output that failed validation is an error only when it is
    wanted.
    """
    if not wanted:
        return validated
    from engine.validation import ValidatedPrompt, prompt_error

    failed = [output for output in wanted if output not in validated.outputs]
    if failed:
        node_errors = {
            node_id: entry
            for node_id, entry in validated.node_errors.items()
            if set(entry.get("dependent_outputs", ())) & set(failed)
        }
        if node_errors:
            raise PromptValidationError(
                prompt_error("prompt_outputs_failed_validation", "Prompt outputs failed validation"),
                node_errors,
            )
        raise PromptValidationError(
            prompt_error(
                "prompt_no_outputs",
                "Requested outputs are not output nodes of this prompt",
                ", ".join(failed)[:200],
            )
        )
    prompt = validated.prompt
    needed: set[str] = set()
    stack = list(wanted)
    while stack:
        node_id = stack.pop()
        if node_id in needed:
            continue
        needed.add(node_id)
        for value in prompt[node_id]["inputs"].values():
            if isinstance(value, list):
                stack.append(value[0])
    return ValidatedPrompt(
        prompt={node_id: node for node_id, node in prompt.items() if node_id in needed},
        outputs=[output for output in validated.outputs if output in wanted],
        node_errors={},
        cost=validated.cost,
    )


def validation_error(exc: PromptValidationError) -> dict[str, Any]:
    """The error dict of a prompt that failed validation: ComfyUI's ``error`` and ``node_errors``."""
    details = exc.error.get("details") or ""
    message = str(exc.error.get("message", "Prompt failed validation"))
    node_id = next(iter(exc.node_errors), None)
    return {
        "type": PromptValidationError.type_name,
        "message": f"{message}: {details}" if details else message,
        "node_id": node_id,
        "class_type": exc.node_errors[node_id].get("class_type") if node_id is not None else None,
        "traceback": None,
        "error": exc.error,
        "node_errors": exc.node_errors,
    }


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, torch's OutOfMemoryError (CUDA, MPS, ...) or an allocator's out-of-memory text."""
    if isinstance(exc, MemoryError):
        return True
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in _OOM_MARKERS)


def node_ran_out_of_memory(exc: NodeExecutionError) -> bool:
    if exc.__cause__ is not None:
        return is_out_of_memory(exc.__cause__)
    name = exc.exception_type.rsplit(".", 1)[-1]
    text = exc.exception_message.lower()
    return name in ("MemoryError", "OutOfMemoryError") or any(marker in text for marker in _OOM_MARKERS)


def _exception_error(type_: str, exc: BaseException) -> dict[str, Any]:
    return {
        "type": type_,
        "message": str(exc) or type(exc).__name__,
        "node_id": None,
        "class_type": None,
        "exception_type": type(exc).__qualname__,
        "traceback": traceback.format_exception(exc),
    }

"""The engine host's I/O: produced files kept in memory for the worker to upload, inputs read
from object storage under a per-tenant prefix, and the model manager's loads and residency reported
to the worker.

All run inside the engine host's child process (``worker.host_main``); the first two implement the
engine's ``OutputSink`` and ``InputResolver`` protocols. This module is torch-free: the parent
imports it for ``ProducedOutput`` and ``MODELS_EVENT``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from engine.errors import InputNotFoundError, KilnError, UnsafePathError
from engine.inventory import IMAGE_EXTENSIONS, Inventory
from engine.io import OutputKind, OutputRequest, SavedOutput, split_prefix
from engine.paths import safe_relative
from worker.protocol import MODEL_LOADED_EVENT
from worker.storage import ObjectNotFound, Storage, object_key

if TYPE_CHECKING:
    from engine.models.manager import ModelManager

# Host -> worker only (the runner keeps it from clients): the model manager's residency, sent after
# new loads and after every job and preload. Data: ``ModelReporter.snapshot()``.
MODELS_EVENT = "kiln_models"

# ComfyUI lets an image name carry its folder: "cat.png [input]". Only uploads live in storage.
_ANNOTATION = re.compile(r"^(.*) \[(input|output|temp)\]$")
_UNSAFE_STEM_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class ProducedOutput:
    """One file a job produced, with its bytes: what the worker uploads.

    ``filename`` and ``subfolder`` are what history and ``executed`` events show; the object key
    is ``object_key(tenant, subfolder, filename)`` = ``TENANT/JOB_ID/NODE_ID_INDEX.EXT``.
    """

    node_id: str
    index: int
    filename: str
    subfolder: str
    type: OutputKind
    content_type: str
    data: bytes = field(repr=False)
    sha256: str

    @property
    def size(self) -> int:
        return len(self.data)


class MemorySink:
    """An ``OutputSink`` that keeps each produced file in memory until the job's result is sent.

    Files are named ``NODE_ID_INDEX.EXT`` in subfolder ``JOB_ID`` (deterministic: a retried job
    writes the same keys and never duplicates). The ``filename_prefix`` a node asks for is checked
    (no traversal, as the local sink does) but not used in the name. Indices that repeat within a
    job (a node run once per item of a list input) move up to the next free one.
    """

    def __init__(self) -> None:
        self._job_id = ""
        self._produced: list[ProducedOutput] = []
        self._names: set[str] = set()

    def begin(self, job_id: str) -> None:
        """Start collecting the files of ``job_id`` (drops anything left from an earlier job)."""
        self._job_id = job_id
        self._produced = []
        self._names = set()

    def save(self, request: OutputRequest, data: bytes) -> SavedOutput:
        split_prefix(request.filename_prefix)
        stem = _UNSAFE_STEM_CHARS.sub("_", request.node_id)
        index = request.index
        filename = f"{stem}_{index}.{request.extension}"
        while filename in self._names:
            index += 1
            filename = f"{stem}_{index}.{request.extension}"
        self._names.add(filename)
        digest = hashlib.sha256(data).hexdigest()
        self._produced.append(
            ProducedOutput(
                node_id=request.node_id,
                index=index,
                filename=filename,
                subfolder=self._job_id,
                type=request.kind,
                content_type=request.content_type,
                data=data,
                sha256=digest,
            )
        )
        return SavedOutput(
            filename=filename,
            subfolder=self._job_id,
            type=request.kind,
            node_id=request.node_id,
            index=index,
            location=f"memory:{self._job_id}/{filename}",
            content_type=request.content_type,
            bytes=len(data),
            sha256=digest,
        )

    def drain(self) -> list[ProducedOutput]:
        """The files produced since ``begin``, in order; the sink is empty afterwards."""
        produced = self._produced
        self._produced = []
        self._names = set()
        return produced


class StorageInputResolver:
    """An ``InputResolver`` over object storage: a tenant's uploads at ``TENANT/inputs/NAME``.

    The host runs one job at a time and binds the job's tenant around it with ``bound(tenant)``;
    outside a binding nothing can be read. Names are checked with ``engine.paths`` (no traversal,
    no absolute paths) and objects over ``max_bytes`` are refused. The fingerprint is the object's
    sha256, so cached results are reused only for identical bytes (never across different
    content, whichever tenant asks). Bytes read for a fingerprint are kept until the binding ends:
    a LoadImage reads its object once per job.
    """

    def __init__(self, storage: Storage, *, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.storage = storage
        self.max_bytes = max_bytes
        self._tenant: str | None = None
        self._read_cache: dict[str, bytes] = {}

    @contextmanager
    def bound(self, tenant: str) -> Iterator[StorageInputResolver]:
        """Read ``tenant``'s uploads inside the ``with`` block."""
        if not tenant or safe_relative(tenant) != tenant or "/" in tenant:
            raise UnsafePathError(f"Tenant id {tenant!r} cannot name a storage prefix")
        self._tenant = tenant
        self._read_cache = {}
        try:
            yield self
        finally:
            self._tenant = None
            self._read_cache = {}

    def _prefix(self) -> str:
        if self._tenant is None:
            raise InputNotFoundError("No tenant is bound: inputs can only be read while a job runs")
        return object_key(self._tenant, "inputs")

    def key(self, name: str) -> str:
        """The object key of input ``name`` for the bound tenant; raises UnsafePathError."""
        match = _ANNOTATION.match(name)
        if match:
            if match.group(2) != "input":
                raise InputNotFoundError(f"Only uploaded inputs can be read here, not {name!r}")
            name = match.group(1)
        relative = safe_relative(name)
        if not relative:
            raise InputNotFoundError("An input file name is empty")
        return f"{self._prefix()}/{relative}"

    def read(self, name: str) -> bytes:
        key = self.key(name)
        data = self._read_cache.get(key)
        if data is None:
            try:
                data = self.storage.get(key)
            except ObjectNotFound:
                raise InputNotFoundError(f"Input file not found: {name!r}") from None
            if len(data) > self.max_bytes:
                raise InputNotFoundError(
                    f"Input file {name!r} is {len(data)} bytes; the limit is {self.max_bytes}"
                )
            self._read_cache[key] = data
        return data

    def fingerprint(self, name: str) -> str:
        return "sha256:" + hashlib.sha256(self.read(name)).hexdigest()

    def list_images(self) -> list[str]:
        if self._tenant is None:
            return []
        prefix = self._prefix() + "/"
        names = []
        for key in self.storage.list(prefix):
            if not key.startswith(prefix):
                continue
            name = key[len(prefix) :]
            if any(part.startswith(".") for part in name.split("/")):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                names.append(name)
        return sorted(names)


class TenantInventory:
    """What validation in the host may name: input images are the bound tenant's uploads; every
    other kind (model folders) comes from ``others``."""

    def __init__(self, inputs: StorageInputResolver, others: Inventory) -> None:
        self.inputs = inputs
        self.others = others

    def list_choices(self, kind: str) -> list[str]:
        if kind == "input_images":
            return self.inputs.list_images()
        return list(self.others.list_choices(kind))


class ModelReporter:
    """Turns the model manager's records into the worker's model events, in the engine host.

    ``loads()``: one ``MODEL_LOADED_EVENT`` (worker.protocol) per file among the loads since the
    last call (the parts of a checkpoint loaded together are one load of it, their seconds and
    bytes summed). ``snapshot()``: what is resident, for ``MODELS_EVENT``. Models carry the names
    the router gives what a prompt needs, ``folder/name`` (``checkpoints/x.safetensors``,
    api/submit.py); the manager knows files by content hash, so a hash is named by the models the
    current job names (``expect``) whose file has that hash, else by its file name.
    """

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager
        self._names: dict[str, list[str]] = {}  # content hash -> model names
        self._sizes: dict[str, int] = {}  # content hash -> bytes once loaded (largest seen)
        self._parts: dict[str, set[str]] = {}  # content hash -> parts ever loaded from the file
        self._expected: list[str] = []
        self._last: dict[str, Any] | None = None  # the newest load record already reported
        self._sent = self.snapshot()  # the residency the worker knows (nothing at first)

    def expect(self, models: Iterable[str]) -> None:
        """The models (``folder/name``) the next job or preload names."""
        self._expected = list(dict.fromkeys(models))

    def events(self, *, residency: bool = False) -> list[tuple[str, dict[str, Any]]]:
        """The new loads, then the residency: after any load, or when asked (``residency``) and it
        changed since it was last sent. Cheap when nothing happened (once per engine event)."""
        loads = self.loads()
        events = [(MODEL_LOADED_EVENT, load) for load in loads]
        if loads or residency:
            snapshot = self.snapshot()
            if loads or snapshot != self._sent:
                events.append((MODELS_EVENT, snapshot))
                self._sent = snapshot
        return events

    def loads(self) -> list[dict[str, Any]]:
        """``MODEL_LOADED_EVENT`` data for each file loaded since the last call."""
        records = self.manager.load_stats()  # oldest first, the manager's last 64
        new = records
        if self._last is not None:
            seen = next((i for i in range(len(records) - 1, -1, -1) if records[i] == self._last), -1)
            new = records[seen + 1 :]
        if not new:
            return []
        self._last = records[-1]
        files: dict[str, dict[str, Any]] = {}
        for record in new:
            item = files.setdefault(
                record["content_hash"], {"file": record["file"], "seconds": 0.0, "bytes": 0, "parts": []}
            )
            item["seconds"] += float(record["seconds"])
            item["bytes"] += int(record["bytes"])
            item["parts"].append(record["part"])
        events = []
        for content_hash, item in files.items():
            self._sizes[content_hash] = max(self._sizes.get(content_hash, 0), item["bytes"])
            self._parts.setdefault(content_hash, set()).update(item["parts"])
            events.append(
                {
                    "model": self.names(content_hash, item["file"])[0],
                    "seconds": round(item["seconds"], 6),
                    "hash": content_hash,
                    "bytes": item["bytes"],
                    "parts": item["parts"],
                }
            )
        return events

    def snapshot(self) -> dict[str, Any]:
        """``resident``: ``[{name, hash, parts, bytes, where}]``, least recently used first (the
        router's order), ``where`` = ``device`` when any part is on the device, else ``host``;
        ``slots``: how many models of the usual size fit the budgets (None before the first
        load); ``budget`` and ``used``: bytes of the device and host tiers.

        A file counts as resident while every part ever loaded from it is: one whose UNet was
        evicted and whose VAE stayed still costs a load.
        """
        files: dict[str, dict[str, Any]] = {}
        for entry in self.manager.resident():  # most recently used first
            content_hash = entry["content_hash"]
            item = files.setdefault(
                content_hash,
                {"hash": content_hash, "file": entry["file"], "parts": [], "bytes": 0, "where": "host"},
            )
            item["parts"].append(entry["part"])
            item["bytes"] += int(entry["bytes"])
            if entry["where"] == "device":
                item["where"] = "device"
        resident: dict[str, dict[str, Any]] = {}
        for item in reversed(files.values()):
            content_hash = item["hash"]
            self._sizes[content_hash] = max(self._sizes.get(content_hash, 0), item["bytes"])
            if not self._parts.setdefault(content_hash, set()).issubset(item["parts"]):
                continue
            item["parts"].sort()  # in the manager's use order: noise here
            for name in self.names(content_hash, item.pop("file")):
                resident.pop(name, None)  # a name whose file changed: the newer content wins
                resident[name] = {"name": name, **item}
        budget = {"device": self.manager.device_budget, "host": self.manager.host_budget}
        # Models in host RAM count as resident (moving one back is far cheaper than reading its
        # file), so both tiers hold slots; the router evicts least recently used models past it.
        usual = sum(self._sizes.values()) / len(self._sizes) if self._sizes else 0
        slots = max(1, int((budget["device"] + budget["host"]) // usual)) if usual else None
        return {
            "resident": list(resident.values()),
            "slots": slots,
            "budget": budget,
            "used": self.manager.memory_used(),
        }

    def names(self, content_hash: str, file: str) -> list[str]:
        """The model names of a loaded file: those of the expected models with that content."""
        if not self._names.get(content_hash):
            self._learn(content_hash, file)
        return self._names.get(content_hash) or [file]

    def _learn(self, content_hash: str, file: str) -> None:
        """Hash the expected models' files until one has ``content_hash``, those named ``file``
        first (the hasher caches by path, size and mtime: a file its loader hashed costs nothing)."""
        hub = self.manager.hub
        if hub is None:
            return
        for model in sorted(self._expected, key=lambda m: PurePosixPath(m).name != file):
            folder, _, name = model.partition("/")
            try:
                path = hub.find_local(folder, name)  # never a download
                digest = self.manager.hasher.content_hash(path) if path is not None else None
            except (KilnError, OSError):
                continue
            if digest is None:
                continue
            for names in self._names.values():
                if model in names:
                    names.remove(model)  # the file under this name changed
            self._names.setdefault(digest, []).append(model)
            if digest == content_hash:
                return

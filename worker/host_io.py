"""The engine host's I/O: produced files kept in memory for the worker to upload, and inputs read
from object storage under a per-tenant prefix.

Both run inside the engine host's child process (``worker.host_main``) and implement the engine's
``OutputSink`` and ``InputResolver`` protocols. This module is torch-free: the parent imports it for
``ProducedOutput``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from engine.errors import InputNotFoundError, UnsafePathError
from engine.inventory import IMAGE_EXTENSIONS, Inventory
from engine.io import OutputKind, OutputRequest, SavedOutput, split_prefix
from engine.paths import safe_relative
from worker.storage import ObjectNotFound, Storage, object_key

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

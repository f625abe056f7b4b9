"""What the gateway holds for its lifetime: Redis, storage, the node catalogue, metrics."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess

from api.jobs import GatewayJobs
from api.routing import RoutingService, load_routing_settings
from api.settings import GatewaySettings
from engine.inventory import FolderInventory, StaticInventory
from engine.registry import NodeRegistry
from engine.schema import ChoiceSource
from engine.settings import EngineSettings
from worker.protocol import Keys
from worker.storage import Storage


@dataclass
class Metrics:
    """The gateway's Prometheus metrics, in a registry of its own (no global state)."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.submitted = Counter(
            "kiln_jobs_submitted_total", "Jobs accepted by the gateway", ["tenant"], registry=self.registry
        )
        self.rejected = Counter(
            "kiln_requests_rejected_total", "Requests refused, by reason", ["reason"], registry=self.registry
        )
        self.request_seconds = Histogram(
            "kiln_http_request_seconds",
            "Gateway request latency",
            ["route", "method"],
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        # Routing, counted by this gateway process. Cluster-wide figures (jobs, loads, queues,
        # memory) are read from Redis at scrape time: api/routes/system.py.
        self.routed = Counter(
            "kiln_route_decisions",
            "Jobs routed by this gateway: warm (models resident where it goes), cold, pinned, "
            "no_workers (the shared queue), no_eligible (refused)",
            ["reason"],
            registry=self.registry,
        )
        self.moved = Counter(
            "kiln_jobs_moved",
            "Jobs this gateway moved: reap (queued on a dead worker), steal (to an idle worker), "
            "shared (from the shared queue to a worker), redeliver (running on a dead worker)",
            ["reason"],
            registry=self.registry,
        )
        self.preloads = Counter(
            "kiln_preload_requests",
            "Preloads this gateway asked of idle workers (pinned models, growing backlogs)",
            ["reason"],
            registry=self.registry,
        )

    def exposition(self) -> CollectorRegistry:
        """What ``/metrics`` reports: this process's registry, or, when the gateway runs as several
        processes (``PROMETHEUS_MULTIPROC_DIR`` set, see api/cli.py), the sum over all of them."""
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return self.registry
        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined)
        return combined


@dataclass
class GatewayState:
    settings: GatewaySettings
    engine_settings: EngineSettings
    redis: aioredis.Redis
    jobs: GatewayJobs
    storage: Storage
    registry: NodeRegistry
    metrics: Metrics
    api_keys: dict[str, str]
    routing: RoutingService | None = None
    _models: dict[str, list[str]] = field(default_factory=dict)
    _models_at: float = 0.0
    _upload_classes: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.routing is None:
            self.routing = RoutingService(self.redis, load_routing_settings(), self.metrics)

    @property
    def router(self) -> RoutingService:
        assert self.routing is not None
        return self.routing

    async def model_choices(self) -> dict[str, list[str]]:
        """``models:<folder>`` -> names, from the workers' inventories and local model folders;
        read at most once per ``inventory_cache_s`` (an empty inventory is cached too)."""
        now = time.monotonic()
        if self._models_at and now - self._models_at < self.settings.inventory_cache_s:
            return self._models
        folders = {f.decode() for f in await self.redis.smembers(Keys.inventory_folders())}
        local = FolderInventory(self.engine_settings.input_dir, self.engine_settings.models_dirs)
        async with self.redis.pipeline(transaction=False) as pipe:
            ordered = sorted(folders)
            for folder in ordered:
                pipe.smembers(Keys.inventory(folder))
            rows = await pipe.execute()
        choices: dict[str, list[str]] = {}
        for folder, names in zip(ordered, rows, strict=True):
            choices[f"models:{folder}"] = sorted({n.decode() for n in names})
        for root in self.engine_settings.models_dirs:
            if root.is_dir():
                for folder_path in root.iterdir():
                    kind = f"models:{folder_path.name}"
                    merged = set(choices.get(kind, [])) | set(local.list_choices(kind))
                    choices[kind] = sorted(merged)
        self._models, self._models_at = choices, now
        return choices

    def upload_classes(self) -> frozenset[str]:
        """Node classes with an input that names an upload (``ChoiceSource("input_images")``)."""
        if self._upload_classes is None:
            self._upload_classes = frozenset(
                spec.class_type
                for spec in self.registry
                if any(
                    isinstance(i.choices, ChoiceSource) and i.choices.kind == "input_images"
                    for i in spec.declared_inputs
                )
            )
        return self._upload_classes

    def names_uploads(self, prompt: Any) -> bool:
        """Whether a prompt has a node that may name an upload (most do not: their validation
        needs no read of the tenant's uploads)."""
        if not isinstance(prompt, dict):
            return False
        classes = self.upload_classes()
        names = (node.get("class_type") for node in prompt.values() if isinstance(node, dict))
        return any(isinstance(name, str) and name in classes for name in names)

    async def inventory_for(self, tenant: str, prompt: Any = None) -> StaticInventory:
        """What a tenant's prompts may name: every model, and the tenant's own uploads (read only
        when ``prompt`` is None, for listings, or has a node that may name one)."""
        choices = dict(await self.model_choices())
        if prompt is None or self.names_uploads(prompt):
            uploads = await self.redis.smembers(Keys.uploads(tenant))
            choices["input_images"] = sorted(u.decode() for u in uploads)
        return StaticInventory(choices)

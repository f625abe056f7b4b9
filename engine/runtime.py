"""The engine assembled from settings: catalogue, inventory, storage, executor. Used embedded and by
the worker's engine host alike."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from engine.cache import OutputCache
from engine.context import Services
from engine.errors import KilnError
from engine.events import EventSink
from engine.executor import ExecutionResult, Executor
from engine.interrupt import InterruptFlag
from engine.inventory import FolderInventory, Inventory
from engine.io import InputResolver, LocalFolderSink, LocalInputResolver, OutputSink
from engine.models.hub import ModelHub
from engine.models.known_models import KnownModels
from engine.registry import NodeRegistry, default_registry
from engine.settings import EngineSettings
from engine.validation import ValidatedPrompt, validate_prompt

if TYPE_CHECKING:
    from engine.models.manager import ModelManager

log = logging.getLogger(__name__)


def resolve_device(name: str) -> str:
    """``auto`` -> the best available device; anything else is returned as given."""
    if name != "auto":
        return name
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def build_model_hub(settings: EngineSettings) -> ModelHub:
    """The model hub of ``settings`` (folders + known models); without the known models when they
    cannot be read, so local files still resolve."""
    try:
        return ModelHub.from_settings(settings)
    except KilnError as exc:
        log.warning("Known models unavailable (%s); only local model files will resolve", exc)
        return ModelHub(
            list(settings.models_dirs),
            KnownModels(),
            settings.offline,
            inputs=FolderInventory(settings.input_dir),
        )


def build_model_manager(settings: EngineSettings, device: str, hub: ModelHub) -> ModelManager:
    """The model manager of ``settings`` on ``device``."""
    from engine.models.manager import ModelManager

    def mib(value: int | None) -> int | None:
        return None if value is None else value * 2**20

    return ModelManager(
        device,
        settings.precision,
        settings.vae_fp32,
        mib(settings.models_device_budget_mb),
        mib(settings.models_host_budget_mb),
        hub,
    )


class EngineRuntime:
    """Validates and executes prompts with one executor (one prompt at a time)."""

    def __init__(
        self,
        settings: EngineSettings,
        *,
        registry: NodeRegistry | None = None,
        outputs: OutputSink | None = None,
        inputs: InputResolver | None = None,
        inventory: Inventory | None = None,
        models: ModelManager | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry or default_registry(settings.node_modules)
        device = resolve_device(settings.device)
        # The hub finds model files (local folders, then known models) and is the default inventory.
        self.hub = models.hub if models is not None and models.hub is not None else build_model_hub(settings)
        self.inventory = inventory or self.hub
        self.models = models or build_model_manager(settings, device, self.hub)
        services = Services(
            outputs=outputs or LocalFolderSink(settings.output_dir, settings.temp_dir),
            inputs=inputs
            or LocalInputResolver(
                settings.input_dir, settings.output_dir, settings.temp_dir, max_bytes=settings.max_image_bytes
            ),
            models=self.models,
            device=device,
            decode_limits=settings.decode_limits(),
            preview_interval=settings.preview_interval,
        )
        self.executor = Executor(self.registry, services, OutputCache(settings.cache_entries))

    def validate(self, prompt: Any) -> ValidatedPrompt:
        return validate_prompt(prompt, self.registry, self.inventory, self.settings.validation_limits())

    def execute(
        self,
        prompt: Mapping[str, Any],
        *,
        prompt_id: str | None = None,
        extra_data: Mapping[str, Any] | None = None,
        events: EventSink | None = None,
        interrupt: InterruptFlag | None = None,
        validated: ValidatedPrompt | None = None,
    ) -> ExecutionResult:
        """Validate (unless already done) and run one prompt."""
        checked = validated or self.validate(prompt)
        return self.executor.execute(
            checked,
            prompt_id=prompt_id or str(uuid.uuid4()),
            original_prompt=prompt,
            extra_data=extra_data,
            events=events,
            interrupt=interrupt,
        )

"""The engine assembled from settings: catalogue, inventory, storage, executor. Used embedded and by
the worker's engine host alike."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from engine.cache import OutputCache
from engine.context import Services
from engine.events import EventSink
from engine.executor import ExecutionResult, Executor
from engine.interrupt import InterruptFlag
from engine.inventory import FolderInventory, Inventory
from engine.io import InputResolver, LocalFolderSink, LocalInputResolver, OutputSink
from engine.registry import NodeRegistry, default_registry
from engine.settings import EngineSettings
from engine.validation import ValidatedPrompt, validate_prompt


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
    ) -> None:
        self.settings = settings
        self.registry = registry or default_registry(settings.node_modules)
        self.inventory = inventory or FolderInventory(settings.input_dir, settings.models_dirs)
        services = Services(
            outputs=outputs or LocalFolderSink(settings.output_dir, settings.temp_dir),
            inputs=inputs
            or LocalInputResolver(
                settings.input_dir, settings.output_dir, settings.temp_dir, max_bytes=settings.max_image_bytes
            ),
            device=resolve_device(settings.device),
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

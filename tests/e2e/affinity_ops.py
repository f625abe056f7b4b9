"""Implementations of ``tests.e2e.affinity_nodes`` (run in the engine host process)."""

from __future__ import annotations

import time

from engine.context import NodeContext
from engine.errors import ModelError
from engine.models.handles import ModelHandle


def model_probe(ctx: NodeContext, model: ModelHandle, seconds: float) -> tuple[()]:
    """Borrow the UNet (loaded on first use, or again after an eviction) while `seconds` pass."""
    if ctx.services.models is None:
        raise ModelError("TestModelProbe needs the engine's model manager")
    steps = 5
    with ctx.services.models.use(model):
        for step in range(1, steps + 1):
            time.sleep(seconds / steps)
            ctx.progress(step, steps)
    return ()

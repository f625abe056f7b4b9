"""Implementations of ``tests.e2e.affinity_nodes`` (run in the engine host process)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

from engine.context import NodeContext
from worker.protocol import MODEL_LOADED_EVENT

# What this engine host process has "loaded": checkpoint name -> content hash. Test-only state
# standing in for the model manager's residency.
_LOADED: dict[str, str] = {}


def _checkpoint_path(name: str) -> Path:
    for root in filter(None, os.environ.get("KILN_MODELS_DIRS", "models").split(os.pathsep)):
        path = Path(root) / "checkpoints" / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"checkpoint {name} not found")


def simulated_checkpoint_loader(ctx: NodeContext, ckpt_name: str) -> tuple[dict[str, Any]]:
    if ckpt_name not in _LOADED:
        started = time.monotonic()
        digest = hashlib.sha256(_checkpoint_path(ckpt_name).read_bytes()).hexdigest()
        time.sleep(float(os.environ.get("KILN_TEST_LOAD_SECONDS", "1.5")))
        _LOADED[ckpt_name] = digest
        ctx.events.emit(
            MODEL_LOADED_EVENT,
            {"model": f"checkpoints/{ckpt_name}", "seconds": time.monotonic() - started, "hash": digest},
        )
    return ({"name": ckpt_name, "hash": _LOADED[ckpt_name]},)


def model_probe(ctx: NodeContext, model: dict[str, Any], seconds: float) -> tuple[()]:
    steps = 5
    for step in range(1, steps + 1):
        time.sleep(seconds / steps)
        ctx.progress(step, steps)
    return ()

"""Shared fixtures: a fresh node registry and an engine runtime over temporary folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.registry import NodeRegistry, default_registry
from engine.runtime import EngineRuntime
from engine.settings import EngineSettings


@pytest.fixture
def registry() -> NodeRegistry:
    return default_registry()


@pytest.fixture
def engine_settings(tmp_path: Path) -> EngineSettings:
    for name in ("models", "input", "output", "temp"):
        (tmp_path / name).mkdir()
    return EngineSettings(
        models_dirs=[tmp_path / "models"],
        input_dir=tmp_path / "input",
        output_dir=tmp_path / "output",
        temp_dir=tmp_path / "temp",
        device="cpu",
    )


@pytest.fixture
def runtime(engine_settings: EngineSettings) -> EngineRuntime:
    return EngineRuntime(engine_settings)

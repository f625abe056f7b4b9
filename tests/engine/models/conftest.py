"""Tiny test checkpoints in the real single-file layout, written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.models.test_checkpoint import write_test_checkpoint
from engine.models.tokenizer import CLIPTokenizer


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def tiny_sd15(checkpoint_dir: Path) -> Path:
    return write_test_checkpoint(checkpoint_dir / "tiny-sd15.safetensors", "sd15", "tiny", seed=1)


@pytest.fixture(scope="session")
def tiny_sd21(checkpoint_dir: Path) -> Path:
    return write_test_checkpoint(checkpoint_dir / "tiny-sd21.safetensors", "sd21", "tiny", seed=2)


@pytest.fixture(scope="session")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_package()

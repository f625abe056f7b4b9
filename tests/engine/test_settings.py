"""Settings: precedence, file formats, and that docs and CLI flags cover every setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.errors import ConfigError
from engine.settings import EngineSettings, load_settings
from kiln.cli import build_parser

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_precedence_flag_over_env_over_file(tmp_path, monkeypatch):
    config = tmp_path / "kiln.toml"
    config.write_text('[engine]\ndevice = "cuda:3"\nmax_nodes = 5\ncache_entries = 7\n')
    monkeypatch.setenv("KILN_MAX_NODES", "50")
    settings = load_settings(config, cache_entries=9)
    assert settings.device == "cuda:3"  # file
    assert settings.max_nodes == 50  # environment beats file
    assert settings.cache_entries == 9  # explicit beats both


def test_config_file_from_environment(tmp_path, monkeypatch):
    config = tmp_path / "kiln.yaml"
    config.write_text("precision: bf16\n")
    monkeypatch.setenv("KILN_CONFIG", str(config))
    assert load_settings().precision == "bf16"


def test_models_dirs_from_path_list(monkeypatch):
    monkeypatch.setenv("KILN_MODELS_DIRS", "/a:/b")
    assert load_settings().models_dirs == [Path("/a"), Path("/b")]
    monkeypatch.setenv("KILN_MODELS_DIRS", '["/c"]')
    assert load_settings().models_dirs == [Path("/c")]


@pytest.mark.parametrize(
    "text", ["precision: fp8\n", "unknown_setting: 1\n", "max_nodes: -1\n", "- a list\n", "a: [unclosed\n"]
)
def test_invalid_config_is_a_config_error(tmp_path, text):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError):
        load_settings(config)


def test_every_setting_is_documented_and_has_a_flag():
    docs = DOCS.read_text()
    parser = build_parser()
    run_parser = parser._subparsers._group_actions[0].choices["run"]
    flags = {action.dest for action in run_parser._actions}
    for name in EngineSettings.model_fields:
        assert f"`{name}`" in docs and f"`KILN_{name.upper()}`" in docs, name
        assert name in flags, name

"""Engine settings: one class, read from flags, ``KILN_*`` environment variables and a config file.

Precedence, highest first: explicit values (command-line flags), environment variables, the
config file (YAML or TOML, from ``--config`` or ``KILN_CONFIG``), defaults. docs/configuration.md
lists every setting.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine.errors import ConfigError
from engine.limits import DecodeLimits, ValidationLimits

Precision = Literal["auto", "fp32", "fp16", "bf16"]


class EngineSettings(BaseSettings):
    """Everything the embedded engine and the worker's engine host need to know."""

    model_config = SettingsConfigDict(env_prefix="KILN_", extra="forbid", env_nested_delimiter=None)

    models_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [Path("models")],
        description="Model roots, each holding ComfyUI's folders (checkpoints, loras, vae, ...). "
        "Environment: a JSON list or os.pathsep-separated paths.",
    )
    node_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Extra node modules (import paths exposing NODE_SPECS). Environment: comma-separated.",
    )
    input_dir: Path = Field(Path("input"), description="Folder LoadImage reads from.")
    output_dir: Path = Field(Path("output"), description="Folder SaveImage writes to.")
    temp_dir: Path = Field(Path("temp"), description="Folder PreviewImage writes to.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    precision: Precision = Field("auto", description="Weights precision: auto (fp16 on GPU, fp32 on CPU).")
    vae_fp32: bool = Field(False, description="Run the VAE in fp32 whatever the precision.")
    models_device_budget_mb: int | None = Field(
        None,
        ge=0,
        description="MiB of device memory for loaded models (LRU beyond it); default: 75% of a GPU's "
        "memory, half the RAM on CPU.",
    )
    models_host_budget_mb: int | None = Field(
        None,
        ge=0,
        description="MiB of RAM for models moved off the device (LRU beyond it); default: half the RAM "
        "with a GPU, 0 on CPU.",
    )
    cache_entries: int = Field(128, ge=0, description="Node outputs kept across prompts (LRU).")
    preview_interval: int = Field(0, ge=0, description="Latent preview every N steps; 0 disables.")
    offline: bool = Field(False, description="Never download models (also honours HF_HUB_OFFLINE).")
    max_nodes: int = Field(ValidationLimits.max_nodes, ge=1, description="Most nodes in one prompt.")
    max_string_length: int = Field(
        ValidationLimits.max_string_length, ge=1, description="Longest string input (characters)."
    )
    max_cost: int = Field(ValidationLimits.max_cost, ge=1, description="Pixels x batch x steps per prompt.")
    max_body_bytes: int = Field(ValidationLimits.max_body_bytes, ge=1, description="Largest prompt JSON.")
    max_json_depth: int = Field(ValidationLimits.max_json_depth, ge=2, description="Deepest JSON nesting.")
    max_image_bytes: int = Field(DecodeLimits.max_bytes, ge=1, description="Largest input image file.")
    max_image_pixels: int = Field(DecodeLimits.max_pixels, ge=1, description="Largest input image (w x h).")

    @field_validator("models_dirs", mode="before")
    @classmethod
    def _split_paths(cls, value: Any) -> Any:
        if isinstance(value, str | Path):
            text = str(value).strip()
            if text.startswith("["):
                return json.loads(text)
            return [part for part in text.split(os.pathsep) if part]
        return value

    @field_validator("node_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def validation_limits(self) -> ValidationLimits:
        return ValidationLimits(
            max_body_bytes=self.max_body_bytes,
            max_json_depth=self.max_json_depth,
            max_nodes=self.max_nodes,
            max_string_length=self.max_string_length,
            max_cost=self.max_cost,
        )

    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)


def read_config_file(path: Path, section: str = "engine") -> dict[str, Any]:
    """One section of a YAML or TOML settings file. Keys are setting names (without ``KILN_``);
    for the engine they may also sit at the top level."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"Cannot read config file {path}: {exc}") from exc
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"Config file {path} is not valid: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of settings")
    if section in data:
        values = data[section]
        if not isinstance(values, dict):
            raise ConfigError(f"Section {section!r} of {path} must be a mapping")
        return dict(values)
    sections = {"engine", "gateway", "worker"}
    if section == "engine" and not sections & set(data):
        return dict(data)
    return {}


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def load_section(
    settings_class: type[SettingsT], section: str, config_file: Path | None, overrides: dict[str, Any]
) -> SettingsT:
    """Settings with the documented precedence: explicit values, ``KILN_*`` environment, the config
    file (``config_file`` or ``KILN_CONFIG``), defaults."""
    config_path = config_file or (Path(os.environ["KILN_CONFIG"]) if os.environ.get("KILN_CONFIG") else None)
    from_file = read_config_file(config_path, section) if config_path else {}
    # Environment beats the file: keep only file keys the environment does not set.
    env_keys = {name for name in settings_class.model_fields if f"KILN_{name.upper()}" in os.environ}
    merged = {key: value for key, value in from_file.items() if key not in env_keys}
    merged.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return settings_class(**merged)
    except ValidationError as exc:
        raise ConfigError(f"Invalid {section} settings: {exc}") from exc


def load_settings(config_file: Path | None = None, **overrides: Any) -> EngineSettings:
    """Engine settings with the documented precedence; ``overrides`` are explicit values (flags)."""
    return load_section(EngineSettings, "engine", config_file, overrides)

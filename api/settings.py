"""The gateway's settings: one class, ``KILN_*`` environment variables or the config file's
``gateway`` section (see docs/configuration.md). Secrets have no defaults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine.errors import ConfigError
from engine.settings import load_section


class GatewaySettings(BaseSettings):
    """Everything ``kiln serve`` needs."""

    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8188, description="Port the gateway listens on (ComfyUI's default).")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding jobs, queues and events.")
    storage_url: str = Field(
        "file://./storage", description="s3://bucket/prefix or file:///path for outputs."
    )
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, R2, ...); unset for AWS.")
    s3_public_endpoint_url: str | None = Field(None, description="S3 endpoint clients reach, for URLs.")
    s3_region: str | None = Field(None, description="S3 region.")
    storage_create_bucket: bool = Field(False, description="Create the bucket at start if missing.")
    public_url: str = Field("http://127.0.0.1:8188", description="The gateway's address as clients see it.")
    api_keys: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description='API key -> tenant, as JSON ({"key": "tenant"}) or "key:tenant,key2:tenant2".',
    )
    api_keys_file: Path | None = Field(None, description="File with one 'key tenant' pair per line.")
    insecure: bool = Field(False, description="No authentication: every caller is tenant 'local'.")
    signing_secret: SecretStr | None = Field(None, description="Secret for file:// download URLs.")
    rate_limit_per_s: float = Field(50.0, gt=0, description="Submissions per second per tenant.")
    rate_limit_burst: int = Field(100, ge=1, description="Burst of submissions per tenant.")
    max_queued_per_tenant: int = Field(1000, ge=0, description="Queued+running jobs per tenant; 0 = no cap.")
    presign_expiry_s: int = Field(3600, ge=60, description="Lifetime of presigned output URLs.")
    history_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="How long finished jobs are kept.")
    idempotency_ttl_s: int = Field(24 * 3600, ge=60, description="How long an Idempotency-Key is remembered.")
    inventory_cache_s: float = Field(2.0, ge=0, description="How long the model inventory is cached.")
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1, description="Largest upload.")
    webhook_secret: SecretStr | None = Field(None, description="HMAC key for webhook signatures.")
    webhook_allow_private: bool = Field(
        False,
        description="Accept webhook URLs whose host is a loopback, private or link-local address "
        "(the workers' setting of the same name checks the resolved addresses at delivery).",
    )
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host name patterns webhook URLs must match (fnmatch, e.g. *.example.com), "
        "as JSON or comma-separated; empty = any host.",
    )
    gateway_processes: int = Field(
        1, ge=1, le=64, description="Gateway processes sharing the port (uvicorn workers)."
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                return json.loads(text)
            pairs = [item.split(":", 1) for item in text.split(",") if item.strip()]
            return {key.strip(): tenant.strip() for key, tenant in pairs}
        return value

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _parse_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [item.strip().lower() for item in text.split(",") if item.strip()]
        return value

    @model_validator(mode="after")
    def _check_auth(self) -> GatewaySettings:
        if not self.insecure and not self.api_keys and self.api_keys_file is None:
            raise ValueError(
                "No API keys: set KILN_API_KEYS or KILN_API_KEYS_FILE, or KILN_INSECURE=true for local use"
            )
        return self

    def all_api_keys(self) -> dict[str, str]:
        keys = dict(self.api_keys)
        if self.api_keys_file is not None:
            for line in self.api_keys_file.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and not line.lstrip().startswith("#"):
                    keys[parts[0]] = parts[1]
        return keys

    def download_secret(self) -> str:
        if self.signing_secret is not None:
            return self.signing_secret.get_secret_value()
        if self.insecure:
            return "insecure-local-signing-secret"
        raise ConfigError("KILN_SIGNING_SECRET is required for file:// storage download URLs")


def load_gateway_settings(config_file: Path | None = None, **overrides: Any) -> GatewaySettings:
    """Gateway settings: flags, then ``KILN_*`` environment, then the config file's ``gateway``."""
    return load_section(GatewaySettings, "gateway", config_file, overrides)

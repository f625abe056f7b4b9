"""The worker's settings: ``KILN_*`` environment variables or the config file's ``worker`` section."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.settings import load_section


class WorkerSettings(BaseSettings):
    """Everything ``kiln worker`` needs besides the engine settings."""

    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding jobs, queues and events.")
    storage_url: str = Field(
        "file://./storage", description="s3://bucket/prefix or file:///path for outputs."
    )
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, R2, ...); unset for AWS.")
    s3_region: str | None = Field(None, description="S3 region.")
    storage_create_bucket: bool = Field(False, description="Create the bucket at start if missing.")
    worker_id: str = Field("", description="Unique worker name; default: host-gpuN or host-cpu-PID.")
    gpu: int | None = Field(None, ge=0, description="GPU index this worker owns (sets CUDA_VISIBLE_DEVICES).")
    isolation: Literal["shared", "per-job"] = Field(
        "shared", description="shared: one engine host keeps models warm; per-job: a fresh host per job."
    )
    job_timeout_s: float = Field(1800.0, gt=0, description="Hard deadline of one job attempt.")
    job_max_attempts: int = Field(3, ge=1, description="Attempts per job when the engine host crashes.")
    cancel_grace_s: float = Field(10.0, gt=0, description="Time a cancelled job gets to stop before a kill.")
    host_start_timeout_s: float = Field(300.0, gt=0, description="Time the engine host gets to start.")
    heartbeat_interval_s: float = Field(5.0, gt=0, description="Seconds between heartbeats.")
    heartbeat_ttl_s: float = Field(20.0, gt=0, description="A worker is dead this long after its last beat.")
    history_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="How long finished jobs are kept.")
    visibility_timeout_s: int = Field(
        0, ge=0, description="Broker redelivery timeout; 0 = job timeout + 10 min."
    )
    soft_shutdown_timeout_s: float = Field(30.0, ge=0, description="On SIGTERM, time the running job gets.")
    queues: list[str] = Field(default_factory=list, description="Extra queues to consume.")
    webhook_secret: SecretStr | None = Field(None, description="HMAC key for webhook signatures.")
    webhook_attempts: int = Field(5, ge=1, description="Delivery attempts per webhook.")

    @model_validator(mode="after")
    def _defaults(self) -> WorkerSettings:
        if not self.worker_id:
            device = f"gpu{self.gpu}" if self.gpu is not None else "cpu"
            self.worker_id = f"{socket.gethostname()}-{device}"
        if self.visibility_timeout_s == 0:
            self.visibility_timeout_s = int(self.job_timeout_s * self.job_max_attempts) + 600
        return self

    def storage_options(self) -> dict[str, Any]:
        return {
            "create_bucket": self.storage_create_bucket,
            "s3_endpoint_url": self.s3_endpoint_url,
            "s3_region": self.s3_region,
        }


def load_worker_settings(config_file: Path | None = None, **overrides: Any) -> WorkerSettings:
    return load_section(WorkerSettings, "worker", config_file, overrides)

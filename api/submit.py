"""Accepting a job: rate limit, validation, then one atomic write that records and queues it.

Nothing touches Redis's job keys before validation passes, so bad input leaves no trace.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any

from fastapi import Request

from api.errors import PayloadTooLarge, RateLimited, ServiceUnavailable
from api.jobs import Created, JobIdTaken, new_job_id
from api.settings import GatewaySettings
from api.state import GatewayState
from engine.errors import PromptValidationError
from engine.prompt_json import parse_json
from engine.registry import NodeRegistry
from engine.schema import ChoiceSource
from engine.validation import ValidatedPrompt, prompt_error, validate_prompt
from worker.celery_wire import DEFAULT_PRIORITY, MAX_PRIORITY
from worker.protocol import JobRecord, JobStatus
from worker.webhooks import WebhookRefused, check_url

_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class Submission:
    prompt: Any
    extra_data: dict[str, Any] = field(default_factory=dict)
    client_id: str | None = None
    job_id: str | None = None
    priority: int = DEFAULT_PRIORITY
    webhook: str | None = None
    idempotency_key: str | None = None


class NoEligibleWorker(ServiceUnavailable):
    """Raised when workers are up but none may run the job (its pins or their allow-lists)."""

    type = "no_eligible_worker"


def invalid(message: str, details: str = "") -> PromptValidationError:
    return PromptValidationError(prompt_error("invalid_prompt", message, details))


async def read_json_body(request: Request, state: GatewayState) -> Any:
    """The request body as JSON, with Kiln's size, depth and NaN rules."""
    limits = state.engine_settings.validation_limits()
    body = await request.body()
    if len(body) > limits.max_body_bytes:
        raise PayloadTooLarge(f"Body is larger than {limits.max_body_bytes} bytes")
    return parse_json(body, limits)


def models_needed(validated: ValidatedPrompt, registry: NodeRegistry) -> list[str]:
    """Model files a prompt loads, as ``folder/name``: the values of its nodes' model combos
    (inputs whose choices are ``ChoiceSource("models:<folder>")``: checkpoints, loras, vae, ...)."""
    needed = set()
    for node in validated.prompt.values():
        spec = registry.get(node["class_type"])
        if spec is None:
            continue
        for declared in spec.declared_inputs:
            choices = declared.choices
            value = node["inputs"].get(declared.name)
            if (
                isinstance(choices, ChoiceSource)
                and choices.kind.startswith("models:")
                and isinstance(value, str)
            ):
                needed.add(f"{choices.kind.removeprefix('models:')}/{value}")
    return sorted(needed)


def placement_pins(extra_data: dict[str, Any]) -> dict[str, str]:
    """``extra_data["kiln"]``'s placement: ``{"worker": id}`` and/or ``{"gpu_class": name}``."""
    section = extra_data.get("kiln")
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise invalid("extra_data.kiln must be an object")
    pins = {}
    for key in ("worker", "gpu_class"):
        value = section.get(key)
        if value is not None:
            if not isinstance(value, str) or not value.strip():
                raise invalid(f"extra_data.kiln.{key} must be a non-empty string")
            pins[key] = value.strip()
    return pins


def check_webhook(url: str, settings: GatewaySettings) -> None:
    """A job's webhook URL: http(s) with a host, not too long, not a literal private address
    (unless ``webhook_allow_private``), and on ``webhook_allowed_hosts`` when that is set. The host
    is not resolved here: deliveries check the addresses it resolves to (worker/webhooks.py)."""
    try:
        parsed, _ = check_url(url, settings.webhook_allow_private)
    except WebhookRefused as exc:
        raise invalid(f"webhook: {exc}", "webhook") from exc
    host = (parsed.hostname or "").rstrip(".").lower()
    allowed = settings.webhook_allowed_hosts
    if allowed and not any(fnmatchcase(host, pattern.lower()) for pattern in allowed):
        raise invalid(f"webhook: {host} is not an allowed webhook host", "webhook")


async def submit(state: GatewayState, tenant: str, submission: Submission) -> Created:
    """Validate and enqueue; raises PromptValidationError (400) or RateLimited (429). The result
    carries the validator's ``node_errors`` (outputs refused while others run)."""
    if submission.job_id is not None and not _JOB_ID.match(submission.job_id):
        raise invalid("prompt_id must be 1-64 letters, digits, '-' or '_'")
    if not 0 <= submission.priority <= MAX_PRIORITY:
        raise invalid(f"priority must be between 0 and {MAX_PRIORITY}")
    if submission.webhook is not None:
        check_webhook(submission.webhook, state.settings)
    wait = await state.jobs.take_token(
        tenant, state.settings.rate_limit_per_s, state.settings.rate_limit_burst
    )
    if wait > 0:
        state.metrics.rejected.labels("rate_limited").inc()
        raise RateLimited("Too many submissions", headers={"Retry-After": str(max(1, math.ceil(wait)))})
    inventory = await state.inventory_for(tenant, submission.prompt)
    try:
        validated = validate_prompt(
            submission.prompt, state.registry, inventory, state.engine_settings.validation_limits()
        )
    except PromptValidationError:
        state.metrics.rejected.labels("invalid_prompt").inc()
        raise
    pins = placement_pins(submission.extra_data)
    record = JobRecord(
        id=submission.job_id or new_job_id(),
        tenant=tenant,
        status=JobStatus.QUEUED,
        number=0,
        priority=submission.priority,
        prompt=submission.prompt,
        extra_data=submission.extra_data,
        outputs_to_execute=validated.outputs,
        client_id=submission.client_id,
        webhook=submission.webhook,
        models=models_needed(validated, state.registry),
        pin=pins,
    )
    route = await state.router.route(record)
    if route.reason == "no_eligible":
        state.metrics.rejected.labels("no_eligible_worker").inc()
        raise NoEligibleWorker(
            f"No live worker may run this job (pins {pins or 'none'}, models {record.models}); "
            "check the pins and the workers' allow-lists",
            headers={"Retry-After": "5"},
        )
    assert record.queue is not None
    try:
        created = await state.jobs.create(
            record, queue=record.queue, idempotency_key=submission.idempotency_key
        )
    except JobIdTaken as exc:  # checked in the create script: two submits with one id cannot both win
        raise invalid(str(exc)) from exc
    if created.created:
        state.metrics.submitted.labels(tenant).inc()
        await state.router.place(record, route)
        return replace(created, node_errors=validated.node_errors)
    return created

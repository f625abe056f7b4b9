"""Job records rendered in the shapes clients expect: ComfyUI's history and queue, ComfyUI's
``/api/jobs``, and Kiln's native ``/v1/jobs``."""

from __future__ import annotations

from typing import Any

from worker.protocol import JobRecord, JobStatus
from worker.storage import Storage
from worker.webhooks import job_status

COMFY_JOB_STATUS = {
    JobStatus.QUEUED: "pending",
    JobStatus.RUNNING: "in_progress",
    JobStatus.SUCCEEDED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "failed",
}


def queue_item(job: JobRecord) -> list[Any]:
    """ComfyUI's queue tuple: [number, prompt_id, prompt, extra_data, outputs_to_execute]."""
    return [job.number, job.id, job.prompt, job.extra_data, job.outputs_to_execute]


def history_entry(job: JobRecord) -> dict[str, Any]:
    """One value of ComfyUI's ``/history``."""
    succeeded = job.status == JobStatus.SUCCEEDED
    return {
        "prompt": queue_item(job),
        "outputs": job.history if succeeded else {},
        "status": {
            "status_str": "success" if succeeded else "error",
            "completed": succeeded,
            "messages": job.messages,
        },
        "meta": {
            node_id: {
                "node_id": node_id,
                "display_node": node_id,
                "parent_node": None,
                "real_node_id": node_id,
            }
            for node_id in job.history
        },
    }


def comfy_job(job: JobRecord, include_outputs: bool = False) -> dict[str, Any]:
    """An item of ComfyUI's ``/api/jobs``."""
    item: dict[str, Any] = {
        "id": job.id,
        "status": COMFY_JOB_STATUS[job.status],
        "priority": job.number,
        "create_time": int(job.created_at * 1000),
        "outputs_count": sum(len(v) for o in job.history.values() for v in o.values() if isinstance(v, list)),
    }
    if job.started_at:
        item["execution_start_time"] = int(job.started_at * 1000)
    if job.finished_at:
        item["execution_end_time"] = int(job.finished_at * 1000)
    if job.error is not None:
        item["execution_error"] = {
            "prompt_id": job.id,
            "node_id": job.error.node_id,
            "exception_message": job.error.message,
            "exception_type": job.error.type,
        }
    workflow = (job.extra_data.get("extra_pnginfo") or {}).get("workflow") if job.extra_data else None
    if isinstance(workflow, dict) and "id" in workflow:
        item["workflow_id"] = workflow["id"]
    if include_outputs:
        item["outputs"] = job.history
        item["execution_status"] = history_entry(job)["status"]
        item["workflow"] = {"prompt": job.prompt, "extra_data": job.extra_data}
    return item


def native_job(
    job: JobRecord, *, position: int | None, storage: Storage, expiry_s: int, public_url: str
) -> dict[str, Any]:
    """``GET /v1/jobs/{id}``: the same document the job's webhook carries."""
    return job_status(job, position=position, storage=storage, expiry_s=expiry_s, public_url=public_url)

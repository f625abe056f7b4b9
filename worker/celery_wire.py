"""Celery task messages (protocol 2) as kombu's Redis transport stores them.

The gateway writes the job record and the task message in ONE Lua script, so an accepted job is
always both recorded and queued (never one without the other). To do that it builds the message
here instead of calling ``celery.send_task``. A test runs a real Celery worker on these messages.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid

from worker.protocol import TASK_RUN_JOB

# kombu's Redis transport keeps one list per priority step: "<queue>\x06\x16<step>" (0 has no suffix).
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
# Kiln priorities run 0 (lowest) .. 9 (most urgent); Redis consumes step 0 first.
MAX_PRIORITY = 9
DEFAULT_PRIORITY = 5


def redis_list_for(queue: str, priority: int) -> str:
    """The Redis list a message of this Kiln priority goes to."""
    kombu_priority = MAX_PRIORITY - max(0, min(MAX_PRIORITY, priority))
    step = max(s for s in PRIORITY_STEPS if s <= kombu_priority)
    return queue if step == 0 else f"{queue}{PRIORITY_SEPARATOR}{step}"


def task_message(job_id: str, queue: str, priority: int = DEFAULT_PRIORITY, task: str = TASK_RUN_JOB) -> str:
    """The JSON kombu pushes for ``send_task(task, args=[job_id], task_id=job_id, queue=queue)``."""
    body = json.dumps([[job_id], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    message = {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task,
            "id": job_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": job_id,
            "parent_id": None,
            "argsrepr": repr([job_id]),
            "kwargsrepr": "{}",
            "origin": f"gateway@{socket.gethostname()}:{os.getpid()}",
            "ignore_result": True,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": job_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": MAX_PRIORITY - max(0, min(MAX_PRIORITY, priority)),
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(message)

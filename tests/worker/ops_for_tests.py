"""Implementations of the test nodes in ``tests.worker.nodes_for_tests`` (run in the engine host)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import torch

from engine.context import NodeContext


def sleep_forever(ctx: NodeContext, spawn_child: bool) -> tuple[()]:
    if spawn_child:
        # Left running on purpose: killing the host's process group must take it down too.
        helper = subprocess.Popen(["sleep", "600"])
        ctx.progress(helper.pid, helper.pid)
    while True:
        time.sleep(60)


def sleep_steps(ctx: NodeContext, steps: int, step_seconds: float, preview: bool) -> tuple[()]:
    for step in range(1, steps + 1):
        time.sleep(step_seconds)
        ctx.progress(step, steps)
        if preview:
            ctx.preview(b"\xff\xd8\xff" + step.to_bytes(4, "big"))
    return ()


def crash(ctx: NodeContext, mode: str) -> tuple[()]:
    if mode == "exit":
        os._exit(3)
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # the signal may take a moment to land
    return ()


def out_of_memory(ctx: NodeContext, mode: str) -> tuple[()]:
    if mode == "python":
        # More than any machine has: the allocator fails at once (no overcommit can satisfy it).
        hoard = [bytearray(1 << 62)]
        del hoard
    elif mode == "torch":
        torch.empty(1 << 62, dtype=torch.uint8)
    else:
        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.11 GiB"
        )
    return ()


def fail(ctx: NodeContext, message: str) -> tuple[()]:
    raise ValueError(message)


def slow_invert(
    ctx: NodeContext, image: torch.Tensor, steps: int, step_seconds: float
) -> tuple[torch.Tensor]:
    """ImageInvert that takes ``steps * step_seconds``, reporting progress (and honouring cancel)."""
    for step in range(1, steps + 1):
        time.sleep(step_seconds)
        ctx.progress(step, steps)
    return (1.0 - image,)

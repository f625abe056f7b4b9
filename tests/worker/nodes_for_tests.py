"""Custom nodes for the engine host's tests: a node module (``NODE_SPECS``, torch-free declarations)
loaded through ``EngineSettings(node_modules=["tests.worker.nodes_for_tests"])``.

They misbehave on purpose: sleep forever, crash the process, run out of memory, raise.
Implementations live in ``tests.worker.ops_for_tests``.
"""

from __future__ import annotations

from engine.schema import (
    IMAGE,
    NodeSpec,
    OutputSpec,
    bool_input,
    combo,
    float_input,
    int_input,
    link,
    string_input,
)

_OPS = "tests.worker.ops_for_tests"
_CATEGORY = "testing"

NODE_SPECS = (
    NodeSpec(
        "TestSleepForever",
        category=_CATEGORY,
        impl=f"{_OPS}:sleep_forever",
        description="Sleeps forever and never checks for interruption. With spawn_child, first starts "
        "a `sleep` subprocess and reports its pid as a progress event.",
        required=(bool_input("spawn_child", False),),
        output_node=True,
    ),
    NodeSpec(
        "TestSleepSteps",
        category=_CATEGORY,
        impl=f"{_OPS}:sleep_steps",
        description="Sleeps in steps, calling ctx.progress (where interruption is honoured) after each.",
        required=(
            int_input("steps", 10, 1, 100_000),
            float_input("step_seconds", 0.05, 0.0, 10.0, step=0.001),
            bool_input("preview", False),
        ),
        output_node=True,
    ),
    NodeSpec(
        "TestCrash",
        category=_CATEGORY,
        impl=f"{_OPS}:crash",
        description="Ends the process: os._exit(3), or SIGKILL to itself.",
        required=(combo("mode", ("exit", "sigkill")),),
        output_node=True,
    ),
    NodeSpec(
        "TestOutOfMemory",
        category=_CATEGORY,
        impl=f"{_OPS}:out_of_memory",
        description="Runs out of memory: a Python allocation that fails (MemoryError), a torch CPU "
        "allocation that fails, or torch.cuda.OutOfMemoryError as CUDA raises it.",
        required=(combo("mode", ("python", "torch", "cuda")),),
        output_node=True,
    ),
    NodeSpec(
        "TestRaise",
        category=_CATEGORY,
        impl=f"{_OPS}:fail",
        description="Raises ValueError(message).",
        required=(string_input("message", "boom"),),
        output_node=True,
    ),
    NodeSpec(
        "TestSlowInvert",
        category=_CATEGORY,
        impl=f"{_OPS}:slow_invert",
        description="ImageInvert that sleeps in steps first, reporting progress after each.",
        required=(
            link("image", IMAGE),
            int_input("steps", 10, 1, 100_000),
            float_input("step_seconds", 0.05, 0.0, 10.0, step=0.001),
        ),
        outputs=(OutputSpec(IMAGE),),
    ),
)

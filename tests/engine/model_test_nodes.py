"""A test-only output node that reports CONDITIONING, so text encoding runs inside real prompts
(``--node-modules tests.engine.model_test_nodes``). Declarations stay torch-free."""

from __future__ import annotations

from typing import Any

from engine.schema import CONDITIONING, NodeSpec, link

NODE_SPECS = (
    NodeSpec(
        "KilnTestConditioningSummary",
        category="testing",
        impl="tests.engine.model_test_nodes:conditioning_summary",
        required=(link("conditioning", CONDITIONING),),
        output_node=True,
        python_module="tests",
    ),
)


def conditioning_summary(ctx: Any, conditioning: list[list[Any]]) -> Any:
    from engine.context import NodeResult

    rows = []
    for cond, options in conditioning:
        pooled = options.get("pooled_output")
        rows.append(
            {
                "shape": list(cond.shape),
                "dtype": str(cond.dtype),
                "device": str(cond.device),
                "pooled": None if pooled is None else list(pooled.shape),
                "sum": float(cond.double().sum()),
            }
        )
    return NodeResult(result=(), ui={"conditioning": rows})

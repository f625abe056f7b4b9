"""Nodes for the model-affinity test (``KILN_NODE_MODULES=tests.e2e.affinity_nodes``).

``TestModelProbe`` takes the MODEL of a ``CheckpointLoaderSimple`` and borrows its UNet from the
model manager for ``seconds``, like a sampler would: a worker whose manager evicted the model
loads it again, as on a real GPU.
"""

from __future__ import annotations

from engine.schema import MODEL, NodeSpec, float_input, link

_OPS = "tests.e2e.affinity_ops"

NODE_SPECS = (
    NodeSpec(
        "TestModelProbe",
        category="testing",
        impl=f"{_OPS}:model_probe",
        description="Uses a MODEL (its weights on the device) for `seconds`, reporting progress.",
        required=(link("model", MODEL), float_input("seconds", 0.5, 0.0, 60.0, step=0.01)),
        output_node=True,
    ),
)

"""Nodes for the model-affinity test (``KILN_NODE_MODULES=tests.e2e.affinity_nodes``).

``TestModelProbe`` takes the MODEL of a ``CheckpointLoaderSimple`` and borrows its UNet from the
model manager for ``seconds``, like a sampler would: a worker whose manager evicted the model
loads it again, as on a real GPU.

``TestSimulatedCheckpointLoader`` is left only for the gateway's routing tests
(tests/api/test_routing.py), which validate prompts with it: it now loads through the model
manager exactly as ``CheckpointLoaderSimple`` does (MODEL only). Remove it once they use
``CheckpointLoaderSimple``.
"""

from __future__ import annotations

from engine.schema import MODEL, ChoiceSource, NodeSpec, OutputSpec, combo, float_input, link

_OPS = "tests.e2e.affinity_ops"

NODE_SPECS = (
    NodeSpec(
        "TestSimulatedCheckpointLoader",
        category="testing",
        impl=f"{_OPS}:simulated_checkpoint_loader",
        description="CheckpointLoaderSimple's MODEL (kept for the gateway's routing tests).",
        required=(combo("ckpt_name", ChoiceSource("models:checkpoints"), is_path=True),),
        outputs=(OutputSpec(MODEL),),
    ),
    NodeSpec(
        "TestModelProbe",
        category="testing",
        impl=f"{_OPS}:model_probe",
        description="Uses a MODEL (its weights on the device) for `seconds`, reporting progress.",
        required=(link("model", MODEL), float_input("seconds", 0.5, 0.0, 60.0, step=0.01)),
        output_node=True,
    ),
)

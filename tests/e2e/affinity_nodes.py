"""Nodes for the model-affinity test (``KILN_NODE_MODULES=tests.e2e.affinity_nodes``).

``TestSimulatedCheckpointLoader`` stands in for ``CheckpointLoaderSimple`` until the engine loads
checkpoints: the same ``ckpt_name`` combo over the checkpoints folder and a MODEL first output. The
first time a process uses a checkpoint it hashes the file, sleeps ``KILN_TEST_LOAD_SECONDS``
(default 1.5) and emits ``MODEL_LOADED_EVENT`` as the model manager will; later uses are warm.
``TestModelProbe`` consumes the MODEL and takes ``seconds``, like a sampler would.
"""

from __future__ import annotations

from engine.schema import MODEL, ChoiceSource, NodeSpec, OutputSpec, combo, float_input, link

_OPS = "tests.e2e.affinity_ops"

NODE_SPECS = (
    NodeSpec(
        "TestSimulatedCheckpointLoader",
        category="testing",
        impl=f"{_OPS}:simulated_checkpoint_loader",
        description="Loads a checkpoint the slow way the first time in a process, then keeps it.",
        required=(combo("ckpt_name", ChoiceSource("models:checkpoints"), is_path=True),),
        outputs=(OutputSpec(MODEL),),
    ),
    NodeSpec(
        "TestModelProbe",
        category="testing",
        impl=f"{_OPS}:model_probe",
        description="Uses a MODEL for `seconds`, reporting progress.",
        required=(link("model", MODEL), float_input("seconds", 0.5, 0.0, 60.0, step=0.01)),
        output_node=True,
    ),
)

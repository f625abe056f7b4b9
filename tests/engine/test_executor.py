"""The executor: dependency order, cache across prompts, events, interruption, failures, lists."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine.cache import OutputCache
from engine.context import NodeContext, Services
from engine.errors import ExecutionInterrupted, NodeExecutionError
from engine.events import ListSink
from engine.executor import Executor
from engine.interrupt import InterruptFlag
from engine.io import LocalFolderSink, LocalInputResolver
from engine.nodes import builtin_specs
from engine.registry import NodeRegistry
from engine.schema import IMAGE, INT, NodeSpec, OutputSpec, int_input, link
from engine.validation import validate_prompt
from tests.engine.prompts import invert_prompt, two_branch_prompt

# -- test-only nodes ---------------------------------------------------------------------------


def failing_node(ctx: NodeContext, image: torch.Tensor) -> tuple[torch.Tensor]:
    raise RuntimeError("boom")


def stepping_node(ctx: NodeContext, image: torch.Tensor, steps: int) -> tuple[torch.Tensor]:
    for step in range(steps):
        ctx.progress(step + 1, steps)
        if step == 1:
            ctx.interrupt.request()  # as if a client asked to stop mid-sampling
    return (image,)


def counting_node(ctx: NodeContext, count: int) -> tuple[list[int]]:
    return (list(range(count)),)


def image_of_value(ctx: NodeContext, value: int) -> tuple[torch.Tensor]:
    return (torch.full((1, 2, 2, 3), value / 10.0),)


def wrong_return(ctx: NodeContext, image: torch.Tensor) -> torch.Tensor:
    return image


TEST_SPECS = (
    NodeSpec(
        "Fail",
        "test",
        "tests.engine.test_executor:failing_node",
        required=(link("image", IMAGE),),
        outputs=(OutputSpec(IMAGE),),
    ),
    NodeSpec(
        "Stepper",
        "test",
        "tests.engine.test_executor:stepping_node",
        required=(link("image", IMAGE), int_input("steps", 4, 1, 100)),
        outputs=(OutputSpec(IMAGE),),
    ),
    NodeSpec(
        "Count",
        "test",
        "tests.engine.test_executor:counting_node",
        required=(int_input("count", 3, 1, 10),),
        outputs=(OutputSpec(INT, is_list=True),),
    ),
    NodeSpec(
        "ImageOfValue",
        "test",
        "tests.engine.test_executor:image_of_value",
        required=(link("value", INT),),
        outputs=(OutputSpec(IMAGE),),
    ),
    NodeSpec(
        "WrongReturn",
        "test",
        "tests.engine.test_executor:wrong_return",
        required=(link("image", IMAGE),),
        outputs=(OutputSpec(IMAGE),),
    ),
)


@pytest.fixture
def test_registry() -> NodeRegistry:
    return NodeRegistry([*builtin_specs(), *TEST_SPECS])


@pytest.fixture
def executor(tmp_path: Path, test_registry: NodeRegistry) -> Executor:
    services = Services(
        outputs=LocalFolderSink(tmp_path / "output", tmp_path / "temp"),
        inputs=LocalInputResolver(tmp_path / "input"),
    )
    return Executor(test_registry, services, OutputCache(max_entries=32))


def run(executor: Executor, prompt: dict[str, Any], **kwargs: Any) -> tuple[Any, ListSink]:
    sink = ListSink()
    validated = validate_prompt(prompt, executor.registry)
    result = executor.execute(validated, original_prompt=prompt, events=sink, **kwargs)
    return result, sink


def executed_nodes(sink: ListSink) -> list[str]:
    return [e["node"] for e in sink.of_type("executing") if e["node"] is not None]


# -- tests ---------------------------------------------------------------------------------------


def test_runs_in_dependency_order_and_writes_expected_pixels(executor):
    prompt = invert_prompt(color=0x336699, width=5, height=3)
    result, sink = run(executor, prompt, prompt_id="p1")
    assert executed_nodes(sink) == ["1", "2", "3"]
    assert result.outputs == {
        "3": {"images": [{"filename": "test_00001_.png", "subfolder": "", "type": "output"}]}
    }
    saved = result.saved[0]
    with Image.open(saved.location) as image:
        pixels = np.array(image)
        text = image.text
    # float32 arithmetic, then truncation to uint8, as ComfyUI saves images.
    channels = np.array([0x33 / 255, 0x66 / 255, 0x99 / 255], dtype=np.float32)
    expected = (np.float32(255.0) * (np.float32(1.0) - channels)).astype(np.uint8)
    assert pixels.shape == (3, 5, 3)
    assert (pixels == expected).all()
    assert json.loads(text["prompt"]) == prompt


def test_event_sequence_and_payloads(executor):
    result, sink = run(executor, invert_prompt(), prompt_id="p1")
    types = [e.type for e in sink.events]
    assert types == [
        "execution_start",
        "execution_cached",
        "executing",
        "executing",
        "executing",
        "executed",
        "execution_success",
        "executing",
    ]
    start, cached = sink.events[0].data, sink.events[1].data
    assert start["prompt_id"] == "p1" and isinstance(start["timestamp"], int)
    assert cached == {"nodes": [], "prompt_id": "p1", "timestamp": cached["timestamp"]}
    assert sink.events[2].data == {"node": "1", "display_node": "1", "prompt_id": "p1"}
    executed = sink.of_type("executed")[0]
    assert executed == {"node": "3", "display_node": "3", "output": result.outputs["3"], "prompt_id": "p1"}
    assert sink.events[-1].data == {"node": None, "prompt_id": "p1"}


def test_second_run_reexecutes_only_what_depends_on_the_change(executor):
    run(executor, two_branch_prompt(color_a=0, color_b=0xFFFFFF))
    result, sink = run(executor, two_branch_prompt(color_a=0x101010, color_b=0xFFFFFF))
    assert sorted(sink.of_type("execution_cached")[0]["nodes"]) == ["4", "5"]
    # Branch b's SaveImage still runs (outputs always do); branch a re-runs from the change.
    assert executed_nodes(sink) == ["1", "2", "3", "6"]
    assert result.cached == ["4", "5"]


def test_identical_rerun_only_runs_outputs(executor):
    run(executor, invert_prompt())
    result, sink = run(executor, invert_prompt())
    assert executed_nodes(sink) == ["3"]
    assert result.saved[0].filename == "test_00002_.png"


def test_cache_is_keyed_by_inputs_not_node_ids(executor):
    run(executor, invert_prompt())
    renumbered = {
        "a": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 6, "batch_size": 1, "color": 0x336699},
        },
        "b": {"class_type": "ImageInvert", "inputs": {"image": ["a", 0]}},
        "c": {"class_type": "SaveImage", "inputs": {"images": ["b", 0], "filename_prefix": "test"}},
    }
    _, sink = run(executor, renumbered)
    assert executed_nodes(sink) == ["c"]


def test_cache_is_bounded_lru(tmp_path, test_registry):
    services = Services(
        outputs=LocalFolderSink(tmp_path / "o", tmp_path / "t"), inputs=LocalInputResolver(tmp_path)
    )
    small = Executor(test_registry, services, OutputCache(max_entries=2))
    run(small, invert_prompt(color=1))
    run(small, invert_prompt(color=2))
    assert len(small.cache) == 2
    _, sink = run(small, invert_prompt(color=1))
    assert executed_nodes(sink) == ["1", "2", "3"]  # evicted by the second prompt


def test_node_failure_raises_typed_error_and_emits_event(executor):
    prompt = invert_prompt()
    prompt["2"] = {"class_type": "Fail", "inputs": {"image": ["1", 0]}}
    with pytest.raises(NodeExecutionError) as info:
        run(executor, prompt, prompt_id="p2")
    error = info.value
    assert (error.node_id, error.class_type, error.exception_message) == ("2", "Fail", "boom")
    assert error.exception_type == "RuntimeError"
    assert any("failing_node" in line for line in error.traceback)


def test_node_failure_event_payload(executor):
    prompt = invert_prompt()
    prompt["2"] = {"class_type": "Fail", "inputs": {"image": ["1", 0]}}
    sink = ListSink()
    with pytest.raises(NodeExecutionError):
        executor.execute(validate_prompt(prompt, executor.registry), prompt_id="p2", events=sink)
    [event] = sink.of_type("execution_error")
    assert event["node_id"] == "2" and event["node_type"] == "Fail"
    assert event["executed"] == ["1"]
    assert event["exception_message"] == "boom" and event["exception_type"] == "RuntimeError"
    assert isinstance(event["traceback"], list) and event["prompt_id"] == "p2"
    assert "execution_success" not in [e.type for e in sink.events]


def test_wrong_return_shape_is_a_node_error(executor):
    prompt = invert_prompt()
    prompt["2"] = {"class_type": "WrongReturn", "inputs": {"image": ["1", 0]}}
    with pytest.raises(NodeExecutionError) as info:
        run(executor, prompt)
    assert info.value.node_id == "2" and "tuple" in info.value.exception_message


def test_failed_node_is_not_cached(executor):
    prompt = invert_prompt()
    prompt["2"] = {"class_type": "Fail", "inputs": {"image": ["1", 0]}}
    with pytest.raises(NodeExecutionError):
        run(executor, prompt)
    with pytest.raises(NodeExecutionError):
        run(executor, prompt)


def test_progress_and_interruption_within_a_step(executor):
    prompt = invert_prompt()
    prompt["2"] = {"class_type": "Stepper", "inputs": {"image": ["1", 0], "steps": 10}}
    sink = ListSink()
    with pytest.raises(ExecutionInterrupted) as info:
        executor.execute(validate_prompt(prompt, executor.registry), prompt_id="p3", events=sink)
    assert info.value.node_id == "2"
    assert [(p["value"], p["max"], p["node"]) for p in sink.of_type("progress")] == [
        (1, 10, "2"),
        (2, 10, "2"),
    ]
    [event] = sink.of_type("execution_interrupted")
    assert event == {
        "node_id": "2",
        "node_type": "Stepper",
        "executed": ["1"],
        "prompt_id": "p3",
        "timestamp": event["timestamp"],
    }


def test_interrupt_before_start_runs_nothing(executor):
    flag = InterruptFlag()
    flag.request()
    sink = ListSink()
    with pytest.raises(ExecutionInterrupted):
        executor.execute(validate_prompt(invert_prompt(), executor.registry), events=sink, interrupt=flag)
    assert executed_nodes(sink) == []


def test_list_outputs_map_downstream_nodes_over_items(executor):
    prompt = {
        "1": {"class_type": "Count", "inputs": {"count": 3}},
        "2": {"class_type": "ImageOfValue", "inputs": {"value": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "list"}},
    }
    result, _ = run(executor, prompt)
    assert [s.filename for s in result.saved] == ["list_00001_.png", "list_00002_.png", "list_00003_.png"]
    values = [np.array(Image.open(io.BytesIO(Path(s.location).read_bytes())))[0, 0, 0] for s in result.saved]
    assert values == [0, int(255 * 0.1), int(255 * 0.2)]


def test_extra_pnginfo_is_written(executor):
    prompt = invert_prompt()
    result, _ = run(executor, prompt, extra_data={"extra_pnginfo": {"workflow": {"nodes": [1]}}})
    with Image.open(result.saved[0].location) as image:
        assert json.loads(image.text["workflow"]) == {"nodes": [1]}


def test_loaded_image_cache_follows_file_content(tmp_path, test_registry):
    import os

    from engine.inventory import StaticInventory

    (tmp_path / "input").mkdir()
    picture = tmp_path / "input" / "pic.png"
    Image.new("RGB", (4, 4), (10, 20, 30)).save(picture)
    services = Services(
        outputs=LocalFolderSink(tmp_path / "output", tmp_path / "temp"),
        inputs=LocalInputResolver(tmp_path / "input"),
    )
    executor = Executor(test_registry, services, OutputCache(16))
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "pic.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "copy"}},
    }
    validated = validate_prompt(prompt, test_registry, StaticInventory({"input_images": ["pic.png"]}))
    executor.execute(validated)
    sink = ListSink()
    executor.execute(validated, events=sink)
    assert executed_nodes(sink) == ["2"]

    Image.new("RGB", (4, 4), (200, 100, 50)).save(picture)
    os.utime(picture, ns=(1, 10**18))  # make sure the modification is visible even on coarse clocks
    sink = ListSink()
    result = executor.execute(validated, events=sink)
    assert executed_nodes(sink) == ["1", "2"]
    assert np.array(Image.open(result.saved[0].location))[0, 0].tolist() == [200, 100, 50]

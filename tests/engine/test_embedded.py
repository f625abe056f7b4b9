"""The Python API: ``async with Kiln() as kiln``, streaming events, and GraphBuilder."""

from __future__ import annotations

import asyncio

import pytest

from engine.embedded import Kiln
from engine.errors import PromptValidationError
from engine.graph import GraphBuilder
from engine.registry import default_registry
from tests.engine.prompts import invert_prompt


def test_run_returns_history_shaped_outputs(engine_settings):
    async def main():
        async with Kiln(engine_settings) as kiln:
            return await kiln.run(invert_prompt())

    result = asyncio.run(main())
    assert result.outputs["3"]["images"][0]["filename"] == "test_00001_.png"
    assert (engine_settings.output_dir / "test_00001_.png").exists()


def test_stream_yields_events_in_order(engine_settings):
    async def main():
        async with Kiln(engine_settings) as kiln:
            return [event async for event in kiln.stream(invert_prompt(), prompt_id="s1")]

    events = asyncio.run(main())
    assert events[0].type == "execution_start" and events[-1].type == "executing"
    assert "execution_success" in [e.type for e in events]
    assert all(e.data["prompt_id"] == "s1" for e in events)


def test_invalid_prompt_raises_before_running(engine_settings):
    async def main():
        async with Kiln(engine_settings) as kiln:
            prompt = invert_prompt()
            prompt["2"]["class_type"] = "Nope"
            await kiln.run(prompt)

    with pytest.raises(PromptValidationError):
        asyncio.run(main())


def test_run_outside_context_manager_is_an_error(engine_settings):
    with pytest.raises(RuntimeError):
        asyncio.run(Kiln(engine_settings).run(invert_prompt()))


def test_graph_builder_builds_api_format(engine_settings):
    g = GraphBuilder(default_registry())
    image = g.node("EmptyImage", width=8, height=6, batch_size=1, color=0x336699)
    inverted = g.node("ImageInvert", image=image.out("IMAGE"))
    g.node("SaveImage", images=inverted, filename_prefix="test")
    assert g.to_prompt() == invert_prompt()
    with pytest.raises(KeyError):
        g.node("NoSuchNode")
    with pytest.raises(KeyError):
        image.out("MASK")

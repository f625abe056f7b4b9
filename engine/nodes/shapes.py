"""Cost-estimate rules shared by node declarations: the shape of the image or latent a node makes,
from its constant inputs and the shapes of its linked inputs (see ``NodeSpec.shape``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.schema import Shape, ShapeRule

Inputs = Mapping[str, Any]
Shapes = Mapping[str, "Shape | None"]


def sized(constants: Inputs, _: Shapes) -> Shape:
    """width x height x batch_size from the node's own inputs (EmptyImage, EmptyLatentImage)."""
    return Shape(
        int(constants.get("width", 1)) * int(constants.get("height", 1)), int(constants.get("batch_size", 1))
    )


def same_as(name: str) -> ShapeRule:
    """The shape of the linked input ``name``."""

    def rule(_: Inputs, linked: Shapes) -> Shape | None:
        return linked.get(name)

    return rule


def resized(source: str) -> ShapeRule:
    """``source`` resized to width x height (a 0 side keeps the source's size)."""

    def rule(constants: Inputs, linked: Shapes) -> Shape | None:
        shape = linked.get(source)
        if shape is None:
            return None
        width, height = int(constants.get("width", 0)), int(constants.get("height", 0))
        return Shape(width * height if width and height else shape.pixels, shape.batch)

    return rule


def scaled_by(source: str) -> ShapeRule:
    """``source`` scaled by the ``scale_by`` input on both sides."""

    def rule(constants: Inputs, linked: Shapes) -> Shape | None:
        shape = linked.get(source)
        if shape is None:
            return None
        scale = float(constants.get("scale_by", 1.0))
        return Shape(int(shape.pixels * scale * scale), shape.batch)

    return rule

"""Declared node schemas: what a node takes, what it returns, and how ComfyUI renders it.

Nothing here imports torch: the gateway validates prompts against these declarations. The
implementation of a node is named by an import path (``"engine.ops.image:invert"``) and only
imported when the node runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

# ComfyUI's socket types. Any other upper-case name is allowed too (custom types link by name).
MODEL = "MODEL"
CLIP = "CLIP"
VAE = "VAE"
CONDITIONING = "CONDITIONING"
LATENT = "LATENT"
IMAGE = "IMAGE"
MASK = "MASK"
UPSCALE_MODEL = "UPSCALE_MODEL"
CLIP_VISION = "CLIP_VISION"
CONTROL_NET = "CONTROL_NET"
SAMPLER = "SAMPLER"
SIGMAS = "SIGMAS"
NOISE = "NOISE"
GUIDER = "GUIDER"
INT = "INT"
FLOAT = "FLOAT"
STRING = "STRING"
BOOLEAN = "BOOLEAN"
COMBO = "COMBO"
ANY = "*"

WIDGET_TYPES = frozenset({INT, FLOAT, STRING, BOOLEAN, COMBO})

# ComfyUI's limit on image sides, used as the max of most width/height inputs.
MAX_RESOLUTION = 16384
# The largest seed ComfyUI accepts (0xffffffffffffffff).
MAX_SEED = 0xFFFFFFFFFFFFFFFF

HiddenKind = Literal["PROMPT", "EXTRA_PNGINFO", "UNIQUE_ID"]
InputCategory = Literal["required", "optional"]


@dataclass(frozen=True)
class ChoiceSource:
    """Choices of a combo input that come from the environment (files in a folder).

    ``kind`` names a listing the inventory answers: ``"input_images"`` or ``"models:<folder>"``.
    """

    kind: str


@dataclass(frozen=True)
class InputSpec:
    """One input of a node, as ComfyUI declares it in ``INPUT_TYPES``."""

    name: str
    type: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    round: float | bool | None = None
    choices: tuple[Any, ...] | ChoiceSource | None = None
    multiline: bool = False
    tooltip: str | None = None
    # True for inputs that name a file (model, image, output prefix): checked for traversal.
    is_path: bool = False
    # Further ComfyUI options passed through to object_info verbatim (image_upload, display, ...).
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES

    def object_info_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.default is not None:
            opts["default"] = self.default
        for key in ("min", "max", "step", "round"):
            value = getattr(self, key)
            if value is not None:
                opts[key] = value
        if self.multiline:
            opts["multiline"] = True
        if self.tooltip:
            opts["tooltip"] = self.tooltip
        opts.update(self.options)
        return opts


@dataclass(frozen=True)
class OutputSpec:
    """One output slot of a node."""

    type: str
    name: str | None = None
    is_list: bool = False
    tooltip: str | None = None

    @property
    def display_name(self) -> str:
        return self.name or self.type


@dataclass(frozen=True)
class Shape:
    """A cost estimate of the image or latent flowing through a link: pixels per item x batch."""

    pixels: int
    batch: int = 1

    @property
    def volume(self) -> int:
        return self.pixels * self.batch


# A shape rule: (constant inputs after coercion, shapes of linked inputs) -> shape of the output.
ShapeRule = Callable[[Mapping[str, Any], Mapping[str, "Shape | None"]], "Shape | None"]


@dataclass(frozen=True)
class NodeSpec:
    """A node class: its declared inputs and outputs, and where its implementation lives."""

    class_type: str
    category: str
    impl: str
    required: tuple[InputSpec, ...] = ()
    optional: tuple[InputSpec, ...] = ()
    hidden: Mapping[str, HiddenKind] = field(default_factory=dict)
    outputs: tuple[OutputSpec, ...] = ()
    output_node: bool = False
    display_name: str | None = None
    description: str = ""
    input_is_list: bool = False
    # Whether a result may be reused across prompts. Output nodes always run.
    cacheable: bool = True
    # Import path of ``fingerprint(inputs, ctx) -> str``: extra cache-key data that the inputs
    # alone do not capture (the content hash of a loaded file).
    fingerprint: str | None = None
    # Cost estimation: the shape of the IMAGE/LATENT this node produces, and the input holding
    # a step count (samplers cost steps x pixels x batch of their latent).
    shape: ShapeRule | None = None
    steps_input: str | None = None
    python_module: str = "nodes"

    def __post_init__(self) -> None:
        names = [i.name for i in (*self.required, *self.optional)] + list(self.hidden)
        if len(names) != len(set(names)):
            raise ValueError(f"{self.class_type}: duplicate input names in {names}")
        if ":" not in self.impl:
            raise ValueError(f"{self.class_type}: impl must be 'module:function', got {self.impl!r}")

    def input(self, name: str) -> tuple[InputSpec, InputCategory] | None:
        for spec in self.required:
            if spec.name == name:
                return spec, "required"
        for spec in self.optional:
            if spec.name == name:
                return spec, "optional"
        return None

    @property
    def declared_inputs(self) -> tuple[InputSpec, ...]:
        return (*self.required, *self.optional)

    @property
    def output_types(self) -> tuple[str, ...]:
        return tuple(o.type for o in self.outputs)


def combo(name: str, choices: Sequence[Any] | ChoiceSource, **kwargs: Any) -> InputSpec:
    """A combo input: a value that must be one of ``choices``."""
    fixed = choices if isinstance(choices, ChoiceSource) else tuple(choices)
    # Like ComfyUI, a combo declares no default unless asked: clients take the first choice.
    return InputSpec(name=name, type=COMBO, choices=fixed, **kwargs)


def int_input(name: str, default: int, min: int, max: int, step: int = 1, **kwargs: Any) -> InputSpec:
    return InputSpec(name=name, type=INT, default=default, min=min, max=max, step=step, **kwargs)


def float_input(
    name: str, default: float, min: float, max: float, step: float = 0.01, **kwargs: Any
) -> InputSpec:
    return InputSpec(name=name, type=FLOAT, default=default, min=min, max=max, step=step, **kwargs)


def string_input(name: str, default: str = "", **kwargs: Any) -> InputSpec:
    return InputSpec(name=name, type=STRING, default=default, **kwargs)


def bool_input(name: str, default: bool, **kwargs: Any) -> InputSpec:
    return InputSpec(name=name, type=BOOLEAN, default=default, **kwargs)


def link(name: str, type_: str, **kwargs: Any) -> InputSpec:
    """An input fed by another node's output (MODEL, IMAGE, ...)."""
    return InputSpec(name=name, type=type_, **kwargs)

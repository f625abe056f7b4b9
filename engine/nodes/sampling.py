"""Declarations of the sampler nodes (ComfyUI's KSampler family in nodes.py and the model-bound
custom-sampling nodes of comfy_extras/nodes_custom_sampler: schedulers, guiders, SamplerCustom)."""

from __future__ import annotations

from engine.nodes.shapes import same_as
from engine.sampling.names import SAMPLER_NAMES, SCHEDULER_NAMES
from engine.schema import (
    BOOLEAN,
    CONDITIONING,
    GUIDER,
    LATENT,
    MAX_SEED,
    MODEL,
    NOISE,
    SAMPLER,
    SIGMAS,
    InputSpec,
    NodeSpec,
    OutputSpec,
    combo,
    float_input,
    int_input,
    link,
)

_OPS = "engine.ops.sampling"
_CUSTOM = "comfy_extras.nodes_custom_sampler"


def _seed(name: str, tooltip: str | None = None) -> InputSpec:
    return int_input(name, 0, 0, MAX_SEED, options={"control_after_generate": True}, tooltip=tooltip)


def _cfg(tooltip: str | None = None) -> InputSpec:
    return float_input("cfg", 8.0, 0.0, 100.0, step=0.1, round=0.01, tooltip=tooltip)


def _denoise(tooltip: str | None = None) -> InputSpec:
    return float_input("denoise", 1.0, 0.0, 1.0, step=0.01, tooltip=tooltip)


_KSAMPLER_INPUTS = (
    link("model", MODEL, tooltip="The model used for denoising the input latent."),
    _seed("seed", "The random seed used for creating the noise."),
    int_input("steps", 20, 1, 10000, tooltip="The number of steps used in the denoising process."),
    _cfg(
        "The Classifier-Free Guidance scale balances creativity and adherence to the prompt. Higher "
        "values result in images more closely matching the prompt however too high values will "
        "negatively impact quality."
    ),
    combo(
        "sampler_name",
        SAMPLER_NAMES,
        tooltip="The algorithm used when sampling, this can affect the quality, speed, and style of the "
        "generated output.",
    ),
    combo(
        "scheduler",
        SCHEDULER_NAMES,
        tooltip="The scheduler controls how noise is gradually removed to form the image.",
    ),
    link(
        "positive",
        CONDITIONING,
        tooltip="The conditioning describing the attributes you want to include in the image.",
    ),
    link(
        "negative",
        CONDITIONING,
        tooltip="The conditioning describing the attributes you want to exclude from the image.",
    ),
    link("latent_image", LATENT, tooltip="The latent image to denoise."),
    _denoise(
        "The amount of denoising applied, lower values will maintain the structure of the initial image "
        "allowing for image to image sampling."
    ),
)

_SAMPLER_OUTPUTS = (
    OutputSpec(LATENT, name="output"),
    OutputSpec(LATENT, name="denoised_output"),
)

SAMPLING_NODE_SPECS = (
    NodeSpec(
        "KSampler",
        category="sampling",
        impl=f"{_OPS}:ksampler",
        required=_KSAMPLER_INPUTS,
        outputs=(OutputSpec(LATENT, tooltip="The denoised latent."),),
        description=(
            "Uses the provided model, positive and negative conditioning to denoise the latent image."
        ),
        shape=same_as("latent_image"),
        steps_input="steps",
    ),
    NodeSpec(
        "KSamplerAdvanced",
        category="sampling",
        impl=f"{_OPS}:ksampler_advanced",
        required=(
            link("model", MODEL),
            combo("add_noise", ("enable", "disable")),
            _seed("noise_seed"),
            int_input("steps", 20, 1, 10000),
            _cfg(),
            combo("sampler_name", SAMPLER_NAMES),
            combo("scheduler", SCHEDULER_NAMES),
            link("positive", CONDITIONING),
            link("negative", CONDITIONING),
            link("latent_image", LATENT),
            int_input("start_at_step", 0, 0, 10000),
            int_input("end_at_step", 10000, 0, 10000),
            combo("return_with_leftover_noise", ("disable", "enable")),
        ),
        outputs=(OutputSpec(LATENT),),
        shape=same_as("latent_image"),
        steps_input="steps",
    ),
    NodeSpec(
        "SamplerCustom",
        category="sampling/custom_sampling",
        impl=f"{_OPS}:sampler_custom",
        required=(
            link("model", MODEL),
            InputSpec("add_noise", BOOLEAN, default=True),
            _seed("noise_seed"),
            _cfg(),
            link("positive", CONDITIONING),
            link("negative", CONDITIONING),
            link("sampler", SAMPLER),
            link("sigmas", SIGMAS),
            link("latent_image", LATENT),
        ),
        outputs=_SAMPLER_OUTPUTS,
        shape=same_as("latent_image"),
        python_module=_CUSTOM,
    ),
    NodeSpec(
        "SamplerCustomAdvanced",
        category="sampling/custom_sampling",
        impl=f"{_OPS}:sampler_custom_advanced",
        required=(
            link("noise", NOISE),
            link("guider", GUIDER),
            link("sampler", SAMPLER),
            link("sigmas", SIGMAS),
            link("latent_image", LATENT),
        ),
        outputs=_SAMPLER_OUTPUTS,
        shape=same_as("latent_image"),
        python_module=_CUSTOM,
    ),
    NodeSpec(
        "BasicScheduler",
        category="sampling/custom_sampling/schedulers",
        impl=f"{_OPS}:basic_scheduler",
        required=(
            link("model", MODEL),
            combo("scheduler", SCHEDULER_NAMES),
            int_input("steps", 20, 1, 10000),
            _denoise(),
        ),
        outputs=(OutputSpec(SIGMAS),),
        python_module=_CUSTOM,
    ),
    NodeSpec(
        "SDTurboScheduler",
        category="sampling/custom_sampling/schedulers",
        impl=f"{_OPS}:sd_turbo_scheduler",
        required=(link("model", MODEL), int_input("steps", 1, 1, 10), _denoise()),
        outputs=(OutputSpec(SIGMAS),),
        python_module=_CUSTOM,
    ),
    NodeSpec(
        "BasicGuider",
        category="sampling/custom_sampling/guiders",
        impl=f"{_OPS}:basic_guider",
        required=(link("model", MODEL), link("conditioning", CONDITIONING)),
        outputs=(OutputSpec(GUIDER),),
        python_module=_CUSTOM,
    ),
    NodeSpec(
        "CFGGuider",
        category="sampling/custom_sampling/guiders",
        impl=f"{_OPS}:cfg_guider",
        required=(
            link("model", MODEL),
            link("positive", CONDITIONING),
            link("negative", CONDITIONING),
            _cfg(),
        ),
        outputs=(OutputSpec(GUIDER),),
        python_module=_CUSTOM,
    ),
)

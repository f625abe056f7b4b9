"""Declarations of the custom-sampling building blocks that need no model: sampler choice,
schedules, sigma manipulation and noise sources (ComfyUI's comfy_extras/nodes_custom_sampler)."""

from __future__ import annotations

from engine.sampling.names import SAMPLER_NAMES
from engine.schema import (
    MAX_SEED,
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

_MODULE = "comfy_extras.nodes_custom_sampler"
_OPS = "engine.ops.custom_sampling"


def _sigma(name: str, default: float) -> InputSpec:
    return float_input(name, default, 0.0, 5000.0, step=0.01, round=False)


CUSTOM_SAMPLING_NODE_SPECS = (
    NodeSpec(
        "KSamplerSelect",
        category="sampling/custom_sampling/samplers",
        impl=f"{_OPS}:ksampler_select",
        required=(combo("sampler_name", SAMPLER_NAMES),),
        outputs=(OutputSpec(SAMPLER),),
        python_module=_MODULE,
    ),
    NodeSpec(
        "KarrasScheduler",
        category="sampling/custom_sampling/schedulers",
        impl=f"{_OPS}:karras_scheduler",
        required=(
            int_input("steps", 20, 1, 10000),
            _sigma("sigma_max", 14.614642),
            _sigma("sigma_min", 0.0291675),
            float_input("rho", 7.0, 0.0, 100.0, step=0.01, round=False),
        ),
        outputs=(OutputSpec(SIGMAS),),
        python_module=_MODULE,
    ),
    NodeSpec(
        "ExponentialScheduler",
        category="sampling/custom_sampling/schedulers",
        impl=f"{_OPS}:exponential_scheduler",
        required=(
            int_input("steps", 20, 1, 10000),
            _sigma("sigma_max", 14.614642),
            _sigma("sigma_min", 0.0291675),
        ),
        outputs=(OutputSpec(SIGMAS),),
        python_module=_MODULE,
    ),
    NodeSpec(
        "PolyexponentialScheduler",
        category="sampling/custom_sampling/schedulers",
        impl=f"{_OPS}:polyexponential_scheduler",
        required=(
            int_input("steps", 20, 1, 10000),
            _sigma("sigma_max", 14.614642),
            _sigma("sigma_min", 0.0291675),
            float_input("rho", 1.0, 0.0, 100.0, step=0.01, round=False),
        ),
        outputs=(OutputSpec(SIGMAS),),
        python_module=_MODULE,
    ),
    NodeSpec(
        "SplitSigmas",
        category="sampling/custom_sampling/sigmas",
        impl=f"{_OPS}:split_sigmas",
        required=(link("sigmas", SIGMAS), int_input("step", 0, 0, 10000)),
        outputs=(OutputSpec(SIGMAS, name="high_sigmas"), OutputSpec(SIGMAS, name="low_sigmas")),
        python_module=_MODULE,
    ),
    NodeSpec(
        "FlipSigmas",
        category="sampling/custom_sampling/sigmas",
        impl=f"{_OPS}:flip_sigmas",
        required=(link("sigmas", SIGMAS),),
        outputs=(OutputSpec(SIGMAS),),
        python_module=_MODULE,
    ),
    NodeSpec(
        "RandomNoise",
        category="sampling/custom_sampling/noise",
        impl=f"{_OPS}:random_noise",
        required=(int_input("noise_seed", 0, 0, MAX_SEED, options={"control_after_generate": True}),),
        outputs=(OutputSpec(NOISE),),
        python_module=_MODULE,
    ),
    NodeSpec(
        "DisableNoise",
        category="sampling/custom_sampling/noise",
        impl=f"{_OPS}:disable_noise",
        outputs=(OutputSpec(NOISE),),
        python_module=_MODULE,
    ),
)

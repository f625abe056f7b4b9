"""Declarations of the VAE nodes (ComfyUI's names and specs). LATENT values are dicts
``{"samples": [B,4,H/8,W/8], "noise_mask"?: [B,1,H,W], "batch_index"?: [int]}``, raw VAE latents
(the model's latent format scales them inside the sampler)."""

from __future__ import annotations

from typing import Any

from engine.nodes.shapes import same_as
from engine.schema import (
    CONDITIONING,
    IMAGE,
    LATENT,
    MASK,
    VAE,
    NodeSpec,
    OutputSpec,
    bool_input,
    int_input,
    link,
)

_OPS = "engine.ops.vae"


def _temporal_inputs(action: str) -> tuple[Any, ...]:
    return (
        int_input(
            "temporal_size",
            64,
            8,
            4096,
            step=4,
            tooltip=f"Only used for video VAEs: Amount of frames to {action} at a time.",
        ),
        int_input(
            "temporal_overlap",
            8,
            4,
            4096,
            step=4,
            tooltip="Only used for video VAEs: Amount of frames to overlap.",
        ),
    )


VAE_NODE_SPECS = (
    NodeSpec(
        "VAEDecode",
        category="latent",
        impl=f"{_OPS}:vae_decode",
        required=(
            link("samples", LATENT, tooltip="The latent to be decoded."),
            link("vae", VAE, tooltip="The VAE model used for decoding the latent."),
        ),
        outputs=(OutputSpec(IMAGE, tooltip="The decoded image."),),
        display_name="VAE Decode",
        description="Decodes latent images back into pixel space images.",
        shape=same_as("samples"),
    ),
    NodeSpec(
        "VAEEncode",
        category="latent",
        impl=f"{_OPS}:vae_encode",
        required=(link("pixels", IMAGE), link("vae", VAE)),
        outputs=(OutputSpec(LATENT),),
        display_name="VAE Encode",
        shape=same_as("pixels"),
    ),
    NodeSpec(
        "VAEDecodeTiled",
        category="_for_testing",
        impl=f"{_OPS}:vae_decode_tiled",
        required=(
            link("samples", LATENT),
            link("vae", VAE),
            int_input("tile_size", 512, 64, 4096, step=32),
            int_input("overlap", 64, 0, 4096, step=32),
            *_temporal_inputs("decode"),
        ),
        outputs=(OutputSpec(IMAGE),),
        display_name="VAE Decode (Tiled)",
        shape=same_as("samples"),
    ),
    NodeSpec(
        "VAEEncodeTiled",
        category="_for_testing",
        impl=f"{_OPS}:vae_encode_tiled",
        required=(
            link("pixels", IMAGE),
            link("vae", VAE),
            int_input("tile_size", 512, 64, 4096, step=64),
            int_input("overlap", 64, 0, 4096, step=32),
            *_temporal_inputs("encode"),
        ),
        outputs=(OutputSpec(LATENT),),
        display_name="VAE Encode (Tiled)",
        shape=same_as("pixels"),
    ),
    NodeSpec(
        "VAEEncodeForInpaint",
        category="latent/inpaint",
        impl=f"{_OPS}:vae_encode_for_inpaint",
        required=(
            link("pixels", IMAGE),
            link("vae", VAE),
            link("mask", MASK),
            int_input("grow_mask_by", 6, 0, 64),
        ),
        outputs=(OutputSpec(LATENT),),
        display_name="VAE Encode (for Inpainting)",
        shape=same_as("pixels"),
    ),
    NodeSpec(
        "InpaintModelConditioning",
        category="conditioning/inpaint",
        impl=f"{_OPS}:inpaint_model_conditioning",
        required=(
            link("positive", CONDITIONING),
            link("negative", CONDITIONING),
            link("vae", VAE),
            link("pixels", IMAGE),
            link("mask", MASK),
            bool_input(
                "noise_mask",
                True,
                tooltip="Add a noise mask to the latent so sampling will only happen within the mask. Might "
                "improve results or completely break things depending on the model.",
            ),
        ),
        outputs=(
            OutputSpec(CONDITIONING, name="positive"),
            OutputSpec(CONDITIONING, name="negative"),
            OutputSpec(LATENT, name="latent"),
        ),
        shape=same_as("pixels"),
    ),
)

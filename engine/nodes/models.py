"""Declarations of the model loader nodes and CLIPSetLastLayer (ComfyUI's names and specs).

Model combos list the files of ComfyUI's model folders (plus known models the hub can fetch); each
loader's ``fingerprint`` is the file's content hash, so cached outputs follow the file, not its name.
"""

from __future__ import annotations

from engine.schema import (
    CLIP,
    MODEL,
    VAE,
    ChoiceSource,
    NodeSpec,
    OutputSpec,
    combo,
    int_input,
    link,
)

CHECKPOINTS = ChoiceSource("models:checkpoints")
VAES = ChoiceSource("models:vae")
TEXT_ENCODERS = ChoiceSource("models:text_encoders")
DIFFUSION_MODELS = ChoiceSource("models:diffusion_models")

# The LDM configs ComfyUI ships in models/configs (CheckpointLoader's first combo). Kiln infers the
# architecture from the weights; a config only adds what ComfyUI's load_checkpoint reads from it.
CHECKPOINT_CONFIGS = (
    "anything_v3.yaml",
    "v1-inference.yaml",
    "v1-inference_clip_skip_2.yaml",
    "v1-inference_clip_skip_2_fp16.yaml",
    "v1-inference_fp16.yaml",
    "v1-inpainting-inference.yaml",
    "v2-inference-v.yaml",
    "v2-inference-v_fp32.yaml",
    "v2-inference.yaml",
    "v2-inference_fp32.yaml",
    "v2-inpainting-inference.yaml",
)
# ComfyUI's CLIPLoader types; Kiln runs "stable_diffusion" (SD1.x CLIP-L, SD2.x OpenCLIP-H).
CLIP_TYPES = (
    "stable_diffusion",
    "stable_cascade",
    "sd3",
    "stable_audio",
    "mochi",
    "ltxv",
    "pixart",
    "cosmos",
    "lumina2",
    "wan",
    "hidream",
    "chroma",
    "ace",
    "omnigen2",
    "qwen_image",
    "hunyuan_image",
    "flux2",
    "ovis",
)
CLIP_LOADER_DESCRIPTION = (
    "[Recipes]\n\nstable_diffusion: clip-l\nstable_cascade: clip-g\nsd3: t5 xxl/ clip-g / clip-l\n"
    "stable_audio: t5 base\nmochi: t5 xxl\ncosmos: old t5 xxl\nlumina2: gemma 2 2B\nwan: umt5 xxl\n"
    " hidream: llama-3.1 (Recommend) or t5\nomnigen2: qwen vl 2.5 3B"
)
UNET_WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")

_OPS = "engine.ops.models"
_LOADER_OUTPUTS = (
    OutputSpec(MODEL, tooltip="The model used for denoising latents."),
    OutputSpec(CLIP, tooltip="The CLIP model used for encoding text prompts."),
    OutputSpec(VAE, tooltip="The VAE model used for encoding and decoding images to and from latent space."),
)

MODEL_NODE_SPECS = (
    NodeSpec(
        "CheckpointLoaderSimple",
        category="loaders",
        impl=f"{_OPS}:checkpoint_loader_simple",
        fingerprint=f"{_OPS}:checkpoint_fingerprint",
        required=(
            combo(
                "ckpt_name", CHECKPOINTS, is_path=True, tooltip="The name of the checkpoint (model) to load."
            ),
        ),
        outputs=_LOADER_OUTPUTS,
        display_name="Load Checkpoint",
        description="Loads a diffusion model checkpoint, diffusion models are used to denoise latents.",
    ),
    NodeSpec(
        "CheckpointLoader",
        category="advanced/loaders",
        impl=f"{_OPS}:checkpoint_loader",
        fingerprint=f"{_OPS}:checkpoint_fingerprint",
        required=(combo("config_name", CHECKPOINT_CONFIGS), combo("ckpt_name", CHECKPOINTS, is_path=True)),
        outputs=(OutputSpec(MODEL), OutputSpec(CLIP), OutputSpec(VAE)),
        display_name="Load Checkpoint With Config (DEPRECATED)",
    ),
    NodeSpec(
        "VAELoader",
        category="loaders",
        impl=f"{_OPS}:vae_loader",
        fingerprint=f"{_OPS}:vae_fingerprint",
        required=(combo("vae_name", VAES, is_path=True),),
        outputs=(OutputSpec(VAE),),
        display_name="Load VAE",
    ),
    NodeSpec(
        "CLIPLoader",
        category="advanced/loaders",
        impl=f"{_OPS}:clip_loader",
        fingerprint=f"{_OPS}:clip_fingerprint",
        required=(combo("clip_name", TEXT_ENCODERS, is_path=True), combo("type", CLIP_TYPES)),
        optional=(combo("device", ("default", "cpu"), options={"advanced": True}),),
        outputs=(OutputSpec(CLIP),),
        display_name="Load CLIP",
        description=CLIP_LOADER_DESCRIPTION,
    ),
    NodeSpec(
        "UNETLoader",
        category="advanced/loaders",
        impl=f"{_OPS}:unet_loader",
        fingerprint=f"{_OPS}:unet_fingerprint",
        required=(
            combo("unet_name", DIFFUSION_MODELS, is_path=True),
            combo("weight_dtype", UNET_WEIGHT_DTYPES),
        ),
        outputs=(OutputSpec(MODEL),),
        display_name="Load Diffusion Model",
    ),
    NodeSpec(
        "CLIPSetLastLayer",
        category="conditioning",
        impl=f"{_OPS}:clip_set_last_layer",
        required=(link("clip", CLIP), int_input("stop_at_clip_layer", -1, -24, -1)),
        outputs=(OutputSpec(CLIP),),
        display_name="CLIP Set Last Layer",
    ),
)

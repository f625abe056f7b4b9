"""The node catalogue: declarations only (torch-free). Implementations live in ``engine.ops``."""

from __future__ import annotations

from engine.schema import NodeSpec


def builtin_specs() -> list[NodeSpec]:
    """Every built-in node's spec, in catalogue order."""
    from engine.nodes.conditioning import CONDITIONING_NODE_SPECS
    from engine.nodes.custom_sampling import CUSTOM_SAMPLING_NODE_SPECS
    from engine.nodes.image import IMAGE_NODE_SPECS
    from engine.nodes.latent import LATENT_NODE_SPECS
    from engine.nodes.lora import LORA_NODE_SPECS
    from engine.nodes.models import MODEL_NODE_SPECS
    from engine.nodes.sampling import SAMPLING_NODE_SPECS
    from engine.nodes.upscale import UPSCALE_NODE_SPECS
    from engine.nodes.vae import VAE_NODE_SPECS

    return [
        *IMAGE_NODE_SPECS,
        *LATENT_NODE_SPECS,
        *SAMPLING_NODE_SPECS,
        *CUSTOM_SAMPLING_NODE_SPECS,
        *MODEL_NODE_SPECS,
        *LORA_NODE_SPECS,
        *CONDITIONING_NODE_SPECS,
        *VAE_NODE_SPECS,
        *UPSCALE_NODE_SPECS,
    ]

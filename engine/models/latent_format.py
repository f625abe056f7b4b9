"""How a model family's latents relate to the VAE's: scale, channel count and preview colours.

ComfyUI keeps LATENT values in the VAE's raw space and lets the model's latent format scale them on
the way into the sampler (``process_in``) and back out (``process_out``); previews map latent
channels to RGB with ``latent_rgb_factors``. Facts from ComfyUI's ``comfy/latent_formats.py``
(class ``SD15``, used by SD1.x and SD2.x alike). Importing this module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

# Rows are latent channels, columns R, G, B (ComfyUI's SD15.latent_rgb_factors).
SD15_LATENT_RGB_FACTORS: tuple[tuple[float, float, float], ...] = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)


@dataclass(frozen=True)
class LatentFormat:
    """A latent space: ``sampler latent = vae latent * scale_factor``.

    ``latent_rgb_factors`` ([C][3]) and ``latent_rgb_factors_bias`` ([3] or None) give a cheap RGB
    preview of a latent: ``rgb = latent^T @ factors + bias`` per pixel, roughly in -1..1.
    """

    name: str = "sd15"
    scale_factor: float = 0.18215
    latent_channels: int = 4
    downscale_ratio: int = 8
    latent_rgb_factors: tuple[tuple[float, float, float], ...] = SD15_LATENT_RGB_FACTORS
    latent_rgb_factors_bias: tuple[float, float, float] | None = None

    def process_in(self, latent: Tensor) -> Tensor:
        """VAE latent -> the sampler's latent (ComfyUI ``LatentFormat.process_in``)."""
        return latent * self.scale_factor

    def process_out(self, latent: Tensor) -> Tensor:
        """The sampler's latent -> VAE latent (ComfyUI ``LatentFormat.process_out``)."""
        return latent / self.scale_factor

    def preview_rgb(self, latent: Tensor) -> Tensor:
        """A quick RGB preview of ONE latent [C, h, w] in the sampler's space (after ``process_in``,
        what ComfyUI's Latent2RGB previewer gets as x0): [h, w, 3] in 0..1."""
        import torch

        factors = torch.tensor(self.latent_rgb_factors, dtype=torch.float32, device=latent.device)
        rgb = torch.einsum("chw,cr->hwr", latent.float(), factors)
        if self.latent_rgb_factors_bias is not None:
            rgb = rgb + torch.tensor(self.latent_rgb_factors_bias, device=latent.device)
        return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0)


SD15 = LatentFormat()
"""SD1.x and SD2.x (ComfyUI uses its SD15 latent format for both)."""

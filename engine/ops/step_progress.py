"""The sampler's per-step callback: one progress event per step (where interruption is honoured),
a latent preview every ``preview_interval`` steps, and the last step's denoised estimate (the x0
that SamplerCustom returns as ``denoised_output``)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor

from engine.context import NodeContext
from engine.models.latent_format import LatentFormat

# ComfyUI's MAX_PREVIEW_RESOLUTION: previews are scaled down to fit this square.
MAX_PREVIEW_RESOLUTION = 512
_PREVIEW_JPEG_QUALITY = 90


def preview_jpeg(latent_format: LatentFormat, x0: Tensor) -> bytes:
    """A JPEG of the first latent of ``x0`` [B, C, h, w] through the format's latent-to-RGB
    projection (ComfyUI's Latent2RGB previewer): one pixel per latent pixel, capped in size."""
    rgb = latent_format.preview_rgb(x0[0].detach())
    pixels = (rgb.mul(255.0).round().to("cpu").numpy()).astype(np.uint8)
    image = Image.fromarray(pixels, mode="RGB")
    image.thumbnail((MAX_PREVIEW_RESOLUTION, MAX_PREVIEW_RESOLUTION), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=_PREVIEW_JPEG_QUALITY)
    return buffer.getvalue()


class StepReporter:
    """The ``callback`` a sampler calls after each step (see ``engine.sampling.common``)."""

    def __init__(self, ctx: NodeContext, total_steps: int, latent_format: LatentFormat) -> None:
        self.ctx = ctx
        self.total_steps = total_steps
        self.latent_format = latent_format
        self.interval = max(0, int(ctx.services.preview_interval))
        self.x0: Tensor | None = None

    def __call__(self, step: dict[str, Any]) -> None:
        self.x0 = step["denoised"]
        done = int(step["i"]) + 1
        if self.interval and (done % self.interval == 0 or done == self.total_steps):
            self.ctx.preview(preview_jpeg(self.latent_format, self.x0), "JPEG")
        self.ctx.progress(done, self.total_steps)

"""Configurable limits that keep one prompt from exhausting the service."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ValidationLimits:
    """Limits applied when a prompt is parsed and validated. Every field is configurable."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_json_depth: int = 64
    max_nodes: int = 1000
    max_node_id_length: int = 128
    max_string_length: int = 65_536
    # Pixels x batch x steps summed over the graph (a 1024x1024 batch of 4 at 50 steps is 2.1e8).
    max_cost: int = 4096 * 4096 * 16 * 100
    # Assumed size of an image whose size cannot be known before it runs (a loaded image).
    unknown_image_pixels: int = 2048 * 2048


@dataclass(frozen=True)
class DecodeLimits:
    """Caps on an input image before and while it is decoded."""

    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 8192 * 8192
    max_frames: int = 64

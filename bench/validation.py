"""Validation latency of large prompts (target: a 200-node prompt in under 5 ms).

.venv/bin/python bench/validation.py
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any

from engine.registry import default_registry
from engine.validation import validate_prompt


def chain_prompt(nodes: int) -> dict[str, Any]:
    """EmptyImage -> (nodes - 2) alternating image ops -> SaveImage, plus a few side branches."""
    prompt: dict[str, Any] = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}}
    }
    for i in range(2, nodes):
        previous = str(i - 1)
        if i % 3 == 0:
            prompt[str(i)] = {
                "class_type": "ImageScale",
                "inputs": {
                    "image": [previous, 0],
                    "upscale_method": "bilinear",
                    "width": 64,
                    "height": 64,
                    "crop": "center",
                },
            }
        else:
            prompt[str(i)] = {"class_type": "ImageInvert", "inputs": {"image": [previous, 0]}}
    prompt[str(nodes)] = {
        "class_type": "SaveImage",
        "inputs": {"images": [str(nodes - 1), 0], "filename_prefix": "bench/out"},
    }
    return prompt


def measure(nodes: int, repeats: int = 200) -> tuple[float, float]:
    registry = default_registry()
    prompt = chain_prompt(nodes)
    validate_prompt(prompt, registry)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        validate_prompt(prompt, registry)
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95)]


def main() -> None:
    machine = platform.processor() or platform.machine()
    print(f"# validation latency ({machine}, Python {platform.python_version()})")
    print(f"{'nodes':>6} {'median ms':>10} {'p95 ms':>8} {'target':>8}")
    for nodes in (10, 50, 200, 1000):
        median, p95 = measure(nodes)
        target = "< 5 ms" if nodes == 200 else ""
        print(f"{nodes:>6} {median:>10.3f} {p95:>8.3f} {target:>8}")


if __name__ == "__main__":
    main()

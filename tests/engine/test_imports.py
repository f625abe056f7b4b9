"""Declaring and validating nodes must not import torch (the gateway stays torch-free)."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import engine.validation, engine.registry, engine.prompt_json, engine.graph, engine.settings
from engine.registry import default_registry
from engine.validation import validate_prompt
registry = default_registry()
registry.object_info()
prompt = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
}
validate_prompt(prompt, registry)
heavy = sorted(m for m in ("torch", "numpy", "PIL", "safetensors") if m in sys.modules)
print(",".join(heavy))
"""


def test_validation_entry_point_does_not_import_torch():
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""

"""Every workflow in examples/ runs with ``kiln run`` on test models: a tiny SD1.5 checkpoint under the
real file name the examples use, a tiny x4 ESRGAN as RealESRGAN_x4plus and a kohya LoRA for the
checkpoint. The shipped files validate as they are; for the run, image sizes and step counts are
shrunk (a tiny model at 512x512 is slow on two cores, and the sizes change nothing else)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from engine.models.test_checkpoint import write_test_checkpoint, write_test_esrgan, write_test_lora

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
MODEL_EXAMPLES = sorted(p for p in EXAMPLES.glob("*.json") if p.name != "invert.json")
REQUIRED = {
    "txt2img",
    "img2img",
    "hires_latent",
    "hires_esrgan",
    "inpaint",
    "lora",
    "sampler_custom_advanced",
}
RUN_SIZE = 64
RUN_STEPS = 3


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("examples")
    models = root / "models"
    checkpoint = write_test_checkpoint(
        models / "checkpoints" / "v1-5-pruned-emaonly-fp16.safetensors", "sd15", "tiny", seed=11
    )
    write_test_esrgan(models / "upscale_models" / "RealESRGAN_x4plus.safetensors", scale=4, seed=12)
    write_test_lora(models / "loras" / "example-lora.safetensors", checkpoint, seed=13)
    inputs = root / "input"
    inputs.mkdir()
    with Image.open(EXAMPLES / "input" / "example.png") as image:
        assert image.mode == "RGBA"  # the inpainting example's mask is its transparent area
        image.resize((RUN_SIZE, RUN_SIZE)).save(inputs / "example.png")
    output = root / "output"
    return {"root": root, "models": models, "input": inputs, "output": output}


def kiln(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("KILN_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "kiln", "--log-level", "WARNING", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


def shrunk(prompt: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        inputs = node["inputs"]
        if node["class_type"] == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = RUN_SIZE
        for key in ("steps",):
            if isinstance(inputs.get(key), int):
                inputs[key] = min(inputs[key], RUN_STEPS)
    return out


def test_the_examples_are_all_there() -> None:
    assert {p.stem for p in MODEL_EXAMPLES} >= REQUIRED


def test_the_shipped_examples_validate(workspace: dict[str, Path]) -> None:
    result = kiln(
        "validate",
        "--offline",
        "--models-dir",
        str(workspace["models"]),
        "--input-dir",
        str(EXAMPLES / "input"),
        *map(str, MODEL_EXAMPLES),
    )
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line["status"] for line in lines] == ["valid"] * len(MODEL_EXAMPLES), lines


def test_every_example_runs_with_kiln_run(workspace: dict[str, Path], tmp_path: Path) -> None:
    files = []
    for example in MODEL_EXAMPLES:
        path = tmp_path / example.name
        path.write_text(json.dumps(shrunk(json.loads(example.read_text()))))
        files.append(path)
    result = kiln(
        "run",
        "--offline",
        "--models-dir",
        str(workspace["models"]),
        "--input-dir",
        str(workspace["input"]),
        "--output-dir",
        str(workspace["output"]),
        *map(str, files),
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = {Path(line["source"]).stem: line for line in map(json.loads, result.stdout.splitlines())}
    assert set(lines) == {p.stem for p in MODEL_EXAMPLES}
    digests = {}
    for name, line in lines.items():
        assert line["status"] == "success", (name, line)
        [saved] = line["outputs"]
        data = Path(saved["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == saved["sha256"]
        digests[name] = saved["sha256"]
        with Image.open(saved["path"]) as image:
            expected = {"hires_latent": 96, "hires_esrgan": 96}.get(name, RUN_SIZE)
            assert image.size == (expected, expected), name
    # The LoRA changes the image the same seed and prompt give without it.
    assert digests["lora"] != digests["txt2img"]

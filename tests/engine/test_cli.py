"""``kiln run`` and ``kiln validate`` as a user runs them: a real subprocess, JSON lines on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.engine.prompts import invert_prompt

REPO = Path(__file__).resolve().parents[2]


def kiln(args: list[str], cwd: Path, stdin: str | None = None, env: dict[str, str] | None = None):
    full_env = {**os.environ, **(env or {})}
    full_env.pop("KILN_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "kiln", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )


def lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_run_example_writes_inverted_pixels_with_prompt_chunk(tmp_path):
    example = REPO / "examples" / "invert.json"
    proc = kiln(["run", str(example), "--output-dir", str(tmp_path / "out")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    [result] = lines(proc.stdout)
    assert result["status"] == "success"
    assert [o["filename"] for o in result["outputs"]] == ["invert_00001_.png", "invert_00002_.png"]
    path = Path(result["outputs"][0]["path"])
    assert path.is_absolute() and path.parent == (tmp_path / "out" / "examples").resolve()
    prompt = json.loads(example.read_text())
    color = prompt["1"]["inputs"]["color"]
    channels = np.array([(color >> s & 0xFF) / 255 for s in (16, 8, 0)], dtype=np.float32)
    expected = (np.float32(255.0) * (np.float32(1.0) - channels)).astype(np.uint8)
    with Image.open(path) as image:
        assert image.size == (64, 48)
        assert (np.array(image) == expected).all()
        assert json.loads(image.text["prompt"]) == prompt
    assert set(result["timings"]) == {"validate_s", "execute_s", "nodes_s"}
    assert "Running" in proc.stderr  # logs go to stderr, never stdout


def test_run_reads_concatenated_prompts_from_stdin(tmp_path):
    text = (
        json.dumps(invert_prompt(prefix="one")) + "\n" + json.dumps({"prompt": invert_prompt(prefix="two")})
    )
    proc = kiln(["run", "-", "--output-dir", str(tmp_path / "out")], cwd=tmp_path, stdin=text)
    assert proc.returncode == 0, proc.stderr
    results = lines(proc.stdout)
    assert [r["outputs"][0]["filename"] for r in results] == ["one_00001_.png", "two_00001_.png"]
    assert results[0]["prompt_id"] != results[1]["prompt_id"]


def test_run_failure_exits_nonzero_with_json_error(tmp_path):
    bad = invert_prompt()
    bad["1"]["inputs"]["width"] = 0
    good = invert_prompt(prefix="good")
    text = json.dumps(bad) + json.dumps(good)
    proc = kiln(["run", "-", "--output-dir", str(tmp_path / "out")], cwd=tmp_path, stdin=text)
    assert proc.returncode == 1
    first, second = lines(proc.stdout)
    assert first["status"] == "error"
    assert first["error"]["type"] == "prompt_outputs_failed_validation"
    assert first["node_errors"]["1"]["errors"][0]["type"] == "value_smaller_than_min"
    assert second["status"] == "success"


def test_invalid_json_exits_2(tmp_path):
    proc = kiln(["run", "-"], cwd=tmp_path, stdin='{"1": ')
    assert proc.returncode == 2
    [line] = lines(proc.stdout)
    assert line["error"]["type"] == "invalid_prompt"


def test_missing_file_exits_2(tmp_path):
    proc = kiln(["run", str(tmp_path / "nope.json")], cwd=tmp_path)
    assert proc.returncode == 2
    assert lines(proc.stdout)[0]["error"]["type"] == "config_error"


def test_validate_only(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(invert_prompt()))
    proc = kiln(["validate", str(good)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert lines(proc.stdout)[0]["status"] == "valid"
    assert not (tmp_path / "output").exists()  # nothing ran

    bad = tmp_path / "bad.json"
    prompt = invert_prompt()
    prompt["2"]["inputs"]["image"] = ["2", 0]
    bad.write_text(json.dumps(prompt))
    proc = kiln(["validate", str(bad)], cwd=tmp_path)
    assert proc.returncode == 1
    assert lines(proc.stdout)[0]["node_errors"]["2"]["errors"][0]["type"] == "dependency_cycle"


def test_settings_from_environment_and_config_file(tmp_path):
    config = tmp_path / "kiln.yaml"
    config.write_text(f"output_dir: {tmp_path / 'from-file'}\nmax_nodes: 2\n")
    example = str(REPO / "examples" / "invert.json")
    proc = kiln(["validate", example, "--config", str(config)], cwd=tmp_path)
    assert proc.returncode == 1
    assert lines(proc.stdout)[0]["error"]["type"] == "prompt_too_large"
    proc = kiln(["run", example, "--config", str(config)], cwd=tmp_path, env={"KILN_MAX_NODES": "10"})
    assert proc.returncode == 0, proc.stdout
    assert (tmp_path / "from-file" / "examples" / "invert_00001_.png").exists()

"""The SD1.5 engine path on the full-size test checkpoint: load, text encode, UNet forward, VAE decode,
and diffusers' UNet forward on the same weights in the same run.

Writes (or reuses) ``kiln make-test-checkpoint --arch sd15 --size full`` output: the real SD1.5
single-file layout with deterministic random weights (fp16 by default, like the common fp16
release). Then, on the CPU in fp32 unless told otherwise:

- load: ``ModelManager.load_checkpoint`` (content hash, header inspection, UNet + CLIP + VAE from the
  file to their dtype and device), also split by part from the manager's load stats;
- text encode: one 77-token prompt through CLIPTextEncode's path (``TextEncoder.encode``);
- UNet forward: batch 2 (cond + uncond, as with CFG) at 256x256 (latent 32x32), context 2x77x768;
- VAE decode: one 32x32 latent to a 256x256 image;
- diffusers UNet forward: ``UNet2DConditionModel`` built with diffusers' own single-file converter
  from the same file's tensors, same inputs, interleaved with Kiln's runs;
- txt2img end to end: examples/txt2img.json (the checkpoint linked under the name it uses) at
  ``--size`` with 4 euler steps through ``EngineRuntime``: the first prompt (loads included), then
  warm prompts with a new seed each (loader and text encoding cached, as in a real service), and
  the per-step overhead: the KSampler node's time minus the time spent inside UNet forwards,
  divided by the steps, as a share of a step (target under 2%).

    .venv/bin/python bench/engine.py [--checkpoint PATH] [--file-dtype fp16] [--reps 5] [--threads N]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

HERE = Path(__file__).resolve().parent
# This file is bench/engine.py, and `python bench/<script>.py` puts bench/ first on sys.path, where
# `import engine` would find this file instead of the package. Take the folder off the path and, when
# this file was imported as `engine` (by a sibling script), put the real package in its place.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]
if __name__ == "engine":
    del sys.modules["engine"]
    sys.modules["engine"] = importlib.import_module("engine")

if TYPE_CHECKING:
    import torch

PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed, 35mm"


def _unet_forward_module() -> Any:
    spec = importlib.util.spec_from_file_location("bench_unet_forward", HERE / "unet_forward.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _time(fn: Any, reps: int = 1) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of ``reps`` calls (CPU time is steadier on a shared machine:
    it does not count time spent waiting for a core)."""
    wall, cpu = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


Row = tuple[str, float, float | None, str]


def _median_row(name: str, timings: tuple[list[float], list[float]], note: str = "median") -> Row:
    return (name, statistics.median(timings[0]), statistics.median(timings[1]), note)


def main() -> None:
    import torch

    from engine.models.manager import ModelManager
    from engine.models.test_checkpoint import write_test_checkpoint

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/kiln-bench/sd15-full.safetensors"))
    parser.add_argument("--file-dtype", choices=["fp32", "fp16", "bf16"], default="fp16")
    parser.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path: Path = args.checkpoint
    if args.file_dtype != "fp16" and path.name == "sd15-full.safetensors":
        path = path.with_name(f"sd15-full-{args.file_dtype}.safetensors")

    rows: list[Row] = []
    if not path.exists():
        timing = _time(lambda: write_test_checkpoint(path, "sd15", "full", seed=0, dtype=args.file_dtype))
        rows.append(
            _median_row("write test checkpoint (once)", timing, f"{path.stat().st_size / 1e9:.2f} GB")
        )

    manager = ModelManager(args.device, args.precision)
    size_gb = path.stat().st_size / 1e9
    hashing = _time(lambda: manager.hasher.content_hash(path))
    inspecting = _time(lambda: manager.inspect_checkpoint(path))
    loaded: list[Any] = []
    loading = _time(lambda: loaded.extend(manager.load_checkpoint(path)))
    model, clip, vae = loaded
    assert clip is not None and vae is not None
    rows.append(_median_row("load: sha256 of the file (once per file)", hashing, f"{size_gb:.2f} GB file"))
    rows.append(_median_row("load: inspect header, infer configs", inspecting, ""))
    rows.append(_median_row("load: UNet + CLIP + VAE weights", loading, "file in page cache"))
    for stat in manager.load_stats():
        gb = stat["bytes"] / 1e9
        rows.append((f"  of which {stat['part']} -> {stat['dtype']}", stat["seconds"], None, f"{gb:.2f} GB"))
    total = (
        hashing[0][0] + inspecting[0][0] + loading[0][0],
        hashing[1][0] + inspecting[1][0] + loading[1][0],
    )
    rows.append(("load total", total[0], total[1], ""))
    same_dtype = ModelManager(args.device, args.file_dtype, hasher=manager.hasher)
    timing = _time(lambda: same_dtype.load_diffusion_model(path))
    rows.append(
        _median_row(f"  UNet at the file's dtype ({args.file_dtype}, as on a GPU)", timing, "no conversion")
    )
    same_dtype.free_all()

    with torch.inference_mode():
        with manager.use(clip) as encoder:
            encoder.encode(PROMPT)  # warm-up
            rows.append(
                _median_row("text encode (1 chunk)", _time(lambda: encoder.encode(PROMPT), args.reps))
            )
            cond, _ = encoder.encode(PROMPT)
            uncond, _ = encoder.encode("")

        latent_side = args.size // 8
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, latent_side, latent_side, generator=gen).to(args.device)
        t = torch.full((2,), 500.0, device=args.device)
        context = torch.cat([cond, uncond]).to(args.device)
        with manager.use(model) as net:
            reference = _diffusers_unet(path, net.config, net.dtype, args.device)

            def run_kiln() -> Any:
                return net(x, t, context)

            def run_diffusers() -> Any:
                return reference(x.to(net.dtype), t, encoder_hidden_states=context.to(net.dtype)).sample

            ours, theirs = run_kiln(), run_diffusers()  # also the warm-up
            rel = ((ours.double() - theirs.double()).norm() / theirs.double().norm()).item()
            kiln: tuple[list[float], list[float]] = ([], [])
            diffusers: tuple[list[float], list[float]] = ([], [])
            for _ in range(args.reps):  # interleaved, so machine noise hits both alike
                for fn, acc in ((run_kiln, kiln), (run_diffusers, diffusers)):
                    wall, cpu = _time(fn)
                    acc[0].extend(wall)
                    acc[1].extend(cpu)
        shape = f"2x4x{latent_side}x{latent_side}"
        kiln_row = _median_row(f"UNet forward, Kiln ({shape})", kiln)
        diffusers_row = _median_row(f"UNet forward, diffusers ({shape})", diffusers)
        rows += [kiln_row, diffusers_row]
        assert kiln_row[2] is not None and diffusers_row[2] is not None
        rows.append(
            (
                "  Kiln / diffusers",
                kiln_row[1] / diffusers_row[1],
                kiln_row[2] / diffusers_row[2],
                f"ratio; outputs differ by {rel:.1e} (relative)",
            )
        )

        with manager.use(vae) as v:
            z = torch.randn(1, 4, latent_side, latent_side, generator=gen)
            v.decode(z)  # warm-up
            name = f"VAE decode (1x4x{latent_side}x{latent_side} -> {args.size}px)"
            rows.append(_median_row(name, _time(lambda: v.decode(z), args.reps)))

    manager.free_all()
    rows += _txt2img_rows(path, args)

    print(
        f"SD1.5 full test checkpoint ({args.file_dtype} file), {args.device}, precision {args.precision}, "
        f"threads={torch.get_num_threads()}, {args.size}x{args.size}, {args.reps} reps"
    )
    width = max(len(row[0]) for row in rows)
    print(f"{'step':<{width}}  {'wall s':>8}  {'cpu s':>8}  note")
    for name, wall, cpu, note in rows:
        cpu_text = "" if cpu is None else f"{cpu:.3f}"
        print(f"{name:<{width}}  {wall:>8.3f}  {cpu_text:>8}  {note}")


TXT2IMG_STEPS = 4


def _txt2img_rows(path: Path, args: argparse.Namespace) -> list[Row]:
    """examples/txt2img.json at ``args.size``, 4 euler steps, cold and warm, and per-step overhead."""
    import json
    import tempfile

    from engine.runtime import EngineRuntime
    from engine.settings import EngineSettings

    prompt = json.loads((HERE.parent / "examples" / "txt2img.json").read_text())
    sampler_id = next(k for k, v in prompt.items() if v["class_type"] == "KSampler")
    latent_id = next(k for k, v in prompt.items() if v["class_type"] == "EmptyLatentImage")
    loader = next(v for v in prompt.values() if v["class_type"] == "CheckpointLoaderSimple")
    prompt[latent_id]["inputs"].update(width=args.size, height=args.size)
    prompt[sampler_id]["inputs"].update(steps=TXT2IMG_STEPS, sampler_name="euler")

    root = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    (root / "models" / "checkpoints").mkdir(parents=True)
    (root / "models" / "checkpoints" / loader["inputs"]["ckpt_name"]).symlink_to(path.resolve())
    settings = EngineSettings(
        models_dirs=[root / "models"],
        input_dir=root,
        output_dir=root / "output",
        temp_dir=root / "temp",
        device=args.device,
        precision=args.precision,
        offline=True,
    )
    runtime = EngineRuntime(settings)

    def run(seed: int) -> Any:
        prompt[sampler_id]["inputs"]["seed"] = seed
        return runtime.execute(prompt)

    rows: list[Row] = []
    cold = _time(lambda: run(0))
    rows.append(
        _median_row(
            f"txt2img {args.size}px, {TXT2IMG_STEPS} euler steps: first prompt", cold, "loads included"
        )
    )

    # Time every UNet forward of the resident model, then run warm prompts (new seeds).
    model_handle = runtime.models.load_checkpoint(path)[0]
    forward_seconds: list[float] = []
    started: list[float] = []
    with runtime.models.use(model_handle) as net:
        pre = net.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
        post = net.register_forward_hook(
            lambda *_: forward_seconds.append(time.perf_counter() - started.pop())
        )
    overheads: list[float] = []
    step_seconds: list[float] = []
    warm: tuple[list[float], list[float]] = ([], [])
    try:
        for rep in range(args.reps):
            forward_seconds.clear()
            w0, c0 = time.perf_counter(), time.process_time()
            result = run(rep + 1)
            warm[0].append(time.perf_counter() - w0)
            warm[1].append(time.process_time() - c0)
            assert len(forward_seconds) == TXT2IMG_STEPS, forward_seconds  # cond + uncond in one batch
            sampler_seconds = result.node_seconds[sampler_id]
            outside = sampler_seconds - sum(forward_seconds)
            overheads.append(outside / TXT2IMG_STEPS)
            step_seconds.append(sampler_seconds / TXT2IMG_STEPS)
    finally:
        pre.remove()
        post.remove()
    rows.append(_median_row("txt2img: warm prompt (new seed)", warm, "sample + VAE decode + PNG"))
    per_step = statistics.median(step_seconds)
    overhead = statistics.median(overheads)
    rows.append(("  of which one sampler step", per_step, None, "KSampler time / steps"))
    rows.append(
        (
            "  per-step overhead outside the UNet",
            overhead,
            None,
            f"{100 * overhead / per_step:.2f}% of a step (target < 2%)",
        )
    )
    runtime.models.free_all()
    return rows


def _diffusers_unet(path: Path, config: Any, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from engine.models.safetensors_file import load_tensors
    from engine.models.unet import UNET_PREFIX

    sd = load_tensors(path, dtype=dtype, prefix=UNET_PREFIX)
    sd = {key[len(UNET_PREFIX) :]: value for key, value in sd.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = _unet_forward_module()._diffusers_unet(sd, config)
    return module.to(device=device, dtype=dtype)


if __name__ == "__main__":
    main()

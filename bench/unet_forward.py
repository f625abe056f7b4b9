"""UNet forward time: Kiln's SD 1.5 UNet against diffusers' UNet2DConditionModel on the same weights.

Builds the full SD 1.5 config with random weights (float32, CPU by default), converts the same
weights with diffusers' own single-file converter, and times one forward each at 256x256
(latent 32x32), batch 2, context [2, 77, 768]. Prints a table: kiln ms, diffusers ms, ratio.

    .venv/bin/python bench/unet_forward.py [--size 32] [--batch 2] [--reps 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from engine.models.unet import UNET_PREFIX, UNetConfig, load_unet, random_state_dict


def _ldm_yaml(config: UNetConfig) -> dict:
    params = {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "model_channels": config.model_channels,
        "attention_resolutions": list(config.attention_resolutions),
        "num_res_blocks": config.num_res_blocks[0],
        "channel_mult": list(config.channel_mult),
        "num_heads": config.num_heads,
        "use_linear_in_transformer": config.use_linear_in_transformer,
        "transformer_depth": 1,
        "context_dim": config.context_dim,
    }
    return {
        "model": {
            "params": {
                "unet_config": {"params": params},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }


def _diffusers_unet(sd: dict[str, torch.Tensor], config: UNetConfig) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import UNet2DConditionModel
        from diffusers.loaders.single_file_utils import (
            convert_ldm_unet_checkpoint,
            create_unet_diffusers_config_from_ldm,
        )

        ckpt = {UNET_PREFIX + k: v for k, v in sd.items()}
        dconfig = create_unet_diffusers_config_from_ldm(_ldm_yaml(config), ckpt)
        with torch.device("meta"):
            model = UNet2DConditionModel(**dconfig)
        model.load_state_dict(convert_ldm_unet_checkpoint(ckpt, dconfig), assign=True)
    return model.eval().requires_grad_(False)


def _time(fn, reps: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU milliseconds of ``reps`` calls (CPU time is steadier on a shared
    machine: it does not count time spent waiting for a core)."""
    wall, cpu = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - w0) * 1000.0)
        cpu.append((time.process_time() - c0) * 1000.0)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=32, help="latent side (image side / 8)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    config = UNetConfig.sd15()
    sd = random_state_dict(config, seed=0, dtype=dtype)
    kiln = load_unet(sd, config, device=args.device)
    reference = _diffusers_unet(sd, config).to(args.device)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, args.size, args.size, generator=gen).to(args.device, dtype)
    t = torch.full((args.batch,), 500.0, device=args.device)
    context = torch.randn(args.batch, 77, config.context_dim, generator=gen).to(args.device, dtype)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def run_kiln() -> torch.Tensor:
        out = kiln(x, t, context)
        sync()
        return out

    def run_diffusers() -> torch.Tensor:
        out = reference(x, t, encoder_hidden_states=context).sample
        sync()
        return out

    with torch.inference_mode():
        ours, theirs = run_kiln(), run_diffusers()
        rel = ((ours.double() - theirs.double()).norm() / theirs.double().norm()).item()
        # Interleave the two so that machine noise hits both alike.
        for fn in (run_kiln, run_diffusers):
            _time(fn, args.warmup)
        results: dict[str, tuple[list[float], list[float]]] = {"kiln": ([], []), "diffusers": ([], [])}
        for _ in range(args.reps):
            for name, fn in (("kiln", run_kiln), ("diffusers", run_diffusers)):
                wall, cpu = _time(fn, 1)
                results[name][0].extend(wall)
                results[name][1].extend(cpu)

    print(
        f"SD1.5 UNet forward, {args.device} {args.dtype}, threads={torch.get_num_threads()}, "
        f"latent {args.batch}x4x{args.size}x{args.size}, context {args.batch}x77x{config.context_dim}, "
        f"{args.reps} interleaved reps after {args.warmup} warm-up"
    )
    header = ["model", "wall median", "wall min", "cpu median", "cpu min"]
    print("".join(f"{h:>14}" for h in header) + "   (ms)")
    rows = {}
    for name, (wall, cpu) in results.items():
        rows[name] = [statistics.median(wall), min(wall), statistics.median(cpu), min(cpu)]
        print(f"{name:>14}" + "".join(f"{v:>14.1f}" for v in rows[name]))
    ratio = [a / b for a, b in zip(rows["kiln"], rows["diffusers"], strict=True)]
    print(f"{'kiln/diff':>14}" + "".join(f"{v:>14.3f}" for v in ratio))
    print(f"relative difference of outputs: {rel:.2e}")


if __name__ == "__main__":
    main()

"""Model commands of ``kiln``: ``make-test-checkpoint``."""

from __future__ import annotations

import argparse
import sys
import time

# ``--arch esrgan --size full``: RealESRGAN_x4plus's shapes (64 features, 23 blocks, growth 32).
ESRGAN_SIZES = {"tiny": {"nf": 8, "nb": 2}, "full": {"nf": 64, "nb": 23, "gc": 32}}


def command_make_test_checkpoint(args: argparse.Namespace) -> int:
    from engine.cli import print_json
    from engine.models.test_checkpoint import write_test_checkpoint, write_test_esrgan, write_test_lora

    started = time.perf_counter()
    if args.arch == "lora":
        if args.base is None:
            print("kiln make-test-checkpoint: --arch lora needs --base CHECKPOINT", file=sys.stderr)
            return 2
        path = write_test_lora(args.out, args.base, seed=args.seed)
    elif args.arch == "esrgan":
        path = write_test_esrgan(
            args.out,
            scale=args.scale,
            layout=args.layout,
            seed=args.seed,
            dtype=args.dtype,
            **ESRGAN_SIZES[args.size],
        )
    else:
        path = write_test_checkpoint(
            args.out,
            args.arch,
            args.size,
            seed=args.seed,
            dtype=args.dtype,
            prediction=args.prediction,
            float_position_ids=args.float_position_ids,
        )
    print_json(
        {
            "status": "success",
            "path": str(path.resolve()),
            "arch": args.arch,
            "size": args.size,
            "seed": args.seed,
            "dtype": args.dtype,
            **({"scale": args.scale, "layout": args.layout} if args.arch == "esrgan" else {}),
            "bytes": path.stat().st_size,
            "seconds": round(time.perf_counter() - started, 3),
        }
    )
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add the model commands to the ``kiln`` command."""
    make = commands.add_parser(
        "make-test-checkpoint",
        help="write a deterministic random-weight SD checkpoint (or ESRGAN upscale model) in the real layout",
        description="Write a random-weight checkpoint with the real single-file layout (UNet, VAE, "
        "text encoder, DDPM buffers): 'full' has exactly the real tensor names and shapes, 'tiny' "
        "the same layout scaled down for tests. With --arch esrgan: an ESRGAN / Real-ESRGAN upscale "
        "model ('full': RealESRGAN_x4plus's shapes). The same arguments give the same bytes.",
    )
    make.add_argument("out", metavar="OUT.safetensors", help="file to write")
    make.add_argument(
        "--arch",
        choices=["sd15", "sd21", "esrgan", "lora"],
        default="sd15",
        help="model family (default sd15); esrgan writes an ESRGAN / Real-ESRGAN upscale model, lora a "
        "kohya LoRA for the SD1.x checkpoint given with --base",
    )
    make.add_argument("--base", help="lora only: the checkpoint the LoRA is for")
    make.add_argument("--size", choices=["tiny", "full"], default="tiny", help="tiny or full (default tiny)")
    make.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    make.add_argument(
        "--dtype", choices=["fp32", "fp16", "bf16"], default="fp16", help="weights dtype (default fp16)"
    )
    make.add_argument(
        "--prediction",
        choices=["eps", "v"],
        default=None,
        help="eps or v-prediction (default: eps for sd15, v for sd21, like SD2.1 768-v)",
    )
    make.add_argument(
        "--float-position-ids", action="store_true", help="store the text encoder's position_ids as float32"
    )
    make.add_argument(
        "--scale", type=int, choices=[1, 2, 4, 8], default=4, help="esrgan only: upscale factor (default 4)"
    )
    make.add_argument(
        "--layout",
        choices=["new", "old", "bsrgan"],
        default="new",
        help="esrgan only: key layout, basicsr/Real-ESRGAN (new), ESRGAN model.N (old) or BSRGAN",
    )
    make.set_defaults(handler=command_make_test_checkpoint)

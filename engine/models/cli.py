"""Model commands of ``kiln``: ``make-test-checkpoint``."""

from __future__ import annotations

import argparse
import sys
import time


def command_make_test_checkpoint(args: argparse.Namespace) -> int:
    from engine.cli import print_json
    from engine.models.test_checkpoint import write_test_checkpoint

    started = time.perf_counter()
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
        help="write a deterministic random-weight SD checkpoint in the real single-file layout",
        description="Write a random-weight checkpoint with the real single-file layout (UNet, VAE, "
        "text encoder, DDPM buffers): 'full' has exactly the real tensor names and shapes, 'tiny' "
        "the same layout scaled down for tests. The same arguments give the same bytes.",
    )
    make.add_argument("out", metavar="OUT.safetensors", help="file to write")
    make.add_argument("--arch", choices=["sd15", "sd21"], default="sd15", help="model family (default sd15)")
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
    make.set_defaults(handler=command_make_test_checkpoint)

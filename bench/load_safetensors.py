"""Loading a ~2 GB fp16 checkpoint with engine.models.safetensors_file (target: well under 5 s from the
page cache on a 2-core machine).

Writes a file shaped like an SD 1.5 fp16 checkpoint (UNet convolutions and attention projections,
the CLIP token embedding, small norms and biases, an int64 position-ids buffer) into a temporary
folder, then loads it to CPU fp16 and to CPU fp32, each twice: first after asking the kernel to drop
the file from the page cache (``posix_fadvise DONTNEED``; a cold read where the kernel honours it),
then again from the page cache. Tensors that keep the file's dtype on the CPU are copy-on-write views
of the file mapping (the safetensors library maps the file), so their bytes are read when first used:
the "touch" column reads one byte of every page afterwards, and "total" is the honest figure. The bare
``safetensors.torch.load_file`` (with and without a cast to fp32) and the header-only ``tensor_shapes``
are timed for comparison.

    .venv/bin/python bench/load_safetensors.py [--gb 2.0] [--dir /path/with/space]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.models.safetensors_file import load_tensors, tensor_shapes

# (shape, count per block): one UNet-ish level; repeated until the target size is reached.
BLOCK: list[tuple[tuple[int, ...], int]] = [
    ((1280, 1280, 3, 3), 2),  # resnet convolutions
    ((640, 640, 3, 3), 2),
    ((320, 320, 3, 3), 2),
    ((1280, 1280), 4),  # attention q/k/v/out
    ((640, 640), 4),
    ((10240, 1280), 1),  # GEGLU feed-forward in
    ((1280, 5120), 1),  # feed-forward out
    ((1280, 768), 2),  # cross-attention k/v from the text encoder
    ((1280,), 12),  # norms and biases
    ((640,), 12),
    ((320,), 12),
]


def build_state_dict(target_bytes: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.empty(
            49408, 768, dtype=torch.float16
        ).uniform_(-0.1, 0.1, generator=gen),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77).unsqueeze(0),
    }
    total = sum(t.numel() * t.element_size() for t in sd.values())
    block = 0
    while total < target_bytes:
        for shape, count in BLOCK:
            for i in range(count):
                t = torch.empty(shape, dtype=torch.float16).uniform_(-0.1, 0.1, generator=gen)
                sd[f"model.diffusion_model.block{block}.{'x'.join(map(str, shape))}.{i}"] = t
                total += t.numel() * 2
        block += 1
    return sd


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def touch_every_page(tensors: object) -> None:
    """Read one byte of every 4 KiB page of every tensor (what a first forward pass would fault in)."""
    if isinstance(tensors, dict):
        for t in tensors.values():
            if isinstance(t, torch.Tensor):
                t.reshape(-1).view(torch.uint8)[::4096].sum()


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    gc.collect()
    started = time.perf_counter()
    result = fn()
    loaded = time.perf_counter()
    touch_every_page(result)
    return loaded - started, time.perf_counter() - loaded, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="checkpoint size in GB (default 2)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the temporary file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "bench-fp16.safetensors"
        started = time.perf_counter()
        sd = build_state_dict(int(args.gb * 1e9))
        count = len(sd)
        save_file(sd, str(path))
        del sd
        gc.collect()
        size = path.stat().st_size
        write_s = time.perf_counter() - started

        print(
            f"# safetensors load ({platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads)"
        )
        print(f"# file: {size / 1e9:.2f} GB, {count} tensors, written in {write_s:.1f} s")
        load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"# 1-minute load average before the runs: {load_avg:.2f}")
        print(f"{'load':<34} {'page cache':<10} {'load s':>7} {'touch s':>8} {'total s':>8} {'GB/s':>6}")

        rows: list[tuple[str, str, float]] = []

        def run(label: str, cache: str, fn: Callable[[], object]) -> None:
            seconds, touch, result = timed(fn)
            total = seconds + touch
            rows.append((label, cache, total))
            rate = size / 1e9 / total
            timings = f"{seconds:>7.3f} {touch:>8.3f} {total:>8.3f} {rate:>6.2f}"
            print(f"{label:<34} {cache:<10} {timings}", flush=True)
            del result

        run("tensor_shapes (header only)", "warm", lambda: tensor_shapes(path))
        for dtype, name in ((torch.float16, "fp16"), (torch.float32, "fp32")):
            drop_from_page_cache(path)
            run(f"load_tensors -> cpu {name}", "cold", lambda d=dtype: load_tensors(path, "cpu", d))
            run(f"load_tensors -> cpu {name}", "warm", lambda d=dtype: load_tensors(path, "cpu", d))
        run("safetensors load_file (baseline)", "warm", lambda: load_file(str(path), device="cpu"))
        run(
            "load_file + .to(fp32) (baseline)",
            "warm",
            lambda: {k: v.to(torch.float32) for k, v in load_file(str(path), device="cpu").items()},
        )

        warm = [s for label, cache, s in rows if cache == "warm" and label.startswith("load_tensors")]
        verdict = "PASS" if max(warm) < 5.0 else "FAIL"
        print(f"# target: page-cache loads (total) under 5 s -> {verdict} (slowest {max(warm):.2f} s)")


if __name__ == "__main__":
    main()

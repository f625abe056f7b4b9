"""The only way Kiln opens model files: safetensors, checked before the ``safetensors`` library sees them.

Pickled checkpoints (``.ckpt``, ``.pt``, ``.pth``, ``.bin``, ``.pkl``, and any file whose bytes are a
pickle or a torch zip archive, whatever its name) can run code when they are loaded, so they are
refused with a ``ModelError`` that says how to convert them. A safetensors file is 8 bytes of
little-endian header length, a JSON header (``{name: {"dtype", "shape", "data_offsets"}}`` plus an
optional ``"__metadata__"`` of strings), then the tensor bytes; the header is validated against the
file size before anything else happens, so a truncated download or a corrupt file gives a clear
error instead of a crash deep inside a loader.

Reading the header never imports torch (``tensor_shapes`` serves architecture detection);
``load_tensors`` imports torch and ``safetensors`` when it runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from engine.errors import ModelError

if TYPE_CHECKING:
    import torch

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# Formats that are (or wrap) Python pickles: loading them may execute arbitrary code.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle", ".pt2")
# The safetensors library refuses headers above 100 MB; so does Kiln, before reading one.
MAX_HEADER_BYTES = 100_000_000

# Bits per element of the dtypes safetensors writes; sub-byte and unknown dtypes skip the size check.
DTYPE_BITS: Mapping[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}

_CONVERT_HINT = (
    "convert it on a trusted machine with `safetensors.torch.save_file(torch.load(path, weights_only=True)"
    "['state_dict'], 'model.safetensors')` (drop ['state_dict'] if the file holds a bare state dict), "
    "or download the model's .safetensors release"
)
_ZIP_MAGIC = b"PK\x03\x04"


class TensorInfo(NamedTuple):
    """A tensor as the header declares it: ``shape, dtype = info`` (dtype as safetensors spells it)."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header."""

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    # Byte range of each tensor inside the data section (after the 8-byte length and the header).
    offsets: dict[str, tuple[int, int]]
    header_size: int
    file_size: int

    @property
    def data_start(self) -> int:
        return 8 + self.header_size


def pickled_reason(path: Path, head: bytes = b"") -> str | None:
    """Why ``path`` (whose first bytes are ``head``) is a pickled checkpoint, or None if it is not one."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return f"has the pickle-based {suffix} format"
    if head.startswith(_ZIP_MAGIC):
        return "is a torch zip archive (torch.save output) whatever its name says"
    # Pickle protocols 2-5 open with PROTO (0x80) and the protocol number. A safetensors header length
    # may also start with 0x80, but then byte 8 opens the JSON header with '{'.
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[8:9] != b"{":
        return f"is a pickle (protocol {head[1]}) whatever its name says"
    return None


def _refuse_pickle(path: Path, reason: str) -> ModelError:
    return ModelError(
        f"{path} is a pickled checkpoint ({reason}); Kiln loads only .safetensors — {_CONVERT_HINT}"
    )


def check_model_path(path: Path) -> None:
    """Refuse, by name alone, a file Kiln would never load: pickled formats and non-safetensors files."""
    reason = pickled_reason(path)
    if reason is not None:
        raise _refuse_pickle(path, reason)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise ModelError(f"{path} is not a .safetensors file; Kiln loads only .safetensors model files")


def _corrupt(path: Path, reason: str) -> ModelError:
    return ModelError(f"{path} is not a valid safetensors file: {reason}")


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Check that ``path`` is a well-formed safetensors file and return its header (no tensor data read).

    Raises ModelError for a pickled checkpoint (by name or by content), a missing file, or a header that
    is malformed or does not fit the file (a truncated download, a corrupt file).
    """
    path = Path(path)
    check_model_path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(9)
            reason = pickled_reason(path, head)
            if reason is not None:
                raise _refuse_pickle(path, reason)
            if len(head) < 9:
                raise _corrupt(path, f"the file holds only {size} bytes")
            header_size = int.from_bytes(head[:8], "little")
            if header_size > size - 8:
                raise _corrupt(path, f"the header claims {header_size} bytes but the file holds {size}")
            if header_size > MAX_HEADER_BYTES:
                raise _corrupt(path, f"the header claims {header_size} bytes (more than {MAX_HEADER_BYTES})")
            f.seek(8)
            raw = f.read(header_size)
    except FileNotFoundError:
        raise ModelError(f"Model file {path} does not exist") from None
    except IsADirectoryError:
        raise ModelError(f"Model file {path} is a directory") from None
    except OSError as exc:
        raise ModelError(f"Cannot read model file {path}: {exc}") from exc
    return _parse_header(path, raw, header_size, size)


def _parse_header(path: Path, raw: bytes, header_size: int, file_size: int) -> SafetensorsHeader:
    if not raw.startswith(b"{"):
        raise _corrupt(path, "the header is not a JSON object")
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _corrupt(path, f"the header is not valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise _corrupt(path, "the header is not a JSON object")
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    data_size = file_size - 8 - header_size
    tensors: dict[str, TensorInfo] = {}
    offsets: dict[str, tuple[int, int]] = {}
    data_end = 0
    for name, entry in parsed.items():
        info, span = _parse_entry(path, name, entry, data_size)
        tensors[name] = info
        offsets[name] = span
        data_end = max(data_end, span[1])
    if data_end != data_size:
        raise _corrupt(
            path,
            f"the header describes {data_end} bytes of tensor data but the file holds {data_size} "
            "(truncated or padded file)",
        )
    return SafetensorsHeader(
        path=path,
        metadata=dict(metadata),
        tensors=tensors,
        offsets=offsets,
        header_size=header_size,
        file_size=file_size,
    )


def _parse_entry(path: Path, name: str, entry: object, data_size: int) -> tuple[TensorInfo, tuple[int, int]]:
    if not isinstance(entry, dict):
        raise _corrupt(path, f"tensor {name!r} is not described by an object")
    dtype, shape, span = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or not dtype:
        raise _corrupt(path, f"tensor {name!r} has no dtype")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _corrupt(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if not isinstance(span, list) or len(span) != 2 or not all(isinstance(o, int) for o in span):
        raise _corrupt(path, f"tensor {name!r} has invalid data offsets {span!r}")
    if not 0 <= span[0] <= span[1]:
        raise _corrupt(path, f"tensor {name!r} has invalid data offsets {span!r}")
    if span[1] > data_size:
        raise _corrupt(
            path,
            f"tensor {name!r} ends at byte {span[1]} of the tensor data but the file holds {data_size} "
            "(truncated download?)",
        )
    bits = DTYPE_BITS.get(dtype)
    if bits is not None and bits % 8 == 0:
        expected = math.prod(shape) * bits // 8
        if span[1] - span[0] != expected:
            raise _corrupt(
                path, f"tensor {name!r} ({dtype} {shape}) needs {expected} bytes, not {span[1] - span[0]}"
            )
    return TensorInfo(tuple(shape), dtype), (span[0], span[1])


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file (empty when it has none)."""
    return read_header(path).metadata


def tensor_shapes(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """``{name: (shape, dtype)}`` from the header alone: no tensor data is read, torch is not imported."""
    return read_header(path).tensors


def _select(header: SafetensorsHeader, prefix: str | None, keys: Iterable[str] | None) -> list[str]:
    names = list(header.tensors)
    if keys is not None:
        wanted = list(dict.fromkeys(keys))
        missing = [k for k in wanted if k not in header.tensors]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ModelError(f"{header.path} has no tensor named {shown}")
        names = wanted
    if prefix is not None:
        names = [n for n in names if n.startswith(prefix)]
    # File order: sequential reads are what the page cache and the disk read-ahead serve best.
    return sorted(names, key=lambda n: header.offsets[n][0])


def load_tensors(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    prefix: str | None = None,
    keys: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, validated first, each read once and converted once.

    ``prefix`` keeps only the tensors whose names start with it (names are returned unchanged);
    ``keys`` asks for exactly these names (ModelError if one is missing). ``dtype`` applies to floating
    tensors only: integer and boolean buffers (position ids, counters) keep their dtype.

    A tensor that keeps the file's dtype on the CPU is not copied at all: it is a copy-on-write view of
    the file mapping the ``safetensors`` library makes, read from the page cache when first touched
    (writes stay private). Do not truncate or rewrite a model file in place while its tensors are alive
    (replace it with a rename instead); the model hub's files and the Hugging Face cache never are.
    """
    header = read_header(path)
    names = _select(header, prefix, keys)

    import torch
    from safetensors import SafetensorError, safe_open

    target = torch.device(device)
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(header.path), framework="pt", device="cpu") as f:
            for name in names:
                out[name] = _convert(f.get_tensor(name), target, dtype)
    except SafetensorError as exc:
        raise _corrupt(header.path, str(exc)) from exc
    return out


def _convert(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` on ``device`` in ``dtype`` (floating tensors only), converting each property once.

    A narrowing cast happens before a transfer and a widening one after it, so the fewest bytes cross
    the bus; on the CPU it is a single ``to``.
    """
    want = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    if tensor.device == device:
        return tensor if tensor.dtype == want else tensor.to(dtype=want)
    if want.itemsize < tensor.dtype.itemsize:
        return tensor.to(dtype=want).to(device=device)
    return tensor.to(device=device).to(dtype=want)


class ContentHasher:
    """sha256 of model files, streamed, remembered per (path, size, mtime) for this object's lifetime.

    Node fingerprints (cache keys) hash the file a loader read; a worker keeps one hasher so a
    multi-gigabyte checkpoint is hashed once, and again only when the file changes.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def content_hash(self, path: str | os.PathLike[str]) -> str:
        """Hex sha256 of the file at ``path`` (symlinks followed)."""
        real = os.path.realpath(path)
        try:
            st = os.stat(real)
        except OSError as exc:
            raise ModelError(f"Cannot read model file {path}: {exc}") from exc
        key = (real, st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        try:
            with open(real, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as exc:
            raise ModelError(f"Cannot read model file {path}: {exc}") from exc
        with self._lock:
            self._cache[key] = digest
        return digest

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

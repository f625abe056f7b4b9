"""engine.models.safetensors_file: pickles refused, headers validated, tensors loaded once, hashes cached."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import engine.models.safetensors_file as sf
from engine.errors import ModelError
from engine.models.safetensors_file import (
    ContentHasher,
    TensorInfo,
    load_tensors,
    read_header,
    read_metadata,
    tensor_shapes,
)


def mixed_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.diffusion_model.w32": torch.randn(4, 3, generator=g),
        "model.diffusion_model.w16": torch.randn(8, generator=g).half(),
        "first_stage_model.wbf16": torch.randn(2, 2, generator=g).bfloat16(),
        "cond_stage_model.position_ids": torch.arange(77, dtype=torch.int64).unsqueeze(0),
        "first_stage_model.mask": torch.tensor([True, False, True]),
        "first_stage_model.counter": torch.tensor([7], dtype=torch.uint8),
    }


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.safetensors"
    save_file(mixed_state_dict(), str(path), metadata={"format": "pt", "modelspec.title": "tiny"})
    return path


def write_raw(path: Path, header: dict, data: bytes, pad_to: int | None = None) -> Path:
    raw = json.dumps(header, separators=(",", ":")).encode()
    if pad_to is not None:
        raw = raw.ljust(pad_to, b" ")
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# --- reading headers ---------------------------------------------------------------------------


def test_tensor_shapes_and_metadata(checkpoint: Path):
    shapes = tensor_shapes(checkpoint)
    assert shapes["model.diffusion_model.w32"] == TensorInfo((4, 3), "F32")
    shape, dtype = shapes["cond_stage_model.position_ids"]
    assert (shape, dtype) == ((1, 77), "I64")
    assert shapes["first_stage_model.mask"].dtype == "BOOL"
    assert set(shapes) == set(mixed_state_dict())
    assert read_metadata(checkpoint) == {"format": "pt", "modelspec.title": "tiny"}


def test_tensor_shapes_reads_only_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "big.safetensors"
    save_file({"big": torch.zeros(256, 1024), "small": torch.zeros(3)}, str(path))
    size = path.stat().st_size
    header_size = struct.unpack("<Q", path.read_bytes()[:8])[0]
    read = {"bytes": 0}

    class CountingFile(io.FileIO):
        def read(self, n: int = -1) -> bytes:
            chunk = super().read(n)
            read["bytes"] += len(chunk)
            return chunk

    monkeypatch.setattr(sf, "open", lambda p, mode="rb": CountingFile(p, "r"), raising=False)
    shapes = tensor_shapes(path)
    assert shapes["big"] == ((256, 1024), "F32")
    assert read["bytes"] <= 9 + header_size
    assert read["bytes"] < size // 100  # 1 MiB of tensor data left unread


def test_reading_a_header_does_not_import_torch(checkpoint: Path):
    code = (
        "import sys\nfrom engine.models.safetensors_file import tensor_shapes\n"
        f"tensor_shapes({str(checkpoint)!r})\nprint('torch' in sys.modules, 'safetensors' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


def test_header_length_with_a_pickle_like_first_byte_is_accepted(tmp_path: Path):
    # A 640-byte header starts the file with 0x80 0x02: the bytes of a protocol-2 pickle. Byte 8 is '{'.
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    path = write_raw(tmp_path / "edge.safetensors", header, struct.pack("<2f", 1.5, -2.0), pad_to=0x280)
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert tensor_shapes(path) == {"w": TensorInfo((2,), "F32")}
    assert load_tensors(path)["w"].tolist() == [1.5, -2.0]


def test_sft_suffix_is_accepted(tmp_path: Path):
    path = tmp_path / "model.sft"
    save_file({"x": torch.ones(2)}, str(path))
    assert load_tensors(path)["x"].tolist() == [1.0, 1.0]


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".pkl", ".CKPT"])
def test_pickled_suffixes_are_refused(tmp_path: Path, suffix: str):
    path = tmp_path / f"model{suffix}"
    save_file({"x": torch.ones(1)}, str(path))  # even with safetensors bytes inside
    for reader in (read_header, tensor_shapes, load_tensors):
        with pytest.raises(
            ModelError, match=r"is a pickled checkpoint.*Kiln loads only \.safetensors.*convert"
        ):
            reader(path)


def torch_zip_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"x": torch.ones(2)}, buffer)
    return buffer.getvalue()


def torch_legacy_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"x": torch.ones(2)}, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (pickle.dumps({"state_dict": {}}, protocol=2), "pickle"),
        (pickle.dumps({"state_dict": {}}, protocol=4), "pickle"),
        (pickle.dumps({"state_dict": {}}, protocol=5), "pickle"),
        (torch_zip_bytes(), "zip archive"),
        (torch_legacy_bytes(), "pickle"),
    ],
    ids=["pickle2", "pickle4", "pickle5", "torch-zip", "torch-legacy"],
)
def test_pickle_bytes_named_safetensors_are_refused(tmp_path: Path, content: bytes, reason: str):
    path = tmp_path / "innocent.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=rf"pickled checkpoint \(.*{reason}.*\).*convert") as info:
        load_tensors(path)
    assert "innocent.safetensors" in str(info.value)


def valid_header() -> dict:
    return {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda p: p.write_bytes(b"\x01\x02\x03"), "holds only 3 bytes"),
        (lambda p: p.write_bytes(struct.pack("<Q", 10_000) + b"{}"), "claims 10000 bytes"),
        (lambda p: p.write_bytes(struct.pack("<Q", 5) + b"{oops"), "not valid JSON"),
        (lambda p: p.write_bytes(struct.pack("<Q", 2) + b"[]"), "not a JSON object"),
        (lambda p: write_raw(p, valid_header(), bytes(10)), "truncated"),
        (lambda p: write_raw(p, valid_header(), bytes(20)), "truncated or padded"),
        (
            lambda p: write_raw(p, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
            "needs 12 bytes",
        ),
        (
            lambda p: write_raw(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 64]}}, bytes(8)),
            "ends at byte 64 of the tensor data but the file holds 8",
        ),
        (
            lambda p: write_raw(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8)),
            "invalid data offsets",
        ),
        (lambda p: write_raw(p, {"a": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8)), "has no dtype"),
        (
            lambda p: write_raw(p, {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, bytes(8)),
            "invalid shape",
        ),
        (lambda p: write_raw(p, {"__metadata__": {"k": 1}}, b""), "__metadata__"),
    ],
    ids=[
        "tiny",
        "length-past-eof",
        "bad-json",
        "json-array",
        "truncated",
        "padded",
        "size-mismatch",
        "offsets-past-the-data",
        "offsets-inverted",
        "no-dtype",
        "negative-dim",
        "bad-metadata",
    ],
)
def test_corrupt_files_are_refused(tmp_path: Path, build, message: str):
    path = tmp_path / "broken.safetensors"
    build(path)
    with pytest.raises(ModelError, match="not a valid safetensors file") as info:
        load_tensors(path)
    assert message in str(info.value)


def test_missing_file_and_other_suffixes(tmp_path: Path):
    with pytest.raises(ModelError, match="does not exist"):
        tensor_shapes(tmp_path / "nope.safetensors")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match=r"not a \.safetensors file"):
        tensor_shapes(tmp_path / "model.gguf")


# --- loading ----------------------------------------------------------------------------------------


def test_load_tensors_keeps_dtypes_without_a_target(checkpoint: Path):
    loaded = load_tensors(checkpoint)
    expected = mixed_state_dict()
    offsets = read_header(checkpoint).offsets
    assert list(loaded) == sorted(expected, key=lambda name: offsets[name][0])  # file order
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_load_tensors_casts_floating_tensors_only(checkpoint: Path, dtype: torch.dtype):
    loaded = load_tensors(checkpoint, dtype=dtype)
    expected = mixed_state_dict()
    for name in ("model.diffusion_model.w32", "model.diffusion_model.w16", "first_stage_model.wbf16"):
        assert loaded[name].dtype == dtype
        assert torch.equal(loaded[name], expected[name].to(dtype))
    assert loaded["cond_stage_model.position_ids"].dtype == torch.int64
    assert torch.equal(loaded["cond_stage_model.position_ids"], expected["cond_stage_model.position_ids"])
    assert loaded["first_stage_model.mask"].dtype == torch.bool
    assert loaded["first_stage_model.counter"].dtype == torch.uint8
    assert all(t.device.type == "cpu" for t in loaded.values())


def test_load_tensors_selects_by_prefix_and_keys(checkpoint: Path):
    unet = load_tensors(checkpoint, prefix="model.diffusion_model.")
    assert sorted(unet) == ["model.diffusion_model.w16", "model.diffusion_model.w32"]
    picked = load_tensors(checkpoint, keys=["first_stage_model.mask", "model.diffusion_model.w16"])
    assert set(picked) == {"first_stage_model.mask", "model.diffusion_model.w16"}
    both = load_tensors(
        checkpoint,
        prefix="first_stage_model.",
        keys=["first_stage_model.mask", "cond_stage_model.position_ids"],
    )
    assert list(both) == ["first_stage_model.mask"]
    with pytest.raises(ModelError, match=r"no tensor named missing\.weight"):
        load_tensors(checkpoint, keys=["missing.weight"])


def test_same_dtype_and_device_returns_the_read_tensor(checkpoint: Path):
    # No second copy when nothing changes: the converted tensor is the one safetensors produced.
    tensor = torch.ones(3, dtype=torch.float16)
    assert sf._convert(tensor, torch.device("cpu"), torch.float16) is tensor
    assert sf._convert(tensor, torch.device("cpu"), None) is tensor
    ints = torch.arange(3)
    assert sf._convert(ints, torch.device("cpu"), torch.float16) is ints


# --- content hashes -------------------------------------------------------------------------------


def test_content_hash_is_sha256_and_cached_per_object(checkpoint: Path, monkeypatch: pytest.MonkeyPatch):
    expected = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    hasher = ContentHasher()
    calls = {"n": 0}
    real_digest = hashlib.file_digest

    def counting_digest(f, name):
        calls["n"] += 1
        return real_digest(f, name)

    monkeypatch.setattr(sf.hashlib, "file_digest", counting_digest)
    assert hasher.content_hash(checkpoint) == expected
    assert hasher.content_hash(str(checkpoint)) == expected
    assert calls["n"] == 1
    link = checkpoint.with_name("link.safetensors")
    link.symlink_to(checkpoint)
    assert hasher.content_hash(link) == expected
    assert calls["n"] == 1  # same real file
    other = ContentHasher()  # each hasher has its own cache
    assert other.content_hash(checkpoint) == expected
    assert calls["n"] == 2


def test_content_hash_changes_with_the_file(tmp_path: Path):
    path = tmp_path / "m.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    hasher = ContentHasher()
    first = hasher.content_hash(path)
    save_file({"x": torch.ones(3)}, str(path))
    assert hasher.content_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest() != first
    with pytest.raises(ModelError, match="Cannot read"):
        hasher.content_hash(tmp_path / "absent.safetensors")

"""The model manager: one object that owns every loaded model of an engine.

Loader nodes ask it for handles (``load_checkpoint``, ``load_vae``, ``load_text_encoder``,
``load_diffusion_model``, ``load_upscale_model``); nodes that compute with a model borrow the weights
inside ``with manager.use(handle) as obj:`` (see ``engine.models.handles`` for what each handle yields
and the KSampler contract; ``engine.models.esrgan`` for UPSCALE_MODEL). Nothing here is global: an
engine runtime builds one manager and passes it to nodes as ``ctx.services.models``.

Memory. Loaded weights live in one of two tiers, each an LRU within a byte budget:

- the device tier (the engine's device: CUDA, MPS or CPU), where ``use`` needs them;
- the host tier (CPU RAM), where models evicted from the device wait to be moved back, which is
  faster than reading the file again.

Loading puts a model straight on the device when it fits there after evicting idle models
(least recently used first; a model in use is never evicted), else in host RAM. Evicting from the
device moves a model to the host tier if that has room (after evicting there), else drops it;
evicting from the host drops it. A dropped model is read from its file again on next use. When the
device is the CPU the two tiers share RAM: moving between them is free (no copy) and the host
budget defaults to 0, so models leaving the device tier are dropped. A single model larger than a
budget still loads (on the device; a warning is logged).

Precision: the UNet in ``precision`` (``auto``: fp16 on CUDA and MPS, fp32 on CPU); the text
encoder always in fp32 (ComfyUI computes CLIP in fp32); the VAE in fp32 with ``vae_fp32`` or on
CPU, else bf16 where the device supports it (ComfyUI's working dtypes for the SD VAE are bf16 and
fp32: fp16 is not used, it overflows), else fp32; upscale models in fp32 (as ComfyUI runs them).
Tensors go from the file to their dtype and device in one conversion each
(``engine.models.safetensors_file.load_tensors``); tensors that keep the file's dtype on the CPU are
not copied at all.

Reporting (for the router's heartbeats): ``resident()`` lists what is loaded and where,
``load_stats()`` what recent loads cost; ``free_all()`` drops every idle model.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from engine.errors import ModelError
from engine.models.checkpoint import (
    CheckpointInfo,
    UNetFileInfo,
    inspect_checkpoint,
    inspect_text_encoder_file,
    inspect_unet_file,
    inspect_vae_file,
)
from engine.models.clip_text import CLIPTextModel
from engine.models.esrgan import UpscaleFileInfo, UpscaleModelHandle, inspect_upscale_file, load_esrgan
from engine.models.handles import (
    ClipHandle,
    ModelHandle,
    VAEHandle,
    WeightPatch,
    WeightsSource,
)
from engine.models.handles import Handle as DiffusionHandle
from engine.models.latent_format import SD15
from engine.models.safetensors_file import ContentHasher, load_tensors, read_header
from engine.models.unet import load_unet
from engine.models.vae import CHECKPOINT_PREFIXES, VAE, load_autoencoder

if TYPE_CHECKING:
    from engine.models.hub import ModelHub
    from engine.models.text_encoding import TextEncoder
    from engine.models.tokenizer import CLIPTokenizer

log = logging.getLogger(__name__)

Tier = Literal["device", "host"]
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# UNETLoader's weight_dtype values Kiln accepts ("default": the manager's precision).
UNET_WEIGHT_DTYPES = {"default": None}
_RECENT_LOADS = 64
_INSPECTIONS = 64

# Everything the manager lends out: the diffusion parts (MODEL, CLIP, VAE) and upscale models.
Handle = DiffusionHandle | UpscaleModelHandle


def physical_memory() -> int:
    """Bytes of RAM in this machine (8 GiB when it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def default_device_budget(device: torch.device) -> int:
    """75% of a CUDA device's memory (the rest is for activations); half the RAM otherwise."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.75)
    return physical_memory() // 2


def default_host_budget(device: torch.device) -> int:
    """Half the RAM when the device is not the CPU; 0 on CPU (the tiers would share RAM)."""
    return 0 if device.type == "cpu" else physical_memory() // 2


def module_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (each tensor counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        key = (tensor.data_ptr(), tensor.nbytes)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.nbytes
    return total


def _state_tensors(module: nn.Module) -> dict[str, Tensor]:
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    return tensors


def apply_patches(
    module: nn.Module, patches: Sequence[WeightPatch], backup_device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """Patch ``module``'s weights in place; return the originals (to give to ``restore_patches``).

    Per key: the original is copied to ``backup_device``, the patches of that key are applied in
    order to a float32 copy on the weight's device, and the result is written back in the weight's
    dtype (one rounding). On any error the weights already patched are restored first.
    """
    tensors = _state_tensors(module)
    by_key: dict[str, list[WeightPatch]] = {}
    for patch in patches:
        by_key.setdefault(patch.key, []).append(patch)
    backups: dict[str, Tensor] = {}
    try:
        with torch.inference_mode(False), torch.no_grad():
            for key, key_patches in by_key.items():
                weight = tensors.get(key)
                if weight is None:
                    raise ModelError(f"the model has no weight {key!r} to patch")
                backups[key] = weight.detach().to(backup_device, copy=True)
                work = weight.detach().to(torch.float32, copy=True)
                for patch in key_patches:
                    if patch.offset is None:
                        work = patch.apply(work)
                    else:
                        dim, start, length = patch.offset
                        part = work.narrow(dim, start, length)
                        part.copy_(patch.apply(part.clone()))
                weight.detach().copy_(work)
    except BaseException:
        restore_patches(module, backups)
        raise
    return backups


def restore_patches(module: nn.Module, backups: Mapping[str, Tensor]) -> None:
    """Write the originals saved by ``apply_patches`` back, bit for bit."""
    tensors = _state_tensors(module)
    with torch.inference_mode(False), torch.no_grad():
        for key, original in backups.items():
            tensors[key].detach().copy_(original)


@dataclass(eq=False)
class _Entry:
    """One loaded model: its weights, where they are, and what they cost."""

    source: WeightsSource
    dtype: torch.dtype
    module: nn.Module
    tier: Tier
    bytes: int
    load_seconds: float
    last_used: float
    users: int = 0
    applied: str = ""  # patch signature currently applied
    backups: dict[str, Tensor] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, torch.dtype]:
        return (self.source.key, self.dtype)


class ModelManager:
    """Loads, places, lends out and frees models (see the module docstring)."""

    def __init__(
        self,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        vae_fp32: bool = False,
        device_budget_bytes: int | None = None,
        host_budget_bytes: int | None = None,
        hub: ModelHub | None = None,
        *,
        hasher: ContentHasher | None = None,
        tokenizer: CLIPTokenizer | None = None,
    ) -> None:
        if precision not in PRECISIONS:
            raise ModelError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
        self.device = torch.device(device)
        self.host_device = torch.device("cpu")
        self.precision = precision
        self.vae_fp32 = vae_fp32
        self.device_budget = (
            default_device_budget(self.device) if device_budget_bytes is None else int(device_budget_bytes)
        )
        self.host_budget = (
            default_host_budget(self.device) if host_budget_bytes is None else int(host_budget_bytes)
        )
        self.hub = hub
        self.hasher = hasher or (hub.hasher if hub is not None else ContentHasher())
        self._tokenizer = tokenizer
        self._entries: dict[tuple[str, torch.dtype], _Entry] = {}
        self._loads: collections.deque[dict[str, Any]] = collections.deque(maxlen=_RECENT_LOADS)
        self._inspections: collections.OrderedDict[tuple[str, str], Any] = collections.OrderedDict()
        self._lock = threading.RLock()

    # -- dtypes -------------------------------------------------------------------------------------

    @property
    def unet_dtype(self) -> torch.dtype:
        if self.precision == "auto":
            return torch.float16 if self.device.type in ("cuda", "mps") else torch.float32
        return _PRECISION_DTYPES[self.precision]

    @property
    def text_encoder_dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def vae_dtype(self) -> torch.dtype:
        if self.vae_fp32 or self.precision == "fp32":
            return torch.float32
        if self.precision == "bf16":
            return torch.bfloat16
        # auto / fp16: fp16 is not a working dtype of the SD VAE (it overflows), bf16 is.
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32

    @property
    def upscale_model_dtype(self) -> torch.dtype:
        return torch.float32

    def dtype_for(self, handle: Handle) -> torch.dtype:
        if isinstance(handle, UpscaleModelHandle):
            return self.upscale_model_dtype
        if isinstance(handle, ModelHandle):
            return getattr(torch, handle.weight_dtype) if handle.weight_dtype else self.unet_dtype
        if isinstance(handle, ClipHandle):
            return self.text_encoder_dtype
        return self.vae_dtype

    # -- names and files ----------------------------------------------------------------------------

    def resolve(self, folder: str, name: str) -> Path:
        """The file a workflow names (through the hub: local folders, then known models)."""
        if self.hub is None:
            raise ModelError("no model hub is configured: model names cannot be resolved")
        return self.hub.resolve(folder, name)

    def fingerprint(self, folder: str, name: str) -> str:
        """The content hash of the named file (a loader node's cache-key fingerprint)."""
        return self.hasher.content_hash(self.resolve(folder, name))

    def _inspect(self, kind: str, path: Path, content_hash: str, fn: Any) -> Any:
        key = (content_hash, kind)
        with self._lock:
            found = self._inspections.get(key)
            if found is not None:
                self._inspections.move_to_end(key)
                return found
        info = fn(path)
        with self._lock:
            self._inspections[key] = info
            while len(self._inspections) > _INSPECTIONS:
                self._inspections.popitem(last=False)
        return info

    @property
    def tokenizer(self) -> CLIPTokenizer:
        if self._tokenizer is None:
            from engine.models.tokenizer import CLIPTokenizer

            self._tokenizer = CLIPTokenizer.from_package()
        return self._tokenizer

    def embedding_dirs(self) -> list[Path]:
        return list(self.hub.search_dirs("embeddings")) if self.hub is not None else []

    # -- loaders ------------------------------------------------------------------------------------

    def inspect_checkpoint(self, path: str | os.PathLike[str]) -> tuple[CheckpointInfo, str]:
        """(what the checkpoint holds, its content hash); cached by content."""
        path = Path(path)
        read_header(path)  # refuse pickles and corrupt files before hashing gigabytes
        content_hash = self.hasher.content_hash(path)
        return self._inspect("checkpoint", path, content_hash, inspect_checkpoint), content_hash

    def load_checkpoint(
        self, path: str | os.PathLike[str], *, preload: bool = True
    ) -> tuple[ModelHandle, ClipHandle | None, VAEHandle | None]:
        """CheckpointLoaderSimple: (MODEL, CLIP, VAE) of an SD1.x/SD2.x single-file checkpoint.

        CLIP or VAE is None when the file has no text encoder or VAE (as ComfyUI). With ``preload``
        the weights are loaded now (onto the device when they fit), so errors surface here.
        """
        info, content_hash = self.inspect_checkpoint(path)
        file = Path(path)  # inspections are shared by content; the weights come from this file
        model = ModelHandle(
            source=WeightsSource(file, content_hash, "unet", info.parts["unet"]),
            config=info.unet_config,
            model_sampling=info.model_sampling,
            latent_format=SD15,
        )
        clip = None
        if info.clip_config is not None and info.clip_layout is not None:
            clip = ClipHandle(
                source=WeightsSource(file, content_hash, "clip", info.parts["clip"]),
                config=info.clip_config,
                layout=info.clip_layout,
            )
        vae = None
        if info.vae_config is not None:
            vae_source = WeightsSource(file, content_hash, "vae", info.parts["vae"])
            vae = VAEHandle(source=vae_source, config=info.vae_config)
        if preload:
            for handle in (model, clip, vae):
                if handle is not None:
                    self.preload(handle)
        return model, clip, vae

    def load_vae(self, path: str | os.PathLike[str], *, preload: bool = True) -> VAEHandle:
        """VAELoader: a standalone VAE file (or a checkpoint's VAE)."""
        path = Path(path)
        read_header(path)
        content_hash = self.hasher.content_hash(path)
        _, config = self._inspect("vae", path, content_hash, inspect_vae_file)
        file = path
        header = read_header(file)
        prefix = next(
            (p for p in CHECKPOINT_PREFIXES if any(n.startswith(p + "encoder.") for n in header.tensors)), ""
        )
        handle = VAEHandle(source=WeightsSource(file, content_hash, "vae", prefix), config=config)
        if preload:
            self.preload(handle)
        return handle

    def load_text_encoder(
        self, path: str | os.PathLike[str], clip_type: str = "stable_diffusion", *, preload: bool = True
    ) -> ClipHandle:
        """CLIPLoader: a standalone SD1.x (CLIP-L) or SD2.x (OpenCLIP-H) text encoder file."""
        if clip_type != "stable_diffusion":
            raise ModelError(
                f"CLIPLoader type {clip_type!r} is not supported yet; Kiln supports 'stable_diffusion' "
                "(SD1.x CLIP-L and SD2.x OpenCLIP-H text encoders)"
            )
        path = Path(path)
        read_header(path)
        content_hash = self.hasher.content_hash(path)
        _, prefix, config, layout = self._inspect("clip", path, content_hash, inspect_text_encoder_file)
        source = WeightsSource(path, content_hash, "clip", prefix)
        handle = ClipHandle(source=source, config=config, layout=layout)
        if preload:
            self.preload(handle)
        return handle

    def load_diffusion_model(
        self, path: str | os.PathLike[str], weight_dtype: str = "default", *, preload: bool = True
    ) -> ModelHandle:
        """UNETLoader: a standalone SD1.x/SD2.x UNet (LDM layout)."""
        if weight_dtype not in UNET_WEIGHT_DTYPES:
            raise ModelError(
                f"weight_dtype {weight_dtype!r} is not supported yet (fp8 storage needs fp8 kernels); use "
                "'default' and choose the precision with the engine's precision setting"
            )
        path = Path(path)
        read_header(path)
        content_hash = self.hasher.content_hash(path)
        info: UNetFileInfo = self._inspect("unet", path, content_hash, inspect_unet_file)
        handle = ModelHandle(
            source=WeightsSource(path, content_hash, "unet", info.prefix),
            config=info.config,
            model_sampling=info.model_sampling,
            latent_format=SD15,
            weight_dtype=UNET_WEIGHT_DTYPES[weight_dtype],
        )
        if preload:
            self.preload(handle)
        return handle

    def load_upscale_model(self, path: str | os.PathLike[str], *, preload: bool = True) -> UpscaleModelHandle:
        """UpscaleModelLoader: an ESRGAN / Real-ESRGAN (RRDBNet) safetensors file."""
        path = Path(path)
        read_header(path)
        content_hash = self.hasher.content_hash(path)
        info: UpscaleFileInfo = self._inspect("upscale", path, content_hash, inspect_upscale_file)
        source = WeightsSource(path, content_hash, "upscale", info.prefix)
        handle = UpscaleModelHandle(source=source, config=info.config)
        if preload:
            self.preload(handle)
        return handle

    # -- using ---------------------------------------------------------------------------------------

    def preload(self, handle: Handle) -> None:
        """Load the handle's weights now (onto the device when they fit), without using them."""
        with self._lock:
            entry = self._entries.get((handle.source.key, self.dtype_for(handle)))
            if entry is None:
                self._load(handle)
            else:
                entry.last_used = time.monotonic()

    @contextlib.contextmanager
    def use(self, handle: Handle) -> Iterator[Any]:
        """Borrow a handle's weights on the device, patched: yields a ``UNetModel`` (MODEL), a
        ``TextEncoder`` (CLIP), a ``VAE`` (VAE) or an ``RRDBNet`` (UPSCALE_MODEL). See
        ``engine.models.handles``."""
        with self._lock:
            entry = self._acquire(handle)
        try:
            yield self._runtime_object(entry, handle)
        finally:
            with self._lock:
                self._release(entry)

    def _acquire(self, handle: Handle) -> _Entry:
        key = (handle.source.key, self.dtype_for(handle))
        entry = self._entries.get(key)
        if entry is None:
            entry = self._load(handle)
        if entry.tier != "device":
            if not self._make_room("device", entry.bytes, keep=entry):
                log.warning("%s (%s) exceeds the device budget", entry.source.file_name, entry.source.part)
            self._move(entry, "device")
        signature = handle.patch_signature if handle.patches else ""
        if entry.users == 0:
            if entry.applied != signature:
                self._unpatch(entry)
                if handle.patches:
                    entry.backups = apply_patches(entry.module, handle.patches, self.host_device)
                    entry.applied = signature
        elif entry.applied != signature:
            raise ModelError(
                f"{entry.source.file_name} ({entry.source.part}) is in use with other patches; a model "
                "cannot be used with two patch sets at once"
            )
        entry.users += 1
        entry.last_used = time.monotonic()
        return entry

    def _release(self, entry: _Entry) -> None:
        entry.users -= 1
        entry.last_used = time.monotonic()
        if entry.users == 0:
            self._unpatch(entry)

    def _unpatch(self, entry: _Entry) -> None:
        if entry.backups:
            restore_patches(entry.module, entry.backups)
        entry.backups = {}
        entry.applied = ""

    def _runtime_object(self, entry: _Entry, handle: Handle) -> Any:
        if isinstance(handle, UpscaleModelHandle):
            return entry.module
        if isinstance(handle, ModelHandle):
            return entry.module
        if isinstance(handle, ClipHandle):
            return self._text_encoder(entry, handle)
        return self._vae(entry)

    def _text_encoder(self, entry: _Entry, handle: ClipHandle) -> TextEncoder:
        from engine.models.text_encoding import SD1, SD2, EmbeddingFolder, TextEncoder

        model = entry.module
        assert isinstance(model, CLIPTextModel)
        flavor = SD2 if handle.layout == "sd2" or model.config.width == 1024 else SD1
        embeddings = EmbeddingFolder(self.embedding_dirs(), flavor.embedding_key)
        return TextEncoder(model, self.tokenizer, flavor, layer_idx=handle.layer_idx, embeddings=embeddings)

    def _vae(self, entry: _Entry) -> VAE:
        with torch.inference_mode(False), torch.no_grad():
            return VAE(entry.module, device=self.device, dtype=entry.dtype, output_device=self.host_device)  # type: ignore[arg-type]

    # -- loading and placement --------------------------------------------------------------------------

    def _load(self, handle: Handle) -> _Entry:
        source = handle.source
        dtype = self.dtype_for(handle)
        current = self.hasher.content_hash(source.path)
        if current != source.content_hash:
            raise ModelError(
                f"{source.path} changed since it was loaded (content hash {current[:12]} instead of "
                f"{source.content_hash[:12]}); run the loader again"
            )
        header = read_header(source.path)
        estimate = self._estimate_bytes(header, source, dtype)
        tier: Tier = "device"
        if not self._make_room("device", estimate):
            if estimate <= self.device_budget and self._make_room("host", estimate):
                tier = "host"  # models in use fill the device: wait in host RAM
            else:
                log.warning(
                    "%s (%s, %.0f MiB) does not fit the memory budgets; loading it on the device anyway",
                    source.file_name,
                    source.part,
                    estimate / 2**20,
                )
        target = self.device if tier == "device" else self.host_device
        started = time.perf_counter()
        with torch.inference_mode(False), torch.no_grad():
            module = self._build(handle, target, dtype)
        if target.type == "cuda":
            torch.cuda.synchronize(target)
        seconds = time.perf_counter() - started
        nbytes = module_bytes(module)
        now = time.monotonic()
        entry = _Entry(source, dtype, module, tier, nbytes, seconds, now)
        self._entries[entry.key] = entry
        self._loads.append(
            {
                "file": source.file_name,
                "content_hash": source.content_hash,
                "part": source.part,
                "dtype": str(dtype).removeprefix("torch."),
                "where": tier,
                "device": str(target),
                "bytes": nbytes,
                "seconds": round(seconds, 6),
                "at": time.time(),
            }
        )
        log.info(
            "Loaded %s (%s) to %s in %.2f s (%.0f MiB, %s)",
            source.file_name,
            source.part,
            target,
            seconds,
            nbytes / 2**20,
            str(dtype).removeprefix("torch."),
        )
        return entry

    @staticmethod
    def _estimate_bytes(header: Any, source: WeightsSource, dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        total = 0
        for name, info in header.tensors.items():
            if not name.startswith(source.prefix):
                continue
            n = 1
            for d in info.shape:
                n *= d
            total += n * (size if info.dtype.startswith(("F", "BF")) else 8)
        return total

    def _build(self, handle: Handle, device: torch.device, dtype: torch.dtype) -> nn.Module:
        source = handle.source
        prefix = source.prefix or None
        if isinstance(handle, UpscaleModelHandle):
            sd = load_tensors(source.path, device=device, dtype=dtype, prefix=prefix)
            return load_esrgan(sd, handle.config, prefix=source.prefix, device=device, dtype=dtype)
        if isinstance(handle, ModelHandle):
            keys = [source.prefix + key for key in handle.weight_shapes()]
            sd = load_tensors(source.path, device=device, dtype=dtype, keys=keys)
            if source.prefix:
                sd = {key[len(source.prefix) :]: value for key, value in sd.items()}
            return load_unet(sd, handle.config, device=device, dtype=dtype)
        if isinstance(handle, ClipHandle):
            sd = load_tensors(source.path, device=device, dtype=dtype, prefix=prefix)
            return CLIPTextModel.from_state_dict(sd, source.prefix, dtype=dtype, device=device)
        sd = load_tensors(source.path, device=device, dtype=dtype, prefix=prefix)
        return load_autoencoder(sd, device=device, dtype=dtype, config=handle.config)

    def _tier_bytes(self, tier: Tier) -> int:
        return sum(e.bytes for e in self._entries.values() if e.tier == tier)

    def _budget(self, tier: Tier) -> int:
        return self.device_budget if tier == "device" else self.host_budget

    def _make_room(self, tier: Tier, nbytes: int, keep: _Entry | None = None) -> bool:
        """Evict idle models of ``tier`` (LRU first) until ``nbytes`` more fit; False if they cannot.

        On the device tier eviction is best effort (everything idle goes when even that is not
        enough: the model is needed there anyway); on the host tier nothing is evicted for a model
        larger than the whole budget.
        """
        budget = self._budget(tier)
        if tier == "host" and nbytes > budget:
            return False
        while self._tier_bytes(tier) + nbytes > budget:
            idle = [e for e in self._entries.values() if e.tier == tier and e.users == 0 and e is not keep]
            if not idle:
                return False
            victim = min(idle, key=lambda e: e.last_used)
            if tier == "device" and self._make_room("host", victim.bytes, keep=keep):
                self._move(victim, "host")
            else:
                self._drop(victim)
        return True

    def _move(self, entry: _Entry, tier: Tier) -> None:
        if entry.tier == tier:
            return
        target = self.device if tier == "device" else self.host_device
        started = time.perf_counter()
        with torch.inference_mode(False), torch.no_grad():
            entry.module.to(target)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.debug(
            "Moved %s (%s) to %s in %.2f s",
            entry.source.file_name,
            entry.source.part,
            target,
            time.perf_counter() - started,
        )
        entry.tier = tier

    def _drop(self, entry: _Entry) -> None:
        self._unpatch(entry)
        self._entries.pop(entry.key, None)
        log.info("Unloaded %s (%s) from %s", entry.source.file_name, entry.source.part, entry.tier)

    # -- reporting and freeing ------------------------------------------------------------------------

    def resident(self) -> list[dict[str, Any]]:
        """What is loaded, most recently used first: file name, content hash, part, where
        (``device`` / ``host``), device, dtype, bytes, in use."""
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda e: e.last_used, reverse=True)
            return [
                {
                    "file": e.source.file_name,
                    "content_hash": e.source.content_hash,
                    "part": e.source.part,
                    "where": e.tier,
                    "device": str(self.device if e.tier == "device" else self.host_device),
                    "dtype": str(e.dtype).removeprefix("torch."),
                    "bytes": e.bytes,
                    "in_use": e.users > 0,
                }
                for e in entries
            ]

    def load_stats(self) -> list[dict[str, Any]]:
        """Recent loads from files, oldest first: file, content hash, part, dtype, where, device,
        bytes, seconds, at (Unix time)."""
        with self._lock:
            return [dict(item) for item in self._loads]

    def memory_used(self) -> dict[str, int]:
        with self._lock:
            return {"device": self._tier_bytes("device"), "host": self._tier_bytes("host")}

    def free_all(self) -> int:
        """Drop every model that is not in use; returns the bytes released."""
        with self._lock:
            idle = [e for e in self._entries.values() if e.users == 0]
            freed = sum(e.bytes for e in idle)
            for entry in idle:
                self._drop(entry)
            self._inspections.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return freed

    def __repr__(self) -> str:
        used = self.memory_used()
        return (
            f"ModelManager(device={self.device}, precision={self.precision}, {len(self._entries)} models, "
            f"device {used['device'] / 2**20:.0f}/{self.device_budget / 2**20:.0f} MiB, "
            f"host {used['host'] / 2**20:.0f}/{self.host_budget / 2**20:.0f} MiB)"
        )

"""What flows through MODEL, CLIP and VAE sockets: small immutable handles, never the weights.

A handle names the weights it stands for (a part of one model file, identified by the file's
content hash) and carries everything else a node needs: configs, the sigma table, the latent
format, clip skip, and a list of weight patches. The weights themselves belong to the model
manager (``engine.models.manager.ModelManager``), which loads them on demand, keeps them in device
memory or host RAM within its budgets, and lends them out inside ``manager.use(handle)``. So:

- handles are safe to cache and reuse across prompts (the executor's output cache keeps loader
  outputs by their inputs and the file's content hash): they are frozen, and a model the manager
  evicted is simply loaded again on the next ``use``;
- cloning is free: ``with_patches`` / ``clip_layer`` / ``with_model_sampling`` return a new handle
  that shares the weights (ComfyUI's ``ModelPatcher.clone``);
- ``cache_key`` identifies a handle by content (file hash, part, config, patches, ...), never by
  object identity.

The MODEL contract (what a KSampler does)
-----------------------------------------
::

    manager = ctx.services.models                      # engine.models.manager.ModelManager
    with manager.use(model) as net:                    # model: ModelHandle
        # net: engine.models.unet.UNetModel, on the engine's device, weights patched.
        # net(x [B,4,h,w], timestep [B], context=[B,77k,C]) -> eps or v, in x's dtype.
        device, dtype = net.device, net.dtype
        model_sampling = model.model_sampling          # sigma table + EPS / V_PREDICTION
        latent_format = model.latent_format            # process_in / process_out, preview factors
        denoiser = Denoiser(net, model_sampling, dtype=dtype)   # engine.sampling.model_sampling
        # guidance: CFGGuider(..., extra_conds=model.extra_conds): SD1/SD2 UNets take no extra
        # inputs, so `pooled_output` must not be passed on (the default extra_conds would).
        x = latent_format.process_in(latent["samples"].to(device))
        ... run the sampler with `denoiser` ...
        samples = latent_format.process_out(x).cpu()
    # after the block the patches are removed (bit for bit) and the weights may be evicted:
    # do not keep `net` (or tensors that alias its weights) beyond the block.

``use`` loads the weights if needed (from the file, straight to the target device and dtype),
moves them to the device (evicting least-recently-used models within the budgets), applies the
handle's patches in place, and undoes the patches on exit. It is re-entrant for the same handle;
two different patch sets of one model cannot be in use at the same time (ModelError).

CLIP: ``with manager.use(clip) as encoder`` gives an ``engine.models.text_encoding.TextEncoder``
(``encoder.encode(text) -> (cond [1, 77k, C], pooled)``, float32 on the device) with the handle's
clip skip applied. VAE: ``with manager.use(vae) as v`` gives an ``engine.models.vae.VAE``
(``encode``, ``decode``, ``encode_tiled``, ``decode_tiled``; results float32 on the CPU).

Weight patches (what a LoRA loader does)
----------------------------------------
A patch changes one weight, addressed by the model's own state-dict key: for a MODEL the LDM UNet
names without the checkpoint prefix (``input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight``,
see ``ModelHandle.weight_shapes()``); for a CLIP Kiln's text-model names
(``blocks.0.attn.qkv.weight``; ``ClipHandle.file_key_map()`` translates checkpoint / transformers /
OpenCLIP names, including q, k and v, which Kiln stores fused, to a key and a slice ``offset``).

- subclass ``WeightPatch`` and implement ``delta(weight)`` (the change before strength, float32,
  the weight's shape) and ``token()`` (a stable identity for cache keys: the source file's content
  hash and the tensor names, not an object id); override ``apply`` for another combination rule.
  ``DiffPatch`` (add ``strength * delta``) is the generic one;
- ``handle.with_patches([...])`` returns a new handle (the original is untouched); keys and
  shapes are checked there (ModelError for a key the model does not have);
- patches of one key apply in list order, in float32 on the weight's device, starting from the
  original weight: ``w = w * strength_model + strength * delta`` each (ComfyUI's
  ``calculate_weight``), and the result is cast back to the weight's dtype once; ``offset``
  ``(dim, start, length)`` restricts a patch to ``weight.narrow(dim, start, length)``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from engine.errors import ModelError
from engine.models.clip_text import CLIPTextConfig, CLIPTextModel, Layout
from engine.models.latent_format import SD15, LatentFormat
from engine.models.unet import UNetConfig, UNetModel
from engine.models.vae import VAEConfig
from engine.sampling.model_sampling import ModelSampling

Part = Literal["unet", "clip", "vae", "upscale"]
Offset = tuple[int, int, int]  # (dim, start, length)


def _digest(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def tensor_digest(tensor: Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (for patch tokens of in-memory deltas)."""
    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ patches


@dataclass(frozen=True, eq=False)
class WeightPatch(ABC):
    """A change to one weight of a model (see the module docstring)."""

    key: str
    strength: float = 1.0
    strength_model: float = 1.0
    offset: Offset | None = None

    @abstractmethod
    def delta(self, weight: Tensor) -> Tensor:
        """The change to ``weight`` (float32, on its device, already narrowed to ``offset``) before
        strength, with the weight's shape."""

    @abstractmethod
    def token(self) -> str:
        """A stable identity of the change (content, not object id), for cache keys."""

    def apply(self, weight: Tensor) -> Tensor:
        """The patched weight (float32): ``weight * strength_model + strength * delta(weight)``."""
        if self.strength_model != 1.0:
            weight = weight * self.strength_model
        return weight + self.strength * self.delta(weight)

    def cache_token(self) -> str:
        return _digest(
            [type(self).__name__, self.key, self.strength, self.strength_model, self.offset, self.token()]
        )


@dataclass(frozen=True, eq=False)
class DiffPatch(WeightPatch):
    """Add ``strength * diff`` to the weight (ComfyUI's ``"diff"`` patch).

    ``source`` identifies where ``diff`` came from (``"<file sha256>:<tensor name>"``) for cache keys;
    without it the tensor's bytes are hashed once.
    """

    diff: Tensor = field(default_factory=lambda: torch.zeros(()))
    source: str | None = None

    def delta(self, weight: Tensor) -> Tensor:
        diff = self.diff.to(device=weight.device, dtype=torch.float32)
        if diff.shape != weight.shape:
            diff = diff.reshape(weight.shape)
        return diff

    def token(self) -> str:
        if self.source is not None:
            return self.source
        cached = self.__dict__.get("_token")
        if cached is None:
            cached = tensor_digest(self.diff)
            object.__setattr__(self, "_token", cached)
        return cached


def check_patches(
    patches: Iterable[WeightPatch], shapes: Mapping[str, tuple[int, ...]], what: str
) -> tuple[WeightPatch, ...]:
    """Validate keys, offsets and delta sizes against ``shapes``; return the patches as a tuple."""
    out = tuple(patches)
    for patch in out:
        if not isinstance(patch, WeightPatch):
            raise TypeError(f"not a WeightPatch: {patch!r}")
        shape = shapes.get(patch.key)
        if shape is None:
            raise ModelError(f"{what} has no weight {patch.key!r} to patch")
        if patch.offset is not None:
            dim, start, length = patch.offset
            if not (0 <= dim < len(shape) and start >= 0 and length > 0 and start + length <= shape[dim]):
                raise ModelError(f"patch offset {patch.offset} does not fit {patch.key} {tuple(shape)}")
            shape = (*shape[:dim], length, *shape[dim + 1 :])
        if isinstance(patch, DiffPatch) and patch.diff.numel() != _numel(shape):
            raise ModelError(
                f"patch for {patch.key} has {patch.diff.numel()} values, the weight {tuple(shape)} needs "
                f"{_numel(shape)}"
            )
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def patch_signature(patches: Iterable[WeightPatch]) -> str:
    """One string for a patch list (order matters)."""
    return _digest([p.cache_token() for p in patches])


# ------------------------------------------------------------------------------------------ sources


@dataclass(frozen=True)
class WeightsSource:
    """A part of one model file: ``path`` (where to read it), ``content_hash`` (what it is),
    ``part`` and the key ``prefix`` of that part in the file (``""`` for standalone files)."""

    path: Path
    content_hash: str
    part: Part
    prefix: str = ""

    @property
    def key(self) -> str:
        return f"{self.content_hash}:{self.part}:{self.prefix}"

    @property
    def file_name(self) -> str:
        return self.path.name


@functools.lru_cache(maxsize=16)
def _unet_shapes(config: UNetConfig) -> Mapping[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = UNetModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=16)
def _clip_shapes(config: CLIPTextConfig) -> Mapping[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = CLIPTextModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _sampling_token(ms: ModelSampling) -> str:
    return _digest([str(ms.parameterization), ms.sigma_data, tensor_digest(ms.sigmas)])


# ------------------------------------------------------------------------------------------ handles


@dataclass(frozen=True, eq=False)
class ModelHandle:
    """MODEL: a UNet's weights (by source), its config, sigma table, latent format and patches.

    ``weight_dtype``: None for the manager's precision, else a dtype name (``"float16"``...) the
    UNETLoader asked for.
    """

    source: WeightsSource
    config: UNetConfig
    model_sampling: ModelSampling
    latent_format: LatentFormat = SD15
    patches: tuple[WeightPatch, ...] = ()
    weight_dtype: str | None = None

    kind = "MODEL"

    def clone(self) -> ModelHandle:
        """A new handle on the same weights (handles are immutable: this is for ComfyUI parity)."""
        return dataclasses.replace(self)

    def weight_shapes(self) -> Mapping[str, tuple[int, ...]]:
        """Every patchable key of the UNet (LDM names, no ``model.diffusion_model.`` prefix)."""
        return _unet_shapes(self.config)

    def with_patches(self, patches: Iterable[WeightPatch]) -> ModelHandle:
        """A new handle with ``patches`` appended (checked against the UNet's keys and shapes)."""
        added = check_patches(patches, self.weight_shapes(), "the diffusion model")
        return dataclasses.replace(self, patches=self.patches + added)

    def with_model_sampling(self, model_sampling: ModelSampling) -> ModelHandle:
        return dataclasses.replace(self, model_sampling=model_sampling)

    def extra_conds(self, options: Mapping[str, Any], latent: Tensor) -> dict[str, Tensor]:
        """The model inputs a CONDITIONING entry adds besides the context (guidance's
        ``extra_conds``): none for SD1.x/SD2.x UNets, which ComfyUI also runs without
        ``pooled_output``. (Inpainting UNets, ``in_channels`` 9, would need the masked image as
        concat channels; not supported yet.)"""
        return {}

    @functools.cached_property
    def cache_key(self) -> str:
        return _digest(
            [
                self.kind,
                self.source.key,
                dataclasses.asdict(self.config),
                _sampling_token(self.model_sampling),
                dataclasses.asdict(self.latent_format),
                [p.cache_token() for p in self.patches],
                self.weight_dtype,
            ]
        )

    @property
    def patch_signature(self) -> str:
        return patch_signature(self.patches)

    def __repr__(self) -> str:
        return f"ModelHandle({self.source.file_name}, {len(self.patches)} patches)"


@dataclass(frozen=True, eq=False)
class ClipHandle:
    """CLIP: a text encoder's weights (by source), its config and file layout, clip skip, patches.

    ``layer_idx`` is CLIPSetLastLayer's value (None: the family's default: SD1 last layer, SD2
    penultimate).
    """

    source: WeightsSource
    config: CLIPTextConfig
    layout: Layout
    layer_idx: int | None = None
    patches: tuple[WeightPatch, ...] = ()

    kind = "CLIP"

    def clone(self) -> ClipHandle:
        return dataclasses.replace(self)

    def clip_layer(self, layer_idx: int) -> ClipHandle:
        """CLIPSetLastLayer: -1 last layer, -2 penultimate, ..."""
        return dataclasses.replace(self, layer_idx=layer_idx)

    def weight_shapes(self) -> Mapping[str, tuple[int, ...]]:
        """Every patchable key of the text model, in Kiln's layout (``blocks.N.attn.qkv.weight``)."""
        return _clip_shapes(self.config)

    def file_key_map(self) -> dict[str, tuple[str, Offset | None]]:
        """transformers (``text_model.encoder.layers.N.self_attn.q_proj.weight``) and OpenCLIP
        (``transformer.resblocks.N.attn.in_proj_weight``) weight names -> (Kiln key, slice offset)."""
        return text_model_key_map(self.config)

    def with_patches(self, patches: Iterable[WeightPatch]) -> ClipHandle:
        added = check_patches(patches, self.weight_shapes(), "the text encoder")
        return dataclasses.replace(self, patches=self.patches + added)

    @functools.cached_property
    def cache_key(self) -> str:
        return _digest(
            [
                self.kind,
                self.source.key,
                dataclasses.asdict(self.config),
                self.layout,
                self.layer_idx,
                [p.cache_token() for p in self.patches],
            ]
        )

    @property
    def patch_signature(self) -> str:
        return patch_signature(self.patches)

    def __repr__(self) -> str:
        return f"ClipHandle({self.source.file_name}, layer {self.layer_idx}, {len(self.patches)} patches)"


@dataclass(frozen=True, eq=False)
class VAEHandle:
    """VAE: an autoencoder's weights (by source) and its config."""

    source: WeightsSource
    config: VAEConfig

    kind = "VAE"
    patches: tuple[WeightPatch, ...] = ()

    @property
    def downscale_ratio(self) -> int:
        return self.config.downscale_ratio

    @functools.cached_property
    def cache_key(self) -> str:
        return _digest([self.kind, self.source.key, dataclasses.asdict(self.config)])

    @property
    def patch_signature(self) -> str:
        return patch_signature(self.patches)

    def __repr__(self) -> str:
        return f"VAEHandle({self.source.file_name})"


Handle = ModelHandle | ClipHandle | VAEHandle


def text_model_key_map(config: CLIPTextConfig) -> dict[str, tuple[str, Offset | None]]:
    """Weight names of the transformers and OpenCLIP text-model layouts -> (Kiln key, offset).

    transformers' separate q/k/v projections map to slices of Kiln's fused ``attn.qkv`` (dim 0,
    ``width`` rows each); OpenCLIP's ``in_proj`` is the fused tensor itself. Biases and norms are
    included; the text projection is not (OpenCLIP stores it transposed).
    """
    width = config.width
    out: dict[str, tuple[str, Offset | None]] = {}
    hf = "text_model."
    for i in range(config.layers):
        src, oc, dst = f"{hf}encoder.layers.{i}.", f"transformer.resblocks.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            for j, name in enumerate(("q", "k", "v")):
                out[f"{src}self_attn.{name}_proj.{kind}"] = (f"{dst}attn.qkv.{kind}", (0, j * width, width))
            out[f"{oc}attn.in_proj_{kind}"] = (f"{dst}attn.qkv.{kind}", None)
            for hf_name, oc_name, kiln in (
                ("self_attn.out_proj", "attn.out_proj", "attn.proj"),
                ("layer_norm1", "ln_1", "ln_1"),
                ("layer_norm2", "ln_2", "ln_2"),
                ("mlp.fc1", "mlp.c_fc", "mlp.fc"),
                ("mlp.fc2", "mlp.c_proj", "mlp.proj"),
            ):
                out[f"{src}{hf_name}.{kind}"] = (f"{dst}{kiln}.{kind}", None)
                out[f"{oc}{oc_name}.{kind}"] = (f"{dst}{kiln}.{kind}", None)
    for kind in ("weight", "bias"):
        out[f"{hf}final_layer_norm.{kind}"] = (f"final_norm.{kind}", None)
        out[f"ln_final.{kind}"] = (f"final_norm.{kind}", None)
    out[f"{hf}embeddings.token_embedding.weight"] = ("token_embedding.weight", None)
    out["token_embedding.weight"] = ("token_embedding.weight", None)
    out[f"{hf}embeddings.position_embedding.weight"] = ("position_embedding", None)
    out["positional_embedding"] = ("position_embedding", None)
    return out

"""Prompt text -> conditioning for SD1.x / SD2.x, with ComfyUI's chunking and weighting.

Follows ``SDTokenizer.tokenize_with_weights`` and ``ClipTokenWeightEncoder.encode_token_weights``
(``comfy/sd1_clip.py``) and ``CLIP.encode_from_tokens`` (``comfy/sd.py``):

1. Parse ``(text:w)`` weights (:mod:`engine.models.prompt_weights`). Each weighted segment is
   tokenized *as a whole* (only ``embedding:name`` words are cut out); a textual-inversion
   embedding contributes one entry per vector.
2. Fill 77-token chunks ``[start, up to 75 entries, end, pad...]``. A segment (or embedding) of
   fewer than 8 entries that does not fit in the current chunk moves whole to the next chunk; one
   of 8 or more is cut at the chunk edge, mid-word if need be. Start/end/pad entries have weight 1.
   SD1 pads with the end token 49407, SD2 with 0.
3. Encode all chunks in one batch. When any weight differs from 1, an "empty" sequence
   ``[start, end, pad...]`` is encoded with them and every entry with weight w != 1 becomes
   ``z_empty + (z - z_empty) * w`` at its position. Chunks are concatenated along the token axis:
   ``cond`` is [1, 77 * k, C]. ``pooled`` comes from the first chunk only.
4. The layer: ``layer_idx`` (CLIPSetLastLayer) or the flavour's default (SD1: last, SD2: -2).
   ``|layer_idx| > number of layers`` means the last layer. A non-last layer gets the final
   LayerNorm (``layer_norm_hidden_state=True`` for both SD1 and SD2). ``pooled`` is always taken
   from the last layer: unprojected for SD1, through ``text_projection`` for SD2.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor

from engine.errors import ModelError, UnsafePathError
from engine.models.clip_text import Activation, CLIPTextModel, detect_layout
from engine.models.prompt_weights import (
    EMBEDDING_PREFIX,
    parse_prompt_weights,
    resolve_embedding_word,
    split_embedding_words,
)
from engine.models.tokenizer import CLIPTokenizer
from engine.paths import safe_relative

logger = logging.getLogger(__name__)

Token = int | Tensor  # a vocabulary id, or one textual-inversion vector [C]
WeightedChunk = list[tuple[Token, float]]  # 77 (token, weight) entries
EmbeddingResolver = Callable[[str], Tensor | None]  # name -> vectors [N, C] (or [C]) or None


@dataclass(frozen=True)
class ClipFlavor:
    """How one family's text encoder is driven (special tokens, padding, default layer)."""

    name: str
    start_token: int = 49406
    end_token: int = 49407
    pad_token: int = 49407
    max_length: int = 77
    max_word_length: int = 8  # groups this long or longer may be cut at a chunk edge
    default_layer: int | None = None  # None: last layer
    normalize_hidden: bool = True  # final LayerNorm on a non-last layer
    projected_pooled: bool = False
    embedding_key: str = "clip_l"  # tensor picked from multi-encoder embedding files


SD1 = ClipFlavor("sd1")
SD2 = ClipFlavor("sd2", pad_token=0, default_layer=-2, projected_pooled=True)


# ------------------------------------------------------------------------------- tokenizing


def tokenize_with_weights(
    text: str,
    tokenizer: CLIPTokenizer,
    flavor: ClipFlavor = SD1,
    embeddings: EmbeddingResolver | None = None,
) -> list[WeightedChunk]:
    """ComfyUI's ``tokenize_with_weights``: a prompt -> chunks of ``max_length`` (token, weight).

    Without ``embeddings``, ``embedding:name`` is ordinary text (as ComfyUI without an
    embeddings folder). An embedding [N, C] gives N entries, [C] one; tensors of more dimensions
    are read as rows of C (ComfyUI would insert such a row block as one entry and then fail).
    """
    groups: list[list[tuple[Token, float]]] = []
    for segment, weight in parse_prompt_weights(text):
        for word in split_embedding_words(segment):
            if word.startswith(EMBEDDING_PREFIX) and embeddings is not None:
                vectors, leftover = resolve_embedding_word(word, embeddings)
                if vectors is None or vectors.ndim == 0:
                    logger.warning("embedding %r does not exist, ignoring", word[len(EMBEDDING_PREFIX) :])
                else:
                    rows = [vectors] if vectors.ndim == 1 else list(vectors.reshape(-1, vectors.shape[-1]))
                    groups.append([(row, weight) for row in rows])
                if leftover == "":
                    continue
                word = leftover
            groups.append([(t, weight) for t in tokenizer.encode(word)])
    return _chunk(groups, flavor)


def _chunk(groups: list[list[tuple[Token, float]]], flavor: ClipFlavor) -> list[WeightedChunk]:
    start, end, pad = (flavor.start_token, 1.0), (flavor.end_token, 1.0), (flavor.pad_token, 1.0)
    room = flavor.max_length - 1  # the end token always gets a place
    chunk: WeightedChunk = [start]
    chunks = [chunk]
    for group in groups:
        splittable = len(group) >= flavor.max_word_length
        while group:
            if len(chunk) + len(group) <= room:
                chunk.extend(group)
                break
            remaining = room - len(chunk)
            if splittable:
                chunk.extend(group[:remaining])
                chunk.append(end)
                group = group[remaining:]
            else:
                chunk.append(end)
                chunk.extend([pad] * remaining)
            chunk = [start]
            chunks.append(chunk)
    chunk.append(end)
    chunk.extend([pad] * (flavor.max_length - len(chunk)))
    return chunks


# -------------------------------------------------------------------------------- encoding


def resolve_layer(layer_idx: int | None, flavor: ClipFlavor, num_layers: int) -> int | None:
    """The block whose output is the conditioning (None: last layer, final LN as usual).

    ``layer_idx`` is CLIPSetLastLayer's ``stop_at_clip_layer`` (-1 last, -2 penultimate, ...) or
    None for the flavour's default. As ComfyUI, any index with ``abs(idx) > num_layers`` (for
    example -13 on SD1's 12 layers) falls back to the last layer.
    """
    idx = flavor.default_layer if layer_idx is None else layer_idx
    if idx is None or abs(idx) > num_layers or idx >= num_layers:
        return None
    return idx


def empty_tokens(flavor: ClipFlavor, length: int) -> list[int]:
    """ComfyUI's ``gen_empty_tokens``: ``[start, end, pad, pad, ...]`` of ``length``."""
    out = [flavor.start_token, flavor.end_token]
    return out + [flavor.pad_token] * (length - len(out))


def _embed_chunk(model: CLIPTextModel, chunk: Sequence[Token], flavor: ClipFlavor) -> tuple[Tensor, int]:
    """Token embeddings [T, C] of one chunk, and the position to pool at (first end token).

    Embedding vectors whose width is not the model's are dropped and the chunk is padded at the
    end with pad tokens instead (ComfyUI warns and does the same).
    """
    width = model.config.width
    kept: list[Token] = []
    dropped = 0
    for token in chunk:
        if isinstance(token, Tensor) and token.shape[-1] != width:
            logger.warning(
                "embedding vector of width %d does not fit a %d-wide model, ignored", token.shape[-1], width
            )
            dropped += 1
        else:
            kept.append(token)
    kept.extend([flavor.pad_token] * dropped)

    ids = torch.tensor([t if isinstance(t, int) else 0 for t in kept], dtype=torch.long, device=model.device)
    x = model.embed_tokens(ids)  # [T, C]
    vector_at = [i for i, t in enumerate(kept) if isinstance(t, Tensor)]
    if vector_at:
        x = x.clone()
        vectors = torch.stack([t for t in kept if isinstance(t, Tensor)])
        x[vector_at] = vectors.to(device=x.device, dtype=x.dtype)
    eos = next((i for i, t in enumerate(kept) if isinstance(t, int) and t == flavor.end_token), len(kept) - 1)
    return x, eos


@torch.no_grad()
def encode_token_weights(
    model: CLIPTextModel,
    chunks: Sequence[WeightedChunk],
    flavor: ClipFlavor = SD1,
    layer_idx: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """ComfyUI's ``encode_token_weights``: chunks -> (cond [1, 77k, C], pooled [1, P] or None).

    Both are float32 on the model's device.
    """
    sections = len(chunks)
    has_weights = any(w != 1.0 for chunk in chunks for _, w in chunk)
    sequences: list[Sequence[Token]] = [[t for t, _ in chunk] for chunk in chunks]
    if has_weights or sections == 0:
        longest = max((len(s) for s in sequences), default=flavor.max_length)
        sequences.append(empty_tokens(flavor, longest))

    embedded = [_embed_chunk(model, seq, flavor) for seq in sequences]
    embeds = torch.stack([x for x, _ in embedded])  # [B, T, C]
    eos_index = torch.tensor([e for _, e in embedded], device=embeds.device)
    hidden_layer = resolve_layer(layer_idx, flavor, len(model.blocks))
    out = model(
        embeds=embeds,
        eos_index=eos_index,
        hidden_layer=hidden_layer,
        normalize_hidden=flavor.normalize_hidden,
    )
    z = out.last_hidden_state if out.hidden_state is None else out.hidden_state
    z = z.float()
    pooled = out.projected if flavor.projected_pooled else out.pooled
    first_pooled = None if pooled is None else pooled[0:1].float()

    if sections == 0:
        return z[-1:], first_pooled
    cond = z[:sections]  # [k, T, C]
    if has_weights:
        weights = torch.tensor(
            [[w for _, w in chunk] for chunk in chunks], dtype=torch.float32, device=cond.device
        ).unsqueeze(-1)  # [k, T, 1]
        z_empty = z[-1]  # [T, C]
        weighted = (cond - z_empty) * weights + z_empty
        cond = torch.where(weights != 1.0, weighted, cond)
    return cond.reshape(1, -1, cond.shape[-1]), first_pooled


def encode(
    text: str,
    tokenizer: CLIPTokenizer,
    model: CLIPTextModel,
    flavor: ClipFlavor = SD1,
    layer_idx: int | None = None,
    embeddings: EmbeddingResolver | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Prompt -> (cond [1, 77k, C], pooled [1, P] or None); ``layer_idx`` is the clip skip."""
    chunks = tokenize_with_weights(text, tokenizer, flavor, embeddings)
    return encode_token_weights(model, chunks, flavor, layer_idx)


# --------------------------------------------------------------------------- the CLIP object


@dataclass(frozen=True)
class TextEncoder:
    """What ComfyUI's CLIP socket carries for SD1/SD2: model, tokenizer, flavour, clip skip.

    Immutable: ``clip_layer`` (CLIPSetLastLayer) returns a copy sharing the model.
    """

    model: CLIPTextModel
    tokenizer: CLIPTokenizer
    flavor: ClipFlavor = SD1
    layer_idx: int | None = None
    embeddings: EmbeddingResolver | None = None

    def clip_layer(self, layer_idx: int) -> TextEncoder:
        """CLIPSetLastLayer: -1 = last layer, -2 = penultimate, ..."""
        return replace(self, layer_idx=layer_idx)

    def tokenize(self, text: str) -> list[WeightedChunk]:
        return tokenize_with_weights(text, self.tokenizer, self.flavor, self.embeddings)

    def encode_from_tokens(self, chunks: Sequence[WeightedChunk]) -> tuple[Tensor, Tensor | None]:
        return encode_token_weights(self.model, chunks, self.flavor, self.layer_idx)

    def encode(self, text: str) -> tuple[Tensor, Tensor | None]:
        """CLIPTextEncode: (cond [1, 77k, C], pooled) for the conditioning's ``pooled_output``."""
        return self.encode_from_tokens(self.tokenize(text))


def load_text_encoder(
    sd: Mapping[str, Tensor],
    prefix: str = "cond_stage_model.",
    *,
    tokenizer: CLIPTokenizer,
    embeddings: EmbeddingResolver | None = None,
    flavor: ClipFlavor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    activation: Activation | None = None,
) -> TextEncoder:
    """Checkpoint state dict -> :class:`TextEncoder` (the checkpoint loader's entry point).

    ``prefix`` is where the checkpoint keeps its text encoder (``cond_stage_model.`` for SD1/SD2
    single files); SD1 vs SD2 is inferred from the key layout unless ``flavor`` is given.
    ``dtype`` defaults to float32 whatever the file holds: ComfyUI feeds its CLIP float32
    embeddings and its ``manual_cast`` layers cast fp16/bf16 weights up to the input's dtype, so
    the text encoder computes in float32 (fp16 would change the conditioning slightly).
    """
    layout, _ = detect_layout(sd, prefix)
    model = CLIPTextModel.from_state_dict(sd, prefix, dtype=dtype, device=device, activation=activation)
    if flavor is None:
        flavor = SD2 if layout == "sd2" or model.config.width == 1024 else SD1
    return TextEncoder(model, tokenizer, flavor, embeddings=embeddings)


# ------------------------------------------------------------------------ embeddings folder


def select_embedding(tensors: Mapping[str, Tensor], embedding_key: str = "clip_l") -> Tensor | None:
    """Pick the vectors out of a safetensors embedding file, in ComfyUI's ``load_embed`` order.

    1. the tensor named ``embedding_key`` (``clip_l`` for SD1 and SD2: files made for SDXL carry
       ``clip_l`` and ``clip_g``);
    2. LoRA-bundled embeddings: every ``bundle_emb.*.string_to_param.*`` tensor, concatenated;
    3. every ``bundle_emb.*.<embedding_key>`` tensor, concatenated;
    4. otherwise the first tensor in key order: A1111's ``emb_params`` [N, C], a flattened
       ``string_to_param.*``, or any single-tensor file (SD2's [N, 1024] included).
    """
    if embedding_key in tensors:
        return tensors[embedding_key]
    for suffix in (".string_to_param.*", f".{embedding_key}"):
        bundled = [v for k, v in tensors.items() if k.startswith("bundle_emb.") and k.endswith(suffix)]
        if bundled:
            return torch.cat(bundled, dim=0)
    return next(iter(tensors.values()), None)


class EmbeddingFolder:
    """``embedding:NAME`` lookup in folders, as ComfyUI's ``load_embed`` (safetensors only).

    Tries each folder, then its sub-folders (sorted), for ``NAME`` and ``NAME.safetensors``.
    Names that would leave the folder find nothing. A ``.pt``/``.bin``/``.ckpt`` match (ComfyUI
    would unpickle it) raises :class:`ModelError`: Kiln never loads pickles.
    """

    def __init__(self, folders: Sequence[str | Path], embedding_key: str = "clip_l") -> None:
        self.folders = [Path(f) for f in folders]
        self.embedding_key = embedding_key

    def _search_dirs(self) -> list[Path]:
        dirs: list[Path] = []
        seen: set[str] = set()
        for root in self.folders:
            for current, subdirs, _ in os.walk(root, followlinks=True):
                real = os.path.realpath(current)
                if real in seen:  # a symlink loop, or a folder reached twice
                    subdirs[:] = []
                    continue
                seen.add(real)
                subdirs.sort()
                dirs.append(Path(current))
        return dirs

    def find(self, name: str) -> Path | None:
        """The file ``name`` refers to, or None."""
        try:
            relative = safe_relative(name)
        except UnsafePathError:
            return None
        if not relative:
            return None
        for folder in self._search_dirs():
            base = folder / relative
            for candidate in (
                base,
                *(base.with_name(base.name + ext) for ext in (".safetensors", ".pt", ".bin")),
            ):
                if candidate.is_file():
                    return candidate
        return None

    def __call__(self, name: str) -> Tensor | None:
        path = self.find(name)
        if path is None:
            return None
        if path.suffix.lower() != ".safetensors":
            raise ModelError(
                f"embedding {name!r} is {path.name}, not a .safetensors file; Kiln does not load pickles"
            )
        try:
            tensors = safetensors.torch.load_file(str(path), device="cpu")
        except Exception as exc:  # a corrupt file: ComfyUI logs and skips it
            logger.warning("error loading embedding %r, skipping: %s", name, exc)
            return None
        return select_embedding(tensors, self.embedding_key)

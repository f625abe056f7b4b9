"""LoRA-family weight patches: the update each adapter (LoRA / LoCon, LoHa, LoKr, DoRA) makes to a weight.

Math (ComfyUI's ``weight_adapter`` ``calculate_weight``), in float32 on the weight's device, per patch:
``W' = W * strength_model + (strength * scale) * diff`` with ``scale = alpha / rank`` (1 without alpha):

- LoRA: ``diff = up.flatten(1) @ down.flatten(1)`` reshaped to W; rank = ``down.shape[0]``; a LoCon
  ``mid`` (CP decomposition of a conv) folds into ``down`` first;
- LoHa: ``diff = (w1_a @ w1_b) * (w2_a @ w2_b)`` (Tucker: ``einsum("ijkl,jr,ip->prkl", t, w_b, w_a)``);
  rank = ``w1_b.shape[0]``;
- LoKr: ``diff = kron(w1, w2)`` (each given whole or as ``a @ b``, ``w2`` possibly Tucker); rank =
  ``w2_b.shape[0]`` if w2 is factored, else ``w1_b.shape[0]`` if w1 is, else no scaling;
- DoRA (``dora_scale``): ``W + scale * diff`` renormalised to ``dora_scale`` along the axis it names,
  then blended in by ``strength``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from engine.errors import ModelError
from engine.models.handles import WeightPatch, tensor_digest

Cast = Callable[[Tensor], Tensor]


def _cast_to(weight: Tensor) -> Cast:
    return lambda t: t.to(device=weight.device, dtype=torch.float32)


def _to_meta(t: Tensor) -> Tensor:
    return t.to(device="meta", dtype=torch.float32)


def _tucker(t: Tensor, w_b: Tensor, w_a: Tensor) -> Tensor:
    # t [i, j, k, l], w_b [j, r], w_a [i, p] -> [p, r, k, l]
    return torch.einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)


@dataclass(frozen=True, eq=False)
class AdapterPatch(WeightPatch):
    """A LyCORIS-family update: ``strength * scale * diff``, or DoRA's renormalised weight.

    ``source`` (``"<file sha256>:<module>"``) is the patch's identity in cache keys; without it the
    tensors' bytes are hashed once.
    """

    alpha: float | None = None
    dora_scale: Tensor | None = None
    source: str = ""

    @property
    @abstractmethod
    def rank(self) -> int | None:
        """The divisor of ``alpha`` (None: the update is not scaled)."""

    @abstractmethod
    def product(self, cast: Cast) -> Tensor:
        """The unscaled update from the patch's tensors, each passed through ``cast`` first."""

    @property
    def scale(self) -> float:
        rank = self.rank
        return self.alpha / rank if self.alpha is not None and rank else 1.0

    def diff(self, weight: Tensor) -> Tensor:
        """The unscaled update in float32 on ``weight``'s device, with ``weight``'s shape."""
        return self.product(_cast_to(weight)).reshape(weight.shape)

    def diff_numel(self) -> int:
        """How many values the update has (computed on the meta device: no arithmetic)."""
        return self.product(_to_meta).numel()

    def apply(self, weight: Tensor) -> Tensor:
        if self.strength_model != 1.0:
            weight = weight * self.strength_model
        diff = self.diff(weight)
        if self.dora_scale is None:
            # (strength * scale) first, as ComfyUI multiplies: same float32 rounding.
            return weight + (self.strength * self.scale) * diff
        return self._decompose(weight, diff, self.strength)

    def delta(self, weight: Tensor) -> Tensor:
        diff = self.diff(weight)
        if self.dora_scale is None:
            return self.scale * diff
        return self._decompose(weight, diff, 1.0) - weight

    def _decompose(self, weight: Tensor, diff: Tensor, strength: float) -> Tensor:
        """DoRA (ComfyUI's ``weight_decompose``): the updated weight rescaled to ``dora_scale``, whose
        first dimension says the axis (output rows, else input columns)."""
        assert self.dora_scale is not None
        magnitude = self.dora_scale.to(device=weight.device, dtype=torch.float32)
        updated = weight + diff * self.scale
        ones = [1] * (weight.dim() - 1)
        if magnitude.shape[0] == updated.shape[0]:
            # ComfyUI takes this norm from the weight before the update.
            norm = (
                weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(weight.shape[0], *ones)
            )
        else:
            cols = updated.shape[1]
            norm = updated.transpose(0, 1).reshape(cols, -1).norm(dim=1, keepdim=True)
            norm = norm.reshape(cols, *ones).transpose(0, 1)
        updated = updated * (magnitude / (norm + torch.finfo(torch.float32).eps))
        if strength != 1.0:
            return weight + strength * (updated - weight)
        return updated

    def token(self) -> str:
        if self.source:
            return self.source
        cached = self.__dict__.get("_token")
        if cached is None:  # built in memory: identify by content
            tensors = [(f.name, v) for f in fields(self) if isinstance(v := getattr(self, f.name), Tensor)]
            cached = ",".join(f"{name}={tensor_digest(t)}" for name, t in tensors) + f";alpha={self.alpha}"
            object.__setattr__(self, "_token", cached)
        return cached


@dataclass(frozen=True, eq=False)
class LoRAPatch(AdapterPatch):
    """LoRA / LoCon: ``up @ down`` (``mid``: LoCon's CP-decomposed conv core)."""

    up: Tensor | None = None
    down: Tensor | None = None
    mid: Tensor | None = None

    def __post_init__(self) -> None:
        if self.up is None or self.down is None:
            raise ModelError("a LoRA module needs both an up and a down tensor")

    @property
    def rank(self) -> int:
        assert self.down is not None
        return self.down.shape[0]

    def product(self, cast: Cast) -> Tensor:
        assert self.up is not None and self.down is not None
        up, down = cast(self.up), cast(self.down)
        if self.mid is not None:
            mid = cast(self.mid)
            shape = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
            down = torch.mm(down.transpose(0, 1).flatten(1), mid.transpose(0, 1).flatten(1))
            down = down.reshape(shape).transpose(0, 1)
        return torch.mm(up.flatten(1), down.flatten(1))


@dataclass(frozen=True, eq=False)
class LoHaPatch(AdapterPatch):
    """LyCORIS LoHa: the Hadamard product of two low-rank products (optionally Tucker-factored)."""

    w1_a: Tensor | None = None
    w1_b: Tensor | None = None
    w2_a: Tensor | None = None
    w2_b: Tensor | None = None
    t1: Tensor | None = None
    t2: Tensor | None = None

    def __post_init__(self) -> None:
        if any(t is None for t in (self.w1_a, self.w1_b, self.w2_a, self.w2_b)):
            raise ModelError("a LoHa module needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b")
        if (self.t1 is None) != (self.t2 is None):
            raise ModelError("a LoHa module needs both hada_t1 and hada_t2, or neither")

    @property
    def rank(self) -> int:
        assert self.w1_b is not None
        return self.w1_b.shape[0]

    def product(self, cast: Cast) -> Tensor:
        assert self.w1_a is not None and self.w1_b is not None
        assert self.w2_a is not None and self.w2_b is not None
        w1_a, w1_b, w2_a, w2_b = cast(self.w1_a), cast(self.w1_b), cast(self.w2_a), cast(self.w2_b)
        if self.t1 is not None and self.t2 is not None:
            return _tucker(cast(self.t1), w1_b, w1_a) * _tucker(cast(self.t2), w2_b, w2_a)
        return torch.mm(w1_a, w1_b) * torch.mm(w2_a, w2_b)


@dataclass(frozen=True, eq=False)
class LoKrPatch(AdapterPatch):
    """LyCORIS LoKr: the Kronecker product of ``w1`` and ``w2``, each whole or low-rank."""

    w1: Tensor | None = None
    w2: Tensor | None = None
    w1_a: Tensor | None = None
    w1_b: Tensor | None = None
    w2_a: Tensor | None = None
    w2_b: Tensor | None = None
    t2: Tensor | None = None

    def __post_init__(self) -> None:
        if self.w1 is None and (self.w1_a is None or self.w1_b is None):
            raise ModelError("a LoKr module needs lokr_w1, or lokr_w1_a and lokr_w1_b")
        if self.w2 is None and (self.w2_a is None or self.w2_b is None):
            raise ModelError("a LoKr module needs lokr_w2, or lokr_w2_a and lokr_w2_b")

    @property
    def rank(self) -> int | None:
        if self.w2 is None and self.w2_b is not None:
            return self.w2_b.shape[0]
        if self.w1 is None and self.w1_b is not None:
            return self.w1_b.shape[0]
        return None

    def product(self, cast: Cast) -> Tensor:
        if self.w1 is not None:
            w1 = cast(self.w1)
        else:
            assert self.w1_a is not None and self.w1_b is not None
            w1 = torch.mm(cast(self.w1_a), cast(self.w1_b))
        if self.w2 is not None:
            w2 = cast(self.w2)
        else:
            assert self.w2_a is not None and self.w2_b is not None
            w2_a, w2_b = cast(self.w2_a), cast(self.w2_b)
            w2 = torch.mm(w2_a, w2_b) if self.t2 is None else _tucker(cast(self.t2), w2_b, w2_a)
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        return torch.kron(w1, w2)

"""Classifier-free guidance over ComfyUI CONDITIONING, and the inpainting (latent noise mask) wrapper.

CONDITIONING is a list of ``[context, options]`` pairs: ``context`` the text encoder's hidden states
[1, tokens, features], ``options`` a dict. The keys read here (ComfyUI's names):

- ``"area"``: ``(h, w, y, x)`` in latent units, or ``("percentage", h, w, y, x)`` as fractions;
- ``"strength"``: weight of the entry (default 1);
- ``"mask"``: [B, H, W] or [H, W] weights, resized bilinearly to the latent; ``"mask_strength"``;
- ``"set_area_to_bounds"``: crop the entry to the mask's bounding box;
- ``"start_percent"`` / ``"end_percent"``: the part of the schedule the entry is active in;
- anything the model needs besides the context (``"pooled_output"`` ...) goes through ``extra_conds``.

Each step runs every active entry of the positive and negative lists on its (cropped) latent, batching
entries that can share one model call, and averages the predictions per latent element weighted by
area feathering, mask and strength: ComfyUI's ``calc_cond_batch``. Then
``uncond + (cond - uncond) * cfg``; at cfg 1 the negative pass is skipped.

The model function keeps the UNet out of this module:
``model(x [N, C, H, W], sigma [N], context [N, tokens, features] | None, extra {name: [N, ...]})``
returns the denoised prediction (``engine.sampling.model_sampling.Denoiser`` is one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.sampling.common import DenoiserFn, denoise_with_uncond
from engine.sampling.model_sampling import ModelSampling

Conditioning = Sequence[Sequence[Any]]  # [[context, options], ...]

# ComfyUI pads cross-attention contexts of different lengths by repetition up to their lcm,
# but not beyond this factor.
_MAX_CONTEXT_REPEAT = 4
# Initial weight total: keeps the division finite where no entry contributes.
_COUNT_EPS = 1e-37
# Width, in latent pixels, of the linear ramp at area borders that are not on the latent's edge.
_AREA_FUZZ = 8


class ModelFunction(Protocol):
    """The batched model call guidance makes (see the module docstring)."""

    def __call__(
        self, x: Tensor, sigma: Tensor, context: Tensor | None, extra: Mapping[str, Tensor]
    ) -> Tensor: ...


ExtraCondsFn = Callable[[Mapping[str, Any], Tensor], dict[str, Tensor]]


def pooled_output_extra(options: Mapping[str, Any], latent: Tensor) -> dict[str, Tensor]:
    """Default extra_conds: pass ``pooled_output`` through when present.

    Model wrappers that need more (SDXL's ``y`` from pooled output and sizes, an inpainting model's
    concat channels) supply their own function of the options and the noise latent.
    """
    pooled = options.get("pooled_output")
    return {} if pooled is None else {"pooled_output": pooled}


def repeat_to_batch_size(t: Tensor, batch_size: int) -> Tensor:
    """Repeat (or cut) along dim 0 to exactly batch_size rows."""
    if t.shape[0] > batch_size:
        return t[:batch_size]
    if t.shape[0] < batch_size:
        reps = math.ceil(batch_size / t.shape[0])
        return t.repeat(reps, *([1] * (t.ndim - 1)))[:batch_size]
    return t


@dataclass(frozen=True, eq=False)
class CondEntry:
    """One conditioning entry, resolved against a latent shape."""

    context: Tensor | None
    extra: Mapping[str, Tensor]
    area: tuple[int, ...] | None  # (sizes..., offsets...) in latent units: (h, w, y, x) for images
    strength: float = 1.0
    mask: Tensor | None = None  # [B, H, W] at latent resolution
    mask_strength: float = 1.0
    sigma_start: float | None = None  # inactive while sigma > sigma_start
    sigma_end: float | None = None  # inactive while sigma < sigma_end


@dataclass(frozen=True, eq=False)
class _Run:
    """An entry prepared for one step: its input crop, weights and model inputs."""

    index: int  # which conditioning list (0 positive, 1 negative)
    input_x: Tensor
    mult: Tensor
    area: list[int] | None
    context: Tensor | None
    extra: dict[str, Tensor]


# -- resolving CONDITIONING against a latent ------------------------------------------------------


def _mask_bounds(mask: Tensor) -> tuple[int, int, int, int] | None:
    """(H, W, Y, X) bounding box of the non-zero mask entries over the batch, None if all zero."""
    bounds = torch.max(torch.abs(mask), dim=0).values
    ys, xs = torch.where(bounds != 0)
    if ys.numel() == 0:
        return None
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
    return y1 - y0 + 1, x1 - x0 + 1, y0, x0


def _resolve_area(area: Sequence[Any] | None, dims: Sequence[int]) -> tuple[int, ...] | None:
    if area is None:
        return None
    if area[0] == "percentage":
        fractions = area[1:]
        n = len(fractions) // 2
        sizes = tuple(max(1, round(fractions[d] * dims[d])) for d in range(len(dims)))
        offsets = tuple(round(fractions[d + n] * dims[d]) for d in range(len(dims)))
        return sizes + offsets
    return tuple(int(v) for v in area)


def resolve_conditioning(
    conditioning: Conditioning, latent: Tensor, model_sampling: ModelSampling, extra_conds: ExtraCondsFn
) -> list[CondEntry]:
    """Areas to latent units, masks to the latent size, percents to sigmas, extra model inputs."""
    dims = tuple(latent.shape[2:])
    entries = []
    for item in conditioning:
        context, options = item[0], item[1]
        area = _resolve_area(options.get("area"), dims)
        mask = options.get("mask")
        if mask is not None:
            mask = mask.to(device=latent.device, dtype=torch.float32)
            if mask.ndim == len(dims):
                mask = mask.unsqueeze(0)
            if tuple(mask.shape[1:]) != dims:
                mask = F.interpolate(mask.unsqueeze(1), size=dims, mode="bilinear").squeeze(1)
            if options.get("set_area_to_bounds", False):
                box = _mask_bounds(mask)
                # An all-zero mask makes the entry a no-op: use the smallest area.
                area = (8, 8, 0, 0) if box is None else (max(8, box[0]), max(8, box[1]), box[2], box[3])
        start = options.get("start_percent")
        end = options.get("end_percent")
        entries.append(
            CondEntry(
                context=context,
                extra=extra_conds(options, latent),
                area=area,
                strength=float(options.get("strength", 1.0)),
                mask=mask,
                mask_strength=float(options.get("mask_strength", 1.0)),
                sigma_start=None if start is None else model_sampling.percent_to_sigma(float(start)),
                sigma_end=None if end is None else model_sampling.percent_to_sigma(float(end)),
            )
        )
    return entries


def _area_inside(inner: tuple[int, ...], outer: tuple[int, ...]) -> bool:
    n = len(inner) // 2
    for i in range(n):
        if inner[n + i] < outer[n + i] or inner[i] + inner[n + i] > outer[i] + outer[n + i]:
            return False
    return True


def _add_matching_area(entries: list[CondEntry], c: CondEntry) -> None:
    """Give ``entries`` an entry over c's area, with the model inputs of the smallest entry covering it.

    Without it an area prompt would have no opposite over its area, and guidance there would mix
    area-weighted predictions with full-frame ones (ComfyUI's create_cond_with_same_area_if_none).
    """
    if c.area is None:
        return
    smallest: CondEntry | None = None
    for e in entries:
        if e.area is not None:
            if _area_inside(c.area, e.area) and (
                smallest is None
                or smallest.area is None
                or math.prod(smallest.area[: len(smallest.area) // 2]) > math.prod(e.area[: len(e.area) // 2])
            ):
                smallest = e
        elif smallest is None:
            smallest = e
    if smallest is None or (smallest.area is not None and smallest.area == c.area):
        return
    entries.append(replace(c, context=smallest.context, extra=smallest.extra))


def pair_areas(lists: Sequence[list[CondEntry]]) -> None:
    """For every area entry of each list, add a same-area entry to every other list (in place)."""
    for k, entries in enumerate(lists):
        for c in entries:
            for kk, other in enumerate(lists):
                if kk != k:
                    _add_matching_area(other, c)


# -- one guided model evaluation ----------------------------------------------------------------------


def _prepare_run(index: int, e: CondEntry, x: Tensor, sigma: Tensor) -> _Run | None:
    """Crop, weights and model inputs of an entry for this step; None when it is inactive."""
    s0 = float(sigma[0])
    if e.sigma_start is not None and s0 > e.sigma_start:
        return None
    if e.sigma_end is not None and s0 < e.sigma_end:
        return None
    n = x.ndim - 2
    input_x = x
    area: list[int] | None = None
    if e.area is not None:
        area = list(e.area)
        for i in range(n):
            area[i] = min(x.shape[i + 2] - area[n + i], area[i])
            input_x = input_x.narrow(i + 2, area[n + i], area[i])
    if e.mask is not None:
        mask = e.mask[: input_x.shape[0]]
        if area is not None:
            for i in range(n):
                mask = mask.narrow(i + 1, area[n + i], area[i])
        mask = mask * e.mask_strength
        mask = mask.unsqueeze(1).repeat(
            (input_x.shape[0] // mask.shape[0], input_x.shape[1]) + (1,) * (mask.ndim - 1)
        )
    else:
        mask = torch.ones_like(input_x)
    mult = mask * e.strength
    if e.mask is None and area is not None:
        # Feather inner borders so overlapping areas blend.
        for i in range(n):
            rr = min(_AREA_FUZZ, mult.shape[2 + i] // 4)
            if area[n + i] != 0:
                for t in range(rr):
                    mult.narrow(i + 2, t, 1).mul_((1.0 / rr) * (t + 1))
            if area[i] + area[n + i] < x.shape[i + 2]:
                for t in range(rr):
                    mult.narrow(i + 2, area[i] - 1 - t, 1).mul_((1.0 / rr) * (t + 1))

    batch = x.shape[0]
    context = None if e.context is None else repeat_to_batch_size(e.context, batch)
    extra = {}
    for name, value in e.extra.items():
        if value.ndim == x.ndim and value.shape[2:] == x.shape[2:] and area is not None:
            for i in range(n):  # latent-shaped inputs (concat channels) follow the crop
                value = value.narrow(i + 2, area[n + i], area[i])
        extra[name] = repeat_to_batch_size(value, batch)
    return _Run(index, input_x, mult, area, context, extra)


def _contexts_concatenable(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a.shape == b.shape:
        return True
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        return False
    return math.lcm(a.shape[1], b.shape[1]) // min(a.shape[1], b.shape[1]) <= _MAX_CONTEXT_REPEAT


def _can_batch(a: _Run, b: _Run) -> bool:
    if a.input_x.shape != b.input_x.shape or a.extra.keys() != b.extra.keys():
        return False
    if any(a.extra[k].shape != b.extra[k].shape for k in a.extra):
        return False
    return _contexts_concatenable(a.context, b.context)


def _concat_contexts(contexts: list[Tensor | None]) -> Tensor | None:
    present = [c for c in contexts if c is not None]
    if not present:
        return None
    length = 1
    for c in present:
        length = math.lcm(length, c.shape[1])
    # Repeating tokens leaves cross-attention unchanged, so unequal lengths can share a batch.
    return torch.cat([c.repeat(1, length // c.shape[1], 1) if c.shape[1] < length else c for c in present])


def calc_cond_batch(
    model: ModelFunction,
    cond_lists: Sequence[Sequence[CondEntry] | None],
    x: Tensor,
    sigma: Tensor,
    max_batch: int | None = None,
) -> list[Tensor]:
    """Weighted-average prediction per conditioning list (zeros for a None or fully inactive list)."""
    outs = [torch.zeros_like(x) for _ in cond_lists]
    counts = [torch.ones_like(x) * _COUNT_EPS for _ in cond_lists]
    to_run: list[_Run] = []
    for index, entries in enumerate(cond_lists):
        for e in entries or ():
            run = _prepare_run(index, e, x, sigma)
            if run is not None:
                to_run.append(run)

    while to_run:
        first = to_run[0]
        batch_ids = [j for j, r in enumerate(to_run) if _can_batch(r, first)]
        batch_ids.reverse()  # ComfyUI's order: last compatible entry first
        if max_batch is not None:
            batch_ids = batch_ids[: max(1, max_batch)]
        runs = [to_run.pop(j) for j in batch_ids]  # descending indices: pops stay valid
        chunks = len(runs)
        extra = {k: torch.cat([r.extra[k] for r in runs]) for k in runs[0].extra}
        output = model(
            torch.cat([r.input_x for r in runs]),
            torch.cat([sigma] * chunks),
            _concat_contexts([r.context for r in runs]),
            extra,
        ).chunk(chunks)
        for out, run in zip(output, runs, strict=True):
            acc, cnt = outs[run.index], counts[run.index]
            if run.area is not None:
                n = len(run.area) // 2
                for i in range(n):
                    acc = acc.narrow(i + 2, run.area[n + i], run.area[i])
                    cnt = cnt.narrow(i + 2, run.area[n + i], run.area[i])
            acc += out * run.mult
            cnt += run.mult
    return [o / c for o, c in zip(outs, counts, strict=True)]


class CFGGuider:
    """The sampler-facing denoiser: classifier-free guidance of ``model`` over CONDITIONING.

    ``negative`` None means no unconditional list (ComfyUI's BasicGuider; use cfg 1).
    """

    def __init__(
        self,
        model: ModelFunction,
        positive: Conditioning,
        negative: Conditioning | None,
        cfg: float,
        model_sampling: ModelSampling,
        *,
        extra_conds: ExtraCondsFn = pooled_output_extra,
        max_batch: int | None = None,
    ) -> None:
        self.model = model
        self.positive = positive
        self.negative = negative
        self.cfg = cfg
        self.model_sampling = model_sampling
        self.extra_conds = extra_conds
        self.max_batch = max_batch
        self._resolved: dict[tuple[Any, ...], list[list[CondEntry]]] = {}

    def _entries(self, x: Tensor) -> list[list[CondEntry]]:
        key = (tuple(x.shape), x.device)
        if key not in self._resolved:
            lists = [resolve_conditioning(self.positive, x, self.model_sampling, self.extra_conds)]
            if self.negative is not None:
                lists.append(resolve_conditioning(self.negative, x, self.model_sampling, self.extra_conds))
            pair_areas(lists)
            self._resolved[key] = lists
        return self._resolved[key]

    def _predict(self, x: Tensor, sigma: Tensor, force_uncond: bool) -> tuple[Tensor, Tensor]:
        lists = self._entries(x)
        positive = lists[0]
        negative = lists[1] if len(lists) > 1 else None
        if math.isclose(self.cfg, 1.0) and not force_uncond:
            negative = None
        cond_pred, uncond_pred = calc_cond_batch(self.model, [positive, negative], x, sigma, self.max_batch)
        return uncond_pred + (cond_pred - uncond_pred) * self.cfg, uncond_pred

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self._predict(x, sigma, force_uncond=False)[0]

    def denoise_with_uncond(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(guided, unconditional) predictions; the unconditional pass runs even at cfg 1 (CFG++)."""
        return self._predict(x, sigma, force_uncond=True)


# -- inpainting ----------------------------------------------------------------------------------


def prepare_denoise_mask(noise_mask: Tensor, latent_shape: Sequence[int]) -> Tensor:
    """A LATENT's noise_mask ([B, H, W] or [H, W], any size) as [B, C, h, w] weights for the latent."""
    mask = noise_mask.reshape((-1, 1, noise_mask.shape[-2], noise_mask.shape[-1])).float()
    mask = F.interpolate(mask, size=tuple(latent_shape[2:]), mode="bilinear")
    if mask.shape[1] < latent_shape[1]:
        mask = mask.repeat((1, latent_shape[1], 1, 1))[:, : latent_shape[1]]
    return repeat_to_batch_size(mask, latent_shape[0])


class InpaintDenoiser:
    """Keeps the unmasked latent pinned to the input image (ComfyUI's KSamplerX0Inpaint).

    Before each model call the masked-off area (mask 0) of x is replaced by the input latent noised
    to the current sigma; the prediction there is replaced by the input latent itself.
    """

    def __init__(
        self,
        model: DenoiserFn,
        model_sampling: ModelSampling,
        latent_image: Tensor,
        noise: Tensor,
        denoise_mask: Tensor,  # [B, C, H, W], 1 = regenerate
    ) -> None:
        self.model = model
        self.model_sampling = model_sampling
        self.latent_image = latent_image
        self.noise = noise
        self.denoise_mask = denoise_mask

    def _blend_input(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma_b = sigma.reshape([sigma.shape[0]] + [1] * (self.noise.ndim - 1))
        noised = self.model_sampling.noise_scaling(sigma_b, self.noise, self.latent_image)
        return x * self.denoise_mask + noised * (1.0 - self.denoise_mask)

    def _blend_output(self, out: Tensor) -> Tensor:
        return out * self.denoise_mask + self.latent_image * (1.0 - self.denoise_mask)

    def __call__(self, x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        return self._blend_output(self.model(self._blend_input(x, sigma), sigma, **kwargs))

    def denoise_with_uncond(self, x: Tensor, sigma: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        # The uncond prediction is not blended, as in ComfyUI (its post-CFG hook sees it raw).
        denoised, uncond = denoise_with_uncond(self.model, self._blend_input(x, sigma), sigma, kwargs)
        return self._blend_output(denoised), uncond

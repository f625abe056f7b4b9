"""Sampling in the k-diffusion style: noise, schedules, samplers, denoiser wrappers, guidance.

Numerics follow ComfyUI, so a seed, sampler and scheduler give ComfyUI's latent.

- ``model_sampling``: a model's sigma table (``ModelSampling``) and the eps / v ``Denoiser`` wrapper.
- ``schedulers``: ``SCHEDULERS`` / ``SCHEDULER_NAMES``, ``ksampler_sigmas`` (steps, denoise, sampler),
  ``slice_sigmas`` (KSamplerAdvanced) and the custom-sampler schedule nodes' functions.
- ``noise``: initial noise (``prepare_noise``) and the per-step noise samplers.
- ``samplers``: ``SAMPLERS`` / ``SAMPLER_NAMES``: plain ``sample_x(model, x, sigmas, ...)`` functions.
- ``guidance``: ``CFGGuider`` over CONDITIONING, ``InpaintDenoiser`` for latent noise masks.
- ``run``: ``run_sampler``, ComfyUI's framing around a sampler (noise scaling, inpainting, seed).
- ``common``: the model-call contract shared by the samplers; ``coefficients`` and ``uni_pc``: solver
  internals.
"""

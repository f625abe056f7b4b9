"""Sampler and scheduler names, torch-free: the node catalogue lists them in combos.

``engine.sampling.samplers.SAMPLERS`` and ``engine.sampling.schedulers.SCHEDULERS`` implement exactly
these names (a test checks it).
"""

from __future__ import annotations

# ComfyUI's KSAMPLER_NAMES, in its order.
KSAMPLER_NAMES: tuple[str, ...] = (
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2",
    "exp_heun_2_x0", "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive",
    "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m",
    "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
    "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp",
    "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver",
    "sa_solver_pece",
)  # fmt: skip
# The KSampler "sampler_name" combo: ComfyUI's SAMPLER_NAMES.
SAMPLER_NAMES: tuple[str, ...] = (*KSAMPLER_NAMES, "ddim", "uni_pc", "uni_pc_bh2")

# ComfyUI's SCHEDULER_HANDLERS, in its order (the KSampler combo lists them so).
SCHEDULER_NAMES: tuple[str, ...] = (
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
)

"""Sampling in the k-diffusion style: noise, schedules, samplers, denoiser wrappers, guidance."""

"""Diffusion math, apart from models: flow matching, noise schedules, samplers."""
from .flow_matching import add_noise, flow_matching_loss, sample_training_sigmas, shift_sigmas, velocity_target
from .samplers import cfg_denoiser, euler_sample, model_denoiser, sigma_schedule

__all__ = [
    "add_noise", "cfg_denoiser", "euler_sample", "flow_matching_loss", "model_denoiser",
    "sample_training_sigmas", "shift_sigmas", "sigma_schedule", "velocity_target",
]

"""Diffusion process, samplers and guidance (paper Eq. 2, 3, 4, 6 and App. C).

    from condiff.diffusion import Schedule, diffusion_loss, ddim, dpmpp_2m, heun, ControlGuidance
"""

from condiff.diffusion.guidance import (
    ControlGuidance,
    classifier_free_guidance,
    guidance_base_resolution,
    guidance_scale_for_resolution,
)
from condiff.diffusion.loss import diffusion_loss
from condiff.diffusion.sampling import SAMPLERS, ddim, dpmpp_2m, get_sampler, heun, spaced_timesteps
from condiff.diffusion.schedule import Schedule, rescale_for_resolution
from condiff.diffusion.size_cond import inference_control

__all__ = [
    "ControlGuidance", "SAMPLERS", "Schedule", "classifier_free_guidance", "ddim", "diffusion_loss", "dpmpp_2m",
    "get_sampler", "guidance_base_resolution", "guidance_scale_for_resolution", "heun", "inference_control", "rescale_for_resolution",
    "spaced_timesteps",
]

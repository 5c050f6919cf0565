"""Stable Diffusion (1.x, 2.x, XL and the turbo variants) in MLX, held numerically to diffusers."""

from .model_io import ModelLoadError
from .pipeline import PRESETS, Defaults, StableDiffusion, StableDiffusionXL, img2img_steps, load_model

__all__ = ["Defaults", "ModelLoadError", "PRESETS", "StableDiffusion", "StableDiffusionXL", "img2img_steps", "load_model"]

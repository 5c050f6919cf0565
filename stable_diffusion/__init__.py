"""Stable Diffusion (1.x, 2.x, XL and the turbo variants) in MLX, held numerically to diffusers."""

from .model_io import ModelLoadError
from .pipeline import PRESETS, StableDiffusion, StableDiffusionXL, load_model

__all__ = ["ModelLoadError", "PRESETS", "StableDiffusion", "StableDiffusionXL", "load_model"]

"""Stable Diffusion (1.x, 2.x, XL and the turbo variants) in MLX, held numerically to diffusers."""

import os

import mlx.core as mx

if mx.cuda.is_available():
    # MLX's CUDA backend puts at most this many kernels into one CUDA graph (its default is 20). A UNet
    # step is ~800 kernels, and at 40 the host launches half as many graphs: +11 % to +19 % images/s at
    # batch 1-2 on an H100, no change at 16 (bench/RESULTS.md, "Throughput levers"). Read when MLX first runs on the GPU,
    # so it applies when this package is imported first; a value the user set is kept.
    os.environ.setdefault("MLX_MAX_OPS_PER_BUFFER", "40")

from .model_io import ModelLoadError  # noqa: E402
from .pipeline import PRESETS, Defaults, StableDiffusion, StableDiffusionXL, img2img_steps, load_model  # noqa: E402

__all__ = ["Defaults", "ModelLoadError", "PRESETS", "StableDiffusion", "StableDiffusionXL", "img2img_steps", "load_model"]

"""Stable Diffusion (1.x, 2.x, XL and the turbo variants) in MLX, held numerically to diffusers."""

import os

try:
    import mlx.core as mx
except ImportError as e:
    # On Linux the plain mlx wheel has no backend (no libmlx.so): the cpu or cuda extra brings one.
    raise ImportError(
        f"MLX cannot be loaded ({e}); on Linux install it with a backend: "
        'pip install -e ".[cpu]" (CPU) or pip install -e ".[cuda]" (NVIDIA GPU), or pip install "mlx[cpu]"'
    ) from None

if mx.cuda.is_available():
    # How MLX's CUDA backend batches kernels into CUDA graphs: at most this many kernels and about this
    # many MB of arrays per graph. A UNet step is ~800 kernels; these values measured best on an H100:
    # +9 % to +67 % images/s at batch 1-16 over MLX's defaults, and a lower peak memory for SDXL's
    # float32 decode (bench/RESULTS.md, "Throughput levers"). MLX reads them at its first GPU work, so
    # they apply when this package is imported first; values the user set are kept.
    os.environ.setdefault("MLX_MAX_OPS_PER_BUFFER", "40")
    os.environ.setdefault("MLX_MAX_MB_PER_BUFFER", "100")

from .controlnet import CONTROLNET_PRESETS, Control, load_controlnet  # noqa: E402
from .errors import ModelLoadError  # noqa: E402
from .pipeline import PRESETS, Defaults, StableDiffusion, StableDiffusionXL, img2img_steps, load_model  # noqa: E402

__all__ = ["CONTROLNET_PRESETS", "Control", "Defaults", "ModelLoadError", "PRESETS", "StableDiffusion", "StableDiffusionXL", "img2img_steps", "load_controlnet", "load_model"]

"""Helpers shared by the parity tests: the error they are held to, layout conversion, the reference pipelines."""

import mlx.core as mx
import numpy as np
import torch


# The diffusers class of each sampler id the parity tests run.
SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpm++2m": "DPMSolverMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
}


def relative_error(ours, ref) -> float:
    """max |ours - ref| / max |ref|, in float64."""
    ours = np.asarray(ours.astype(mx.float32) if isinstance(ours, mx.array) else ours, dtype=np.float64)
    ref = np.asarray(ref.detach().double().numpy() if isinstance(ref, torch.Tensor) else ref, dtype=np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def nhwc(x) -> mx.array:
    """A torch tensor or numpy array in NCHW as an MLX array in NHWC."""
    x = x.detach().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return mx.array(x.transpose(0, 2, 3, 1))


def run_latents(latent_iter) -> list:
    """Every step's latent of a generator, evaluated."""
    latents = list(latent_iter)
    mx.eval(latents)
    return latents


def reference_pipeline(folder, scheduler: str = None, img2img: bool = False, xl: bool = False):
    """diffusers' (SDXL) txt2img or img2img pipeline on ``folder``, with the named scheduler class."""
    import diffusers

    name = "StableDiffusion" + ("XL" if xl else "") + ("Img2Img" if img2img else "") + "Pipeline"
    options = {} if xl else dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = getattr(diffusers, name).from_pretrained(folder, **options)
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def decode_reference(pipe, latents: torch.Tensor) -> np.ndarray:
    """What ``pipe(..., output_type="np")`` returns, from the latents its ``output_type="latent"`` call returned.

    The end of diffusers' pipelines' ``__call__``: the SDXL ones decode in float32 when the VAE is
    float16 and its config sets force_upcast, and unscale by latents_mean/std when the config has
    them; all divide by the scaling factor, decode and postprocess (no safety checker in these
    tests, so every image is denormalized).
    """
    import diffusers

    vae = pipe.vae
    with torch.no_grad():
        if not isinstance(pipe, (diffusers.StableDiffusionXLPipeline, diffusers.StableDiffusionXLImg2ImgPipeline)):
            image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
            return pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True] * image.shape[0])
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(torch.float32)
            latents = latents.to(torch.float32)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
        if upcast:
            vae.to(torch.float16)
        if pipe.watermark is not None:
            image = pipe.watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type="np")


def torch_step_noise(seed: int, skip: int = 0):
    """A ``step_noise`` argument giving what diffusers draws from torch.Generator(seed), after `skip` earlier draws."""
    generator = torch.Generator().manual_seed(seed)
    drawn = {"n": 0}

    def step_noise(step, shape):
        while True:
            noise = torch.randn((shape[0], shape[3], shape[1], shape[2]), generator=generator)
            drawn["n"] += 1
            if drawn["n"] > skip:
                return nhwc(noise)

    return step_noise

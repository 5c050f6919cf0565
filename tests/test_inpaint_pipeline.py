"""Inpainting through the facades vs diffusers' StableDiffusion(XL)InpaintPipeline on the same tiny weights and noise.

Both the 9-channel path (mask and masked-image latents beside the latents at every UNet call) and
the 4-channel one (the known region reset after every step), at strength 1 (pure noise) and below.
diffusers samples the VAE posterior; we encode its mean: its ``retrieve_latents`` is made to take
the mean too (as the img2img tests do), or the masked image's latents are injected on both sides.
The noise diffusers draws first from its generator is ours; a stochastic sampler's step noise
follows it. Tolerance: the txt2img / img2img parity tests' 1e-4 (float32 through the same layers).
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

from parity import SCHEDULERS, decode_reference, nhwc, relative_error, run_latents, torch_step_noise
from stable_diffusion import StableDiffusion, StableDiffusionXL

SIZE = 32  # pixels; the tiny VAE downsamples 4x, so latents are 8x8
PROMPT = "A photo of an astronaut riding a horse on Mars."


def picture_and_mask(height, width, seed=0):
    """A random picture in [0, 1] and a greyscale mask picture whose white region does not follow the latent grid."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 1, (height, width, 3)).astype(np.float32)
    mask = np.zeros((height, width), np.uint8)
    mask[5:23, 9:27] = 200  # grey >= 128: binarised to white
    mask[7:11, 3:9] = 100  # grey < 128: binarised to black
    return image, Image.fromarray(mask, "L")


@pytest.fixture
def posterior_mean(monkeypatch):
    """diffusers' inpainting pipelines sample the VAE posterior; we encode its mean. Make diffusers do the same."""
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as sd_module
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint as xl_module

    for module in (sd_module, xl_module):
        retrieve = module.retrieve_latents
        monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None, sample_mode="sample", r=retrieve: r(out, generator, "argmax"))


def reference(folder, xl: bool, sampler=None):
    import diffusers

    if xl:
        pipe = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(folder)
    else:
        pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if sampler is not None:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_both(folder, xl, sampler, n=2, steps=6, cfg=None, negative="", height=SIZE, width=SIZE, masked_image_latents=None, mask_blur=0, **strength):
    """Our latents after each call and the decoded last; diffusers' final latents and its pipe.

    ``mask_blur``: ours as the argument, diffusers' as its documentation does it: ``pipe.mask_processor.blur(mask, r)`` first."""
    image, mask = picture_and_mask(height, width)
    noise = torch.randn((n, 4, height // 4, width // 4), generator=torch.Generator().manual_seed(7))
    facade = StableDiffusionXL if xl else StableDiffusion
    sd = facade(str(folder), sampler=sampler)
    guidance = {} if cfg is None else dict(cfg_weight=cfg)
    latents = run_latents(
        sd.generate_latents_from_image(
            mx.array(image * 2 - 1), PROMPT, n_images=n, num_steps=steps, negative_text=negative, noise=nhwc(noise), mask=mask, mask_blur=mask_blur,
            step_noise=torch_step_noise(seed=7, skip=1),  # diffusers draws the start noise first
            masked_image_latents=None if masked_image_latents is None else nhwc(masked_image_latents),
            **guidance, **strength,
        )
    )
    pipe = reference(folder, xl, sampler)
    extra = {} if masked_image_latents is None else dict(masked_image_latents=masked_image_latents.clone())
    if mask_blur:
        mask = pipe.mask_processor.blur(mask, mask_blur)
    ref = pipe(
        PROMPT, image=image[None], mask_image=mask, height=height, width=width, num_inference_steps=steps, negative_prompt=negative or None,
        num_images_per_prompt=n, generator=torch.Generator().manual_seed(7), output_type="latent",
        **({} if cfg is None else dict(guidance_scale=cfg)), **strength, **extra,
    ).images
    return sd, latents, pipe, ref


@pytest.mark.parametrize(
    "model, sampler, strength",
    [
        ("tiny_sd1_inpaint", "euler", 1.0),
        ("tiny_sd1_inpaint", "ddim", 0.6),
        ("tiny_sd1_inpaint", "euler_a", 0.6),  # stochastic: step noise after the start noise
        ("tiny_sd1", "euler", 1.0),
        ("tiny_sd1", "dpm++2m", 0.6),
        ("tiny_sd1", "heun", 0.6),  # 2nd order: starts at t_start * order, blends after every call
        ("tiny_sd2", "euler_a", 0.6),  # v-prediction
    ],
)
def test_sd_inpainting_matches_diffusers(request, posterior_mean, model, sampler, strength):
    sd, latents, pipe, ref = run_both(request.getfixturevalue(model), False, sampler, strength=strength)
    t_start = 6 - int(6 * strength)  # diffusers' get_timesteps
    assert len(latents) == len(pipe.scheduler.timesteps) - t_start * pipe.scheduler.order
    assert relative_error(latents[-1], nhwc(ref)) <= 1e-4
    assert relative_error(sd.decode(latents[-1]), decode_reference(pipe, ref)) <= 1e-4


@pytest.mark.parametrize("model", ["tiny_sdxl_inpaint", "tiny_sdxl"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_sdxl_inpainting_matches_diffusers(request, posterior_mean, model, strength):
    # A non-square picture: SDXL's size conditioning is (height, width) of the image.
    sd, latents, pipe, ref = run_both(request.getfixturevalue(model), True, "euler", n=1, cfg=4.0, negative="grainy", width=SIZE + 8, strength=strength)
    assert relative_error(latents[-1], nhwc(ref)) <= 1e-4


def test_sdxl_inpainting_strength_defaults_to_the_inpaint_pipelines(tiny_sdxl_inpaint, posterior_mean):
    """StableDiffusionXLInpaintPipeline's strength 0.9999: 4 of 5 steps, from the image noised (not pure noise)."""
    # Guidance given: the inpaint pipeline's default is 7.5, the facade keeps StableDiffusionXLPipeline's 5.
    sd, latents, pipe, ref = run_both(tiny_sdxl_inpaint, True, "euler", n=1, steps=5, cfg=5.0)
    assert len(latents) == 4
    assert relative_error(latents[-1], nhwc(ref)) <= 1e-4


def test_sd_inpainting_strength_defaults_to_the_inpaint_pipelines(tiny_sd1_inpaint, posterior_mean):
    """StableDiffusionInpaintPipeline's strength 1.0 (img2img's is 0.8): every step, from pure noise."""
    sd, latents, pipe, ref = run_both(tiny_sd1_inpaint, False, "euler", n=1, steps=5)
    assert len(latents) == 5
    assert relative_error(latents[-1], nhwc(ref)) <= 1e-4


def test_injected_masked_image_latents_reach_the_unet_as_diffusers(tiny_sd1_inpaint):
    """The latents diffusers would sample for the masked image, given to both: no posterior patch needed at strength 1."""
    masked = torch.randn((1, 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(2))
    sd, latents, pipe, ref = run_both(tiny_sd1_inpaint, False, "euler", masked_image_latents=masked, strength=1.0)
    assert relative_error(latents[-1], nhwc(ref)) <= 1e-4


def test_mask_blur_is_the_mask_processors(tiny_sd1_inpaint, posterior_mean):
    """A blur of 4 moves the binarised edge by whole latent cells on this mask."""
    sd, latents, pipe, ref = run_both(tiny_sd1_inpaint, False, "euler", mask_blur=4, strength=0.6)
    assert relative_error(latents[-1], nhwc(ref)) <= 1e-4


def test_inpainting_models_refuse_what_they_cannot_do(tiny_sd1_inpaint, tiny_sd1):
    inpainting, plain = StableDiffusion(str(tiny_sd1_inpaint)), StableDiffusion(str(tiny_sd1))
    image, mask = picture_and_mask(SIZE, SIZE)
    image = mx.array(image * 2 - 1)
    with pytest.raises(ValueError, match=r"needs an image and a mask: generate_latents_from_image\(\.\.\., mask=\.\.\.\)"):
        inpainting.generate_latents(PROMPT, num_steps=2)
    with pytest.raises(ValueError, match="an inpainting model needs a mask"):
        inpainting.generate_latents_from_image(image, PROMPT, num_steps=2)
    with pytest.raises(ValueError, match="is for an inpainting UNet"):
        plain.generate_latents_from_image(image, PROMPT, num_steps=2, mask=mask, masked_image_latents=mx.zeros((1, SIZE // 4, SIZE // 4, 4)))
    with pytest.raises(ValueError, match="the mask is 40x32 but the image is 32x32"):
        plain.generate_latents_from_image(image, PROMPT, num_steps=2, mask=np.ones((32, 40), np.float32) * np.arange(40) / 40)

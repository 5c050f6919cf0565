"""SDXL parity: StableDiffusionXL vs diffusers' SDXL pipelines on a tiny SDXL-shaped model."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from parity import decode_reference, nhwc, reference_pipeline, relative_error, run_latents, torch_step_noise
from stable_diffusion import StableDiffusionXL, load_model

SIZE = 32  # pixels; the tiny VAE downsamples 4x
PROMPT = "A cinematic photo of a lighthouse at dusk, 35mm"


def reference_xl(folder, img2img=False, scheduler=None):
    return reference_pipeline(folder, scheduler, img2img, xl=True)


@pytest.mark.parametrize(
    "cfg, negative",
    [
        (5.0, ""),  # empty negative prompt: zero embeddings (force_zeros_for_empty_prompt)
        (5.0, "low quality, blurry"),
        (0.0, ""),  # guidance off
    ],
)
def test_sdxl_txt2img_matches_diffusers(tiny_sdxl, cfg, negative):
    n, steps = 2, 5
    width, height = SIZE, SIZE + 16  # non-square: the size conditioning must follow it
    init = torch.randn((n, 4, height // 4, width // 4), generator=torch.Generator().manual_seed(0))

    sd = StableDiffusionXL(str(tiny_sdxl))
    latents = run_latents(
        sd.generate_latents(
            PROMPT, n_images=n, num_steps=steps, cfg_weight=cfg, negative_text=negative, latent_size=(height // 4, width // 4), latents=nhwc(init)
        )
    )
    images = sd.decode(latents[-1])

    pipe = reference_xl(tiny_sdxl)
    ref_latents = pipe(
        PROMPT,
        negative_prompt=negative or None,
        num_images_per_prompt=n,
        num_inference_steps=steps,
        guidance_scale=cfg,
        height=height,
        width=width,
        latents=init.clone(),
        output_type="latent",
    ).images
    assert relative_error(latents[-1], nhwc(ref_latents)) <= 1e-4
    assert images.shape == (n, height, width, 3)
    assert relative_error(images, decode_reference(pipe, ref_latents)) <= 1e-4


@pytest.mark.parametrize("sampler", ["euler_a", "ddim", "dpm++2m"])
def test_sdxl_with_each_sampler_matches_diffusers(tiny_sdxl, sampler):
    classes = {"euler_a": "EulerAncestralDiscreteScheduler", "ddim": "DDIMScheduler", "dpm++2m": "DPMSolverMultistepScheduler"}
    init = torch.randn((1, 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(1))
    sd = StableDiffusionXL(str(tiny_sdxl), sampler=sampler)
    latents = run_latents(sd.generate_latents(PROMPT, num_steps=4, cfg_weight=6.0, latent_size=(SIZE // 4, SIZE // 4), latents=nhwc(init), step_noise=torch_step_noise(seed=4)))
    ref = reference_xl(tiny_sdxl, scheduler=classes[sampler])(
        PROMPT,
        num_inference_steps=4,
        guidance_scale=6.0,
        height=SIZE,
        width=SIZE,
        latents=init.clone(),
        generator=torch.Generator().manual_seed(4),
        output_type="latent",
    ).images
    assert relative_error(latents[-1], nhwc(ref)) <= 1e-4


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sdxl_turbo_configuration_matches_diffusers(tiny_sdxl_turbo, steps):
    """Trailing spacing, Euler ancestral, no guidance: what sdxl-turbo's model card runs."""
    sd = load_model(str(tiny_sdxl_turbo))
    assert isinstance(sd, StableDiffusionXL)
    assert (sd.default_steps, sd.default_cfg, sd.sampler.name) == (2, 0.0, "euler_a")
    init = torch.randn((1, 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(2))
    latents = run_latents(sd.generate_latents(PROMPT, num_steps=steps, latent_size=(SIZE // 4, SIZE // 4), latents=nhwc(init), step_noise=torch_step_noise(seed=9)))
    pipe = reference_xl(tiny_sdxl_turbo)
    ref_latents = pipe(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=0.0,
        height=SIZE,
        width=SIZE,
        latents=init.clone(),
        generator=torch.Generator().manual_seed(9),
        output_type="latent",
    ).images
    assert len(latents) == steps
    assert relative_error(latents[-1], nhwc(ref_latents)) <= 1e-4
    assert relative_error(sd.decode(latents[-1]), decode_reference(pipe, ref_latents)) <= 1e-4


@pytest.fixture
def posterior_mean_img2img(monkeypatch):
    """diffusers samples the VAE posterior in img2img; we start from its mean (issue 2). Make diffusers do the same."""
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as module

    retrieve = module.retrieve_latents
    monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None, sample_mode="sample": retrieve(out, generator, "argmax"))


@pytest.mark.parametrize("cfg, negative, strength", [(5.0, "", 0.6), (4.0, "grainy", 0.9), (0.0, "", 0.5)])
def test_sdxl_img2img_matches_diffusers(tiny_sdxl, posterior_mean_img2img, cfg, negative, strength):
    n, steps = 2, 6
    image = np.random.default_rng(1).uniform(0, 1, (SIZE, SIZE + 8, 3)).astype(np.float32)
    noise = torch.randn((n, 4, SIZE // 4, (SIZE + 8) // 4), generator=torch.Generator().manual_seed(3))

    sd = StableDiffusionXL(str(tiny_sdxl))
    latents = run_latents(
        sd.generate_latents_from_image(
            mx.array(image * 2 - 1), PROMPT, n_images=n, strength=strength, num_steps=steps, cfg_weight=cfg, negative_text=negative, noise=nhwc(noise)
        )
    )
    pipe = reference_xl(tiny_sdxl, img2img=True)
    ref_latents = pipe(
        PROMPT,
        image=image[None],
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=cfg,
        negative_prompt=negative or None,
        num_images_per_prompt=n,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
    ).images
    assert len(latents) == int(steps * strength)
    assert relative_error(latents[-1], nhwc(ref_latents)) <= 1e-4
    assert relative_error(sd.decode(latents[-1]), decode_reference(pipe, ref_latents)) <= 1e-4


def test_sdxl_float16_keeps_the_vae_in_float32_when_force_upcast(tiny_sdxl):
    sd = StableDiffusionXL(str(tiny_sdxl), float16=True)
    assert sd.unet.conv_in.weight.dtype == mx.float16
    assert sd.text_encoder_2.text_projection.weight.dtype == mx.float16
    assert sd.autoencoder.decoder.conv_in.weight.dtype == mx.float32
    init = torch.randn((1, 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(5))
    latents = run_latents(sd.generate_latents(PROMPT, num_steps=3, cfg_weight=5.0, latent_size=(SIZE // 4, SIZE // 4), latents=nhwc(init)))
    images = np.array(sd.decode(latents[-1]))
    ref = reference_xl(tiny_sdxl)(PROMPT, num_inference_steps=3, guidance_scale=5.0, height=SIZE, width=SIZE, latents=init.clone(), output_type="np").images
    assert np.isfinite(images).all()
    assert relative_error(images, ref) <= 2e-2


def test_sdxl_size_conditioning_follows_given_latents(tiny_sdxl):
    """Latents of another size than latent_size: diffusers conditions on the size it decodes."""
    init = torch.randn((1, 4, 12, 8), generator=torch.Generator().manual_seed(6))
    sd = StableDiffusionXL(str(tiny_sdxl))
    latents = run_latents(sd.generate_latents(PROMPT, num_steps=3, cfg_weight=5.0, latents=nhwc(init)))
    ref = reference_xl(tiny_sdxl)(PROMPT, num_inference_steps=3, guidance_scale=5.0, height=48, width=32, latents=init.clone(), output_type="latent").images
    assert relative_error(latents[-1], nhwc(ref)) <= 1e-4

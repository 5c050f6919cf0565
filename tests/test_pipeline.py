"""Whole-pipeline parity: our facade vs diffusers' pipelines on the same tiny weights and noise."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from parity import SCHEDULERS, decode_reference, nhwc, reference_pipeline, relative_error, run_latents, torch_step_noise
from stable_diffusion import StableDiffusion

SIZE = 32  # pixels; the tiny VAE downsamples 4x, so latents are 8x8
PROMPT = "A photo of an astronaut riding a horse on Mars."


def reference_sd(folder, sampler: str, img2img: bool = False):
    return reference_pipeline(folder, SCHEDULERS[sampler], img2img)


@pytest.mark.parametrize(
    "flavour, cfg, negative",
    [
        ("sd1", 7.5, ""),  # epsilon, PNDM config: PNDM, as diffusers' default pipeline
        ("sd1", 5.0, "blurry, low quality"),
        ("sd2", 7.5, ""),  # v-prediction
        ("sd2", 1.0, ""),  # guidance off
    ],
)
def test_txt2img_matches_diffusers(request, flavour, cfg, negative):
    folder = request.getfixturevalue(f"tiny_{flavour}")
    steps, n = 6, 2
    init = torch.randn((n, 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(3))

    sd = StableDiffusion(str(folder))
    latents = run_latents(
        sd.generate_latents(PROMPT, n_images=n, num_steps=steps, cfg_weight=cfg, negative_text=negative, latent_size=(SIZE // 4, SIZE // 4), latents=nhwc(init))
    )
    images = sd.decode(latents[-1])

    pipe = reference_pipeline(folder)  # the folder's own scheduler class, as from_pretrained picks it
    common = dict(
        prompt=PROMPT,
        negative_prompt=negative or None,
        num_images_per_prompt=n,
        num_inference_steps=steps,
        guidance_scale=cfg,
        height=SIZE,
        width=SIZE,
        latents=init.clone(),
    )
    ref_latents = pipe(**common, output_type="latent").images
    ref_images = decode_reference(pipe, ref_latents)

    assert len(latents) == len(pipe.scheduler.timesteps)  # one per UNet call: PNDM makes steps + 1
    assert relative_error(latents[-1], nhwc(ref_latents)) <= 1e-4
    assert images.shape == (n, SIZE, SIZE, 3)
    assert relative_error(images, ref_images) <= 1e-4


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "ddim", "dpm++2m"])
@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_txt2img_with_each_sampler_matches_diffusers(request, sampler, flavour):
    folder = request.getfixturevalue(f"tiny_{flavour}")
    steps = 5
    init = torch.randn((1, 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(5))

    sd = StableDiffusion(str(folder), sampler=sampler)
    latents = run_latents(sd.generate_latents(PROMPT, num_steps=steps, latent_size=(SIZE // 4, SIZE // 4), latents=nhwc(init), step_noise=torch_step_noise(seed=11)))

    pipe = reference_sd(folder, sampler)
    ref = pipe(
        PROMPT,
        num_inference_steps=steps,
        height=SIZE,
        width=SIZE,
        latents=init.clone(),
        generator=torch.Generator().manual_seed(11),
        output_type="latent",
    ).images
    assert relative_error(latents[-1], nhwc(ref)) <= 1e-4


@pytest.fixture
def posterior_mean_img2img(monkeypatch):
    """diffusers' img2img samples the VAE posterior; we start from its mean (issue 2). Make diffusers do the same."""
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as module

    retrieve = module.retrieve_latents
    monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None, sample_mode="sample": retrieve(out, generator, "argmax"))


@pytest.mark.parametrize(
    "flavour, sampler, strength, steps",
    [
        ("sd1", "euler", 0.6, 10),
        ("sd2", "euler", 0.8, 7),
        ("sd1", "ddim", 0.5, 8),
        ("sd2", "dpm++2m", 0.75, 8),
        ("sd1", "euler_a", 1.0, 4),
    ],
)
def test_img2img_matches_diffusers(request, posterior_mean_img2img, flavour, sampler, strength, steps):
    folder = request.getfixturevalue(f"tiny_{flavour}")
    n = 2
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (SIZE, SIZE, 3)).astype(np.float32)
    noise = torch.randn((n, 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(7))

    sd = StableDiffusion(str(folder), sampler=sampler)
    latents = run_latents(
        sd.generate_latents_from_image(
            mx.array(image * 2 - 1), PROMPT, n_images=n, strength=strength, num_steps=steps, negative_text="ugly", noise=nhwc(noise),
            step_noise=torch_step_noise(seed=7, skip=1),  # diffusers draws the start noise first
        )
    )
    images = sd.decode(latents[-1])

    pipe = reference_sd(folder, sampler, img2img=True)
    ref_latents = pipe(
        PROMPT,
        image=image[None],
        strength=strength,
        num_inference_steps=steps,
        negative_prompt="ugly",
        num_images_per_prompt=n,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
    ).images

    assert len(latents) == min(int(steps * strength), steps)
    assert relative_error(latents[-1], nhwc(ref_latents)) <= 1e-4
    assert relative_error(images, decode_reference(pipe, ref_latents)) <= 1e-4


def test_float16_pipeline_is_finite_and_close_to_diffusers_float32(tiny_sd2):
    init = torch.randn((1, 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(3))
    sd = StableDiffusion(str(tiny_sd2), float16=True)
    assert sd.unet.conv_in.weight.dtype == mx.float16
    assert sd.autoencoder.encoder.conv_in.weight.dtype == mx.float16  # as diffusers' SD pipelines, whatever force_upcast says
    latents = run_latents(sd.generate_latents(PROMPT, num_steps=4, latent_size=(SIZE // 4, SIZE // 4), latents=nhwc(init)))
    images = np.array(sd.decode(latents[-1]))

    ref = reference_sd(tiny_sd2, "euler")(
        PROMPT, num_inference_steps=4, height=SIZE, width=SIZE, latents=init.clone(), output_type="np"
    ).images
    assert np.isfinite(images).all()
    assert relative_error(images, ref) <= 2e-2


def test_generate_latents_is_lazy_and_seeded(tiny_sd1):
    sd = StableDiffusion(str(tiny_sd1))
    first = sd.generate_latents(PROMPT, num_steps=3, latent_size=(8, 8), seed=42)
    x = next(first)
    assert x.shape == (1, 8, 8, 4)
    again = run_latents(sd.generate_latents(PROMPT, num_steps=3, latent_size=(8, 8), seed=42))
    other = run_latents(sd.generate_latents(PROMPT, num_steps=3, latent_size=(8, 8), seed=43))
    rest = run_latents(first)
    assert np.array_equal(np.array(rest[-1]), np.array(again[-1]))
    assert not np.array_equal(np.array(again[-1]), np.array(other[-1]))


def test_decode_in_chunks_equals_decode_at_once(tiny_sd1):
    sd = StableDiffusion(str(tiny_sd1))
    z = mx.random.normal((5, 8, 8, 4), key=mx.random.key(0))
    np.testing.assert_allclose(np.array(sd.decode(z, batch_size=2)), np.array(sd.decode(z, batch_size=8)), atol=1e-6)


def test_stochastic_sampler_draws_its_step_noise_from_the_seed(tiny_sd1):
    sd = StableDiffusion(str(tiny_sd1), sampler="euler_a")
    runs = [run_latents(sd.generate_latents(PROMPT, num_steps=3, latent_size=(8, 8), seed=s))[-1] for s in (7, 7, 8)]
    assert np.isfinite(np.array(runs[0])).all()
    assert np.array_equal(np.array(runs[0]), np.array(runs[1]))
    assert not np.array_equal(np.array(runs[0]), np.array(runs[2]))


def test_quantized_model_stays_close_to_diffusers(tiny_sd2):
    import mlx.nn as nn

    init = torch.randn((1, 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(3))
    sd = StableDiffusion(str(tiny_sd2))
    sd.quantize(text_bits=8, unet_bits=8, group_size=32)
    sd.quantize(text_bits=8, unet_bits=8, group_size=32)  # a second call changes nothing
    assert isinstance(sd.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q, nn.QuantizedLinear)
    assert isinstance(sd.text_encoder.text_model.encoder.layers[0].mlp.fc1, nn.QuantizedLinear)
    latents = run_latents(sd.generate_latents(PROMPT, num_steps=4, latent_size=(SIZE // 4, SIZE // 4), latents=nhwc(init)))
    ref = reference_sd(tiny_sd2, "euler")(
        PROMPT, num_inference_steps=4, height=SIZE, width=SIZE, latents=init.clone(), output_type="latent"
    ).images
    assert 0 < relative_error(latents[-1], nhwc(ref)) <= 5e-2


def test_float16_vae_that_decodes_nan_is_decoded_again_in_float32(tiny_sd1):
    from diffusers import AutoencoderKL

    sd = StableDiffusion(str(tiny_sd1), float16=True)
    assert sd.vae_dtype == mx.float16  # SD decodes in float16, as diffusers' StableDiffusionPipeline does
    z = mx.random.normal((1, 8, 8, 4), key=mx.random.key(0)) * 2e4  # overflows float16 inside the decoder
    with pytest.warns(UserWarning, match="decoding again in float32"):
        images = sd.decode(z)
    vae = AutoencoderKL.from_pretrained(tiny_sd1 / "vae")
    with torch.no_grad():
        ref = vae.decode(torch.from_numpy(np.array(z / 0.18215)).permute(0, 3, 1, 2)).sample
    ref = (ref / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.isfinite(np.array(images)).all()
    assert relative_error(images, ref) <= 1e-4


def test_bad_arguments_raise_at_the_call_not_at_the_first_step(tiny_sd1):
    sd = StableDiffusion(str(tiny_sd1))
    with pytest.raises(ValueError, match="num_steps"):
        sd.generate_latents(PROMPT, num_steps=0)
    with pytest.raises(ValueError, match="strength"):
        sd.generate_latents_from_image(mx.zeros((32, 32, 3)), PROMPT, strength=1.5)
    with pytest.raises(ValueError, match="multiple of 4"):
        sd.generate_latents_from_image(mx.zeros((30, 32, 3)), PROMPT)


def test_two_interleaved_generators_of_one_model_each_match_diffusers(tiny_sd2):
    """Each generation owns its sampler: A (dpm++2m, 6 steps) and B (euler_a, 3 steps) stepped in turn."""
    sd = StableDiffusion(str(tiny_sd2))
    init = torch.randn((1, 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(5))
    size = (SIZE // 4, SIZE // 4)
    a = sd.generate_latents(PROMPT, num_steps=6, latent_size=size, latents=nhwc(init), sampler="dpm++2m")
    b = sd.generate_latents(PROMPT, num_steps=3, latent_size=size, latents=nhwc(init), sampler="euler_a", step_noise=torch_step_noise(seed=2))
    steps_a, steps_b = [], []
    for _ in range(6):
        steps_a.append(next(a))
        if len(steps_b) < 3:
            steps_b.append(next(b))
        mx.eval(steps_a[-1], steps_b[-1])
    assert next(a, None) is None and next(b, None) is None

    alone = run_latents(sd.generate_latents(PROMPT, num_steps=6, latent_size=size, latents=nhwc(init), sampler="dpm++2m"))
    np.testing.assert_array_equal(np.array(steps_a[-1]), np.array(alone[-1]))
    for sampler, steps, ours, seed in (("dpm++2m", 6, steps_a, None), ("euler_a", 3, steps_b, 2)):
        ref = reference_sd(tiny_sd2, sampler)(
            PROMPT,
            num_inference_steps=steps,
            height=SIZE,
            width=SIZE,
            latents=init.clone(),
            generator=torch.Generator().manual_seed(seed) if seed is not None else None,
            output_type="latent",
        ).images
        assert relative_error(ours[-1], nhwc(ref)) <= 1e-4, sampler


def test_a_sampler_named_at_the_call_leaves_the_models_own_for_later_calls(tiny_sd1):
    sd = StableDiffusion(str(tiny_sd1))
    init = mx.random.normal((1, 8, 8, 4), key=mx.random.key(1))
    first = run_latents(sd.generate_latents(PROMPT, num_steps=3, latents=init))[-1]
    run_latents(sd.generate_latents(PROMPT, num_steps=5, latents=init, sampler="ddim"))
    again = run_latents(sd.generate_latents(PROMPT, num_steps=3, latents=init))[-1]
    np.testing.assert_array_equal(np.array(first), np.array(again))


def test_unet_projections_are_fused_at_first_use_and_after_each_weight_change(tiny_sd2, monkeypatch):
    # Fusing reads the weights it joins, so it waits for the first step (weights load lazily), and a
    # LoRA or quantization change fuses again before the next step. The fused results themselves are
    # held to diffusers in test_unet.py; here only when the pipeline fuses.
    from stable_diffusion.unet import UNetModel

    calls = []
    fuse = UNetModel.fuse_projections
    monkeypatch.setattr(UNetModel, "fuse_projections", lambda self: calls.append(self) or fuse(self))
    sd = StableDiffusion(str(tiny_sd2))
    assert calls == []
    run_latents(sd.generate_latents(PROMPT, num_steps=2, latent_size=(SIZE // 8, SIZE // 8), seed=0))
    run_latents(sd.generate_latents(PROMPT, num_steps=2, latent_size=(SIZE // 8, SIZE // 8), seed=1))
    assert calls == [sd.unet]
    sd.quantize(text_bits=8, unet_bits=8, group_size=32)
    run_latents(sd.generate_latents(PROMPT, num_steps=2, latent_size=(SIZE // 8, SIZE // 8), seed=0))
    assert calls == [sd.unet, sd.unet]

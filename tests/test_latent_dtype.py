"""float16 runs keep the latents in float32 between steps (README: "the latents are kept in float32
between steps in float16 runs"): only the UNet runs in float16, its output is cast up before the
guidance and the sampler step, so the trajectory is not rounded to float16's 11 bits at every step.
"""

import mlx.core as mx
import numpy as np
import pytest

from parity import run_latents
from stable_diffusion import StableDiffusion, StableDiffusionXL
from stable_diffusion.sampler_names import SAMPLERS

SIZE = 32  # pixels; the tiny VAE downsamples 4x
STEPS = 4  # PNDM without skip_prk_steps (the tiny SDXL config) needs 4 for its Runge-Kutta warm-up
PROMPT = "a red barn in a snowy field"
MODELS = {"sd1": StableDiffusion, "sdxl": StableDiffusionXL}


@pytest.fixture(scope="module", params=list(MODELS))
def float16_model(request):
    cls = MODELS[request.param]
    model = cls(str(request.getfixturevalue(f"tiny_{request.param}")), float16=True)
    assert model.unet.conv_in.weight.dtype == mx.float16  # the UNet itself does run in float16
    return model


def assert_float32_between_steps(latents: list, calls: int):
    assert len(latents) == calls  # one latent per UNet call (PNDM: steps + 1; 2nd-order samplers: 2 steps - 1)
    for x in latents:
        assert x.dtype == mx.float32
        # Carried at float32 precision, not rounded through float16 and cast back.
        held = np.array(x)
        assert np.isfinite(held).all()
        assert (held != held.astype(np.float16).astype(np.float32)).any()


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_float16_txt2img_keeps_the_latents_float32_at_every_step(float16_model, sampler):
    latents = run_latents(
        float16_model.generate_latents(
            PROMPT, n_images=2, num_steps=STEPS, cfg_weight=5.0, latent_size=(SIZE // 4, SIZE // 4), seed=1, sampler=sampler
        )
    )
    assert_float32_between_steps(latents, float16_model.denoising_calls(STEPS, sampler=sampler))


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_float16_img2img_keeps_the_latents_float32_at_every_step(float16_model, sampler):
    image = np.random.default_rng(0).uniform(-1, 1, (SIZE, SIZE, 3)).astype(np.float32)
    latents = run_latents(
        float16_model.generate_latents_from_image(
            image, PROMPT, n_images=2, strength=1.0, num_steps=STEPS, cfg_weight=5.0, seed=2, sampler=sampler
        )
    )
    assert_float32_between_steps(latents, float16_model.denoising_calls(STEPS, strength=1.0, sampler=sampler))

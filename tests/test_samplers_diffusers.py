"""The samplers added for issue 19 against their diffusers classes (``Class.from_config(scheduler_config)``).

Step math: both sides run one trajectory with a stand-in model, a fixed function of the scaled input
and the timestep computed identically in torch and MLX (test_sampler.py's), and the stochastic
samplers get the same torch-drawn noise on both sides. Then one whole-pipeline run per sampler on the
tiny SD 1 (epsilon) and SD 2 (v-prediction) models, with injected noise.

Tolerances: float32 latents held to 1e-5 relative, as test_sampler.py. Each step is a handful of
float32 operations on both sides (each rounding costs at most 2**-24 relative) whose results differ
by a few roundings; 1e-5 is ~170 of them, with room for what 30 steps accumulate. No first-step
cancellation arises here: the configs are not zero-SNR (sigma_max ~ 14.6, not 4096). LMS's weights
are exact integrals on our side and scipy's quad of a float32-evaluated polynomial in diffusers:
they differ by ~1e-7 relative (float32 evaluation), a term of ~1e-7 * |h * derivative| per step.
"""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
import scipy.stats
import diffusers
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

import tiny_models
from parity import nhwc, reference_pipeline, relative_error, run_latents, torch_step_noise
from stable_diffusion import StableDiffusion
from stable_diffusion.hub_configs import CONFIGS_DIR
from stable_diffusion.sampler import SAMPLERS, beta_ppf, make_sampler

# diffusers' schedulers call np.array() on torch tensors, which numpy 2 warns about.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning"),
]

NEW = {
    "pndm": PNDMScheduler,
    "lms": LMSDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "dpm2": KDPM2DiscreteScheduler,
    "dpm2_a": KDPM2AncestralDiscreteScheduler,
    "lcm": LCMScheduler,
}
SIGMA_BASED = {
    "euler": EulerDiscreteScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
    "lms": LMSDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "dpm2": KDPM2DiscreteScheduler,
    "dpm2_a": KDPM2AncestralDiscreteScheduler,
}
CONFIGS = {
    "sd1": tiny_models.SD1_SCHEDULER,  # the real SD 1.5 PNDM config, epsilon
    # SD 2.1 (v-prediction); skip_prk_steps as SD 2.1-base's PNDM config sets it.
    "sd2": dict(tiny_models.SD2_SCHEDULER, skip_prk_steps=True),
}
SHAPE = (1, 4, 6, 6)
SLOPE = 0.3
RTOL = 1e-5


def model_output(x, t: float):
    """The stand-in denoiser, the same function of (scaled input, timestep) on both sides."""
    return SLOPE * x + math.sin(t / 100)


def build(name: str, config: dict, reference=None):
    """diffusers' scheduler (``reference`` or the sampler's class) and ours, from one config dict."""
    cls = reference or {**NEW, **SIGMA_BASED}[name]
    return cls.from_config(dict(config)), make_sampler(name, dict(config))


def run_both(ref, ours, num_steps: int, start: int = 0, x_start=None):
    """Step both from index ``start`` (set_timesteps already called); ``x_start`` is the pair of start latents."""
    if hasattr(ref, "set_begin_index"):  # step by index, as ours and as the img2img pipelines do
        ref.set_begin_index(start)
    if x_start is None:
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        x_ref, x = noise * ref.init_noise_sigma, mx.array(noise.numpy()) * ours.init_noise_sigma
    else:
        x, x_ref = x_start
    errors = []
    for i in range(start, len(ref.timesteps)):
        t = ref.timesteps[i]
        out_ref = model_output(ref.scale_model_input(x_ref, t), float(t))
        out = model_output(ours.scale_model_input(x, i), float(ours.timesteps[i].item()))
        if ours.needs_noise:
            # diffusers draws with randn_tensor from the generator it is given, when the step uses noise.
            noise = randn_tensor(SHAPE, generator=torch.Generator().manual_seed(1000 + i), dtype=out_ref.dtype)
            x_ref = ref.step(out_ref, t, x_ref, generator=torch.Generator().manual_seed(1000 + i)).prev_sample
            x = ours.step(out, i, x, mx.array(noise.numpy()))
        else:
            x_ref = ref.step(out_ref, t, x_ref).prev_sample
            x = ours.step(out, i, x)
        errors.append(relative_error(x, x_ref))
    return errors


def assert_same_schedule(ref, ours):
    assert ours.timesteps.dtype == mx.float32 and ours.timesteps.shape == tuple(ref.timesteps.shape)
    np.testing.assert_allclose(np.array(ours.timesteps), ref.timesteps.double().numpy(), rtol=1e-6, atol=1e-4)
    assert ours.order == ref.order
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", list(NEW))
def test_new_sampler_trajectory_matches_diffusers(name, config_name):
    for num_steps in (1, 2, 7, 30):
        ref, ours = build(name, CONFIGS[config_name])
        ref.set_timesteps(num_steps)
        ours.set_timesteps(num_steps)
        assert_same_schedule(ref, ours)
        errors = run_both(ref, ours, num_steps)
        assert max(errors) <= RTOL, (num_steps, errors)


def test_pndm_calls_the_unet_n_plus_one_times_repeating_the_second_highest_timestep():
    ref, ours = build("pndm", CONFIGS["sd1"])
    ours.set_timesteps(5)
    assert np.array(ours.timesteps).tolist() == [801, 601, 601, 401, 201, 1]  # leading, steps_offset 1
    ours.set_timesteps(1)
    assert np.array(ours.timesteps).tolist() == [1]


@pytest.mark.parametrize("name", ["lms", "heun", "lcm"])
def test_sample_prediction_matches_diffusers(name):
    ref, ours = build(name, dict(tiny_models.SD1_SCHEDULER, prediction_type="sample"))
    ref.set_timesteps(8)
    ours.set_timesteps(8)
    assert max(run_both(ref, ours, 8)) <= RTOL


@pytest.mark.parametrize(
    "name, options",
    [
        ("heun", dict(clip_sample=True, clip_sample_range=0.5)),
        ("lcm", dict(clip_sample=True, clip_sample_range=0.5)),
        ("lcm", dict(set_alpha_to_one=False)),
        ("pndm", dict(set_alpha_to_one=True)),
    ],
)
def test_clip_and_final_alpha_options_match_diffusers(name, options):
    ref, ours = build(name, dict(tiny_models.SD1_SCHEDULER, **options))
    ref.set_timesteps(6)
    ours.set_timesteps(6)
    assert max(run_both(ref, ours, 6)) <= RTOL


def test_lcm_original_steps_and_timestep_scaling_match_diffusers():
    # A small timestep_scaling gives the boundary condition weight (at the default 10, c_skip < 1e-5).
    config = dict(tiny_models.SD1_SCHEDULER, original_inference_steps=20, timestep_scaling=0.05)
    ref, ours = build("lcm", config)
    for num_steps in (3, 20):
        ref.set_timesteps(num_steps)
        ours.set_timesteps(num_steps)
        assert_same_schedule(ref, ours)
        assert max(run_both(ref, ours, num_steps)) <= RTOL
    with pytest.raises(ValueError, match="original_inference_steps"):
        ours.set_timesteps(21)


def with_schedule(config: dict, schedule: str) -> dict:
    if schedule == "sgm_uniform":
        return dict(config, timestep_spacing="trailing")
    return dict(config, **{f"use_{schedule}_sigmas": True})


@pytest.mark.parametrize("schedule", ["karras", "exponential", "beta", "sgm_uniform"])
@pytest.mark.parametrize("name", list(SIGMA_BASED))
def test_schedule_types_match_diffusers(name, schedule):
    for config_name, num_steps in (("sd1", 1), ("sd2", 7)):
        ref, ours = build(name, with_schedule(CONFIGS[config_name], schedule))
        ref.set_timesteps(num_steps)
        ours.set_timesteps(num_steps)
        assert_same_schedule(ref, ours)
        np.testing.assert_allclose(np.array(ours.sigmas), ref.sigmas.double().numpy()[: len(ours.sigmas)], rtol=1e-6)
        assert max(run_both(ref, ours, num_steps)) <= RTOL


@pytest.mark.parametrize("schedule", ["karras", "exponential", "beta"])
def test_euler_ancestral_takes_the_schedule_flags_with_eulers_sigmas(schedule):
    """diffusers' EulerAncestralDiscreteScheduler has no such flags: ours steps on EulerDiscreteScheduler's sigmas."""
    config = with_schedule(CONFIGS["sd1"], schedule)
    schedule_ref = EulerDiscreteScheduler.from_config(config)
    ref, ours = build("euler_a", config, EulerAncestralDiscreteScheduler)
    schedule_ref.set_timesteps(7)
    ref.set_timesteps(7)
    ref.sigmas, ref.timesteps = schedule_ref.sigmas, schedule_ref.timesteps
    ours.set_timesteps(7)
    assert_same_schedule(ref, ours)
    assert max(run_both(ref, ours, 7)) <= RTOL


def test_beta_quantile_matches_scipy():
    """scipy's beta.ppf is boost's ibeta_inv (float64, ~1e-15); ours bisects our continued fraction to float64
    resolution. The fraction's I_x(a, b) is within ~1e-14 of the exact value, which moves the quantile by
    1e-14 / density: the Beta(0.6, 0.6) density is >= 0.72 (its minimum, at x = 0.5), so <= ~2e-14."""
    q = np.concatenate([np.linspace(0, 1, 101), [1e-12, 1e-6, 0.5 - 1e-9, 1 - 1e-6, 1 - 1e-12]])
    ours = np.array([beta_ppf(float(p), 0.6, 0.6) for p in q])
    np.testing.assert_allclose(ours, scipy.stats.beta.ppf(q, 0.6, 0.6), rtol=0, atol=1e-13)
    assert beta_ppf(0.3, 2.0, 5.0) == pytest.approx(scipy.stats.beta.ppf(0.3, 2.0, 5.0), abs=1e-13)


def img2img_start(num_steps: int, strength: float) -> int:
    """diffusers' img2img get_timesteps: t_start."""
    init_timestep = min(int(num_steps * strength), num_steps)
    return max(num_steps - init_timestep, 0)


@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", list(NEW))
def test_img2img_from_the_order_aware_start_matches_diffusers(name, config_name, strength):
    num_steps = 10
    ref, ours = build(name, CONFIGS[config_name])
    ref.set_timesteps(num_steps)
    ours.set_timesteps(num_steps)
    start = img2img_start(num_steps, strength) * ref.order  # as StableDiffusionImg2ImgPipeline.get_timesteps
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(start)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    x_ref = ref.add_noise(x0, noise, ref.timesteps[start : start + 1])
    x = ours.add_noise(mx.array(x0.numpy()), mx.array(noise.numpy()), start)
    assert relative_error(x, x_ref) <= 1e-6  # one multiply-add of float32 values equal to ~1 ulp
    assert max(run_both(ref, ours, num_steps, start, (x, x_ref))) <= RTOL


@pytest.mark.parametrize("name", list(NEW))
def test_a_reused_sampler_starts_each_run_afresh(name):
    """The multistep history and the held 2nd-order state belong to one run: a new run starts clean."""
    ref, ours = build(name, CONFIGS["sd1"])
    ref.set_timesteps(4)
    ours.set_timesteps(4)
    run_both(ref, ours, 4)
    ref, _ = build(name, CONFIGS["sd1"])
    ref.set_timesteps(5)
    ours.set_timesteps(5)
    assert max(run_both(ref, ours, 5)) <= RTOL


@pytest.mark.parametrize("name", ["dpm2_a", "lcm"])
def test_stochastic_step_without_noise_raises(name):
    sampler = make_sampler(name, CONFIGS["sd1"])
    sampler.set_timesteps(3)
    x = mx.zeros(SHAPE)
    sampler.step(x, 0, x, mx.zeros(SHAPE))
    with pytest.raises(ValueError, match="noise"):
        sampler.step(x, 1, x)


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_pndm_runge_kutta_warm_up_matches_diffusers(config_name):
    """skip_prk_steps=False (PNDMScheduler's default): 3 Runge-Kutta steps of 4 calls, then PLMS."""
    config = dict(CONFIGS[config_name], skip_prk_steps=False)
    for num_steps in (4, 7, 30):
        ref, ours = build("pndm", config)
        ref.set_timesteps(num_steps)
        ours.set_timesteps(num_steps)
        assert_same_schedule(ref, ours)
        assert len(ours.timesteps) == num_steps + 9
        assert max(run_both(ref, ours, num_steps)) <= RTOL
    with pytest.raises(ValueError, match="num_steps >= 4"):  # diffusers fails on a shape mismatch there
        ours.set_timesteps(3)


# Whole pipeline --------------------------------------------------------------------------------

SIZE = 32  # pixels; latents 8x8
PROMPT = "A photo of an astronaut riding a horse on Mars."


def dpm2_a_step_noise(seed: int, num_steps: int):
    """diffusers' KDPM2 ancestral draws at the second call of each step (odd indices): those draws, by index."""
    generator = torch.Generator().manual_seed(seed)
    draws = [torch.randn((1, 4, SIZE // 4, SIZE // 4), generator=generator) for _ in range(num_steps - 1)]
    return lambda i, shape: nhwc(draws[(i - 1) // 2]) if i % 2 else mx.zeros(shape)


@pytest.fixture(scope="module")
def pipelines(request):
    """Per flavour, our facade and diffusers' pipeline on the tiny model, loaded once (each test picks its sampler)."""
    loaded = {}

    def get(flavour: str):
        if flavour not in loaded:
            folder = request.getfixturevalue(f"tiny_{flavour}")
            pipe = reference_pipeline(folder)
            loaded[flavour] = StableDiffusion(str(folder)), pipe, pipe.scheduler
        return loaded[flavour]

    return get


@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
@pytest.mark.parametrize("name", list(NEW))
def test_txt2img_with_each_new_sampler_matches_diffusers(pipelines, name, flavour):
    sd, pipe, own_scheduler = pipelines(flavour)
    steps = 4
    init = torch.randn((1, 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(5))
    step_noise = dpm2_a_step_noise(11, steps) if name == "dpm2_a" else torch_step_noise(seed=11)

    # pndm on SD 1: no sampler named on either side, so the folder's own PNDMScheduler (skip_prk_steps), as
    # DiffusionPipeline.from_pretrained builds it. The tiny SD 2's config (Euler's) has no skip_prk_steps: PRK.
    default = (name, flavour) == ("pndm", "sd1")
    latents = run_latents(
        sd.generate_latents(PROMPT, num_steps=steps, latent_size=(SIZE // 4, SIZE // 4), latents=nhwc(init), step_noise=step_noise, sampler=None if default else name)
    )

    scheduler = type(own_scheduler).from_config(own_scheduler.config) if default else NEW[name].from_config(own_scheduler.config)
    assert type(scheduler) is NEW[name]
    pipe.scheduler = scheduler
    ref = pipe(PROMPT, num_inference_steps=steps, height=SIZE, width=SIZE, latents=init.clone(), generator=torch.Generator().manual_seed(11), output_type="latent").images
    assert len(latents) == len(scheduler.timesteps)
    assert relative_error(latents[-1], nhwc(ref)) <= 1e-4


@pytest.mark.parametrize("name", ["pndm", "ddim"])
def test_steps_past_the_schedule_are_refused_in_one_line(name):
    """SD 1.5's config ("leading", steps_offset 1) at 1000 steps reaches timestep 1000, which diffusers'
    PNDM and DDIM index out of range (IndexError mid-run); we refuse it at set_timesteps."""
    config = json.loads((CONFIGS_DIR / "stable-diffusion-v1-5" / "scheduler" / "scheduler_config.json").read_text())
    reference = getattr(diffusers, SAMPLERS[name].diffusers_class).from_config(config)
    reference.set_timesteps(1000)
    assert int(reference.timesteps.max()) == 1000 == reference.config.num_train_timesteps  # past alphas_cumprod[999]
    sampler = make_sampler(name, config)
    with pytest.raises(ValueError, match=r"^\S+: 1000 steps with steps_offset=1 reach timestep 1000, past the schedule's last \(999\); use at most 999 steps$"):
        sampler.set_timesteps(1000)
    sampler.set_timesteps(999)
    assert int(np.array(sampler.timesteps).max()) == 999

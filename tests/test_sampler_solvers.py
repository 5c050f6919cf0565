"""The solvers of sampler_solvers.py against their references.

diffusers' schedulers built by ``Class.from_config(scheduler_config)`` (DPM++ 2M SDE, DPM++ SDE,
UniPC, DEIS) and k-diffusion's ``sample_dpmpp_2s_ancestral`` (DPM++ 2S a, which diffusers lacks).
Both sides run the same trajectory: the "model output" is a fixed function of the scaled input and
the timestep, computed identically in torch and MLX, and each call's noise is one torch draw given
to both (diffusers' DPMSolverSDEScheduler gets it through its noise sampler, patched).

Tolerance: both sides compute each step with the same float32 operations on the same float32
schedule, each op rounded once (u = 2**-24 ~ 6e-8 relative), in a different order or with an
ulp-different libm here and there. A step is ~20 such ops on values no larger than |x|, and the
schedules here start at sigma <= 14.6 (no zero-SNR cancellation, see test_sampler.py), so one step
differs by at most ~40 u |x| ~ 2.4e-6 |x|; the solvers contract errors (|dx'/dx| <= 1, the
stand-in's slope is 0.3), so the difference stays below 1e-5 of max |x| along a run. The whole
pipeline adds the UNet's float32 error: 1e-4 as tests/test_pipeline.py.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import (
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

import tiny_models
from kdiffusion_ref import external, sampling
from parity import nhwc, reference_pipeline, relative_error, run_latents, torch_step_noise
from stable_diffusion import StableDiffusion
from stable_diffusion.sampler_solvers import SOLVERS, make_solver

# diffusers' schedulers call np.array() on torch tensors, which numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

REFERENCE = {
    "dpm++2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpm++_sde": (DPMSolverSDEScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "deis": (DEISMultistepScheduler, {}),
}
CONFIGS = {"sd1": tiny_models.SD1_SCHEDULER, "sd2": tiny_models.SD2_SCHEDULER}
SHAPE = (1, 4, 6, 6)
STEP_COUNTS = (1, 2, 7, 30)
RTOL = 1e-5  # see the module docstring
SCHEDULES = ("karras", "exponential", "beta")

SLOPE = 0.3  # d(model output) / d(scaled input) of the stand-in denoiser


def model_output(x, t: float):
    """A stand-in denoiser, the same function of (scaled input, timestep) on both sides."""
    return SLOPE * x + math.sin(t / 100)


def call_noise(i: int) -> torch.Tensor:
    """The unit normal noise of UNet call i, the same on both sides."""
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1000 + i))


def build(name: str, config: dict):
    cls, overrides = REFERENCE[name]
    return cls.from_config(dict(config), **overrides), make_solver(name, dict(config))


def reference_step(ref, out, t, x, noise: torch.Tensor, drawn: list):
    """diffusers' step with ``noise`` as its random draw; ``drawn`` records whether it drew."""
    if isinstance(ref, DPMSolverSDEScheduler):
        ref.noise_sampler = lambda sigma, sigma_next: drawn.append(True) or noise.clone()
        return ref.step(out, t, x).prev_sample
    if ref.config.get("algorithm_type") == "sde-dpmsolver++":
        drawn.append(True)
        return ref.step(out, t, x, variance_noise=noise).prev_sample
    return ref.step(out, t, x).prev_sample


def run_both(ref, ours, num_steps: int, start: int = 0):
    """Step both through a run of ``num_steps`` from step ``start`` (img2img: diffusers' ``t_start``).

    Returns (ours, ref) after every call. A start > 0 noises a fixed x0 to the start as diffusers'
    img2img pipelines do: the first call is index ``start * order`` (their get_timesteps).
    """
    ref.set_timesteps(num_steps)
    ours.set_timesteps(num_steps)
    assert ours.timesteps.shape == tuple(ref.timesteps.shape) and ours.order == ref.order
    np.testing.assert_allclose(np.array(ours.timesteps), ref.timesteps.double().numpy(), rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(np.array(ours.sigmas), ref.sigmas.double().numpy(), rtol=1e-6)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    begin = start * ref.order
    ref.set_begin_index(begin)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    if start == 0:
        x_ref = noise * ref.init_noise_sigma
        x = mx.array(noise.numpy()) * ours.init_noise_sigma
    else:
        x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        x_ref = ref.add_noise(x0, noise, ref.timesteps[begin : begin + 1])
        x = ours.add_noise(mx.array(x0.numpy()), mx.array(noise.numpy()), begin)
        assert relative_error(x, x_ref) <= 1e-6
    trajectory = []
    for i in range(begin, len(ref.timesteps)):
        t = ref.timesteps[i]
        out_ref = model_output(ref.scale_model_input(x_ref, t), float(t))
        out = model_output(ours.scale_model_input(x, i), ours.timesteps[i].item())
        drawn = []
        x_ref = reference_step(ref, out_ref, t, x_ref, call_noise(i), drawn)
        x = ours.step(out, i, x, mx.array(call_noise(i).numpy()) if ours.needs_noise else None)
        if ours.needs_noise:
            assert ours.noise_used(i) == bool(drawn)
        trajectory.append((x, x_ref))
    return trajectory


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", list(REFERENCE))
def test_solver_trajectory_matches_diffusers(name, config_name, prediction_type):
    config = dict(CONFIGS[config_name], prediction_type=prediction_type)
    for num_steps in STEP_COUNTS:
        ref, ours = build(name, config)
        for x, x_ref in run_both(ref, ours, num_steps):
            assert x.dtype == mx.float32
            assert relative_error(x, x_ref) <= RTOL


@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("name", list(REFERENCE))
def test_img2img_start_matches_diffusers(name, strength):
    num_steps = 10
    start = num_steps - min(int(num_steps * strength), num_steps)  # diffusers' get_timesteps
    ref, ours = build(name, CONFIGS["sd2"])
    trajectory = run_both(ref, ours, num_steps, start)
    assert len(trajectory) == len(ref.timesteps) - start * ref.order
    for x, x_ref in trajectory:
        assert relative_error(x, x_ref) <= RTOL


def kdiffusion_denoiser(alphas_cumprod: torch.Tensor, prediction_type: str, timesteps: dict):
    """k-diffusion's model wrapper (eps or v DDPM) around the stand-in denoiser.

    The UNet's timestep of a schedule sigma is diffusers' own (``timesteps``: sigma -> t), which
    k-diffusion's log-sigma inverse only approximates; other sigmas (the midpoints) go through
    k-diffusion's ``sigma_to_t``.
    """
    base = external.DiscreteEpsDDPMDenoiser if prediction_type == "epsilon" else external.DiscreteVDDPMDenoiser

    class Denoiser(base):
        def sigma_to_t(self, sigma, quantize=None):
            if float(sigma) in timesteps:
                return torch.tensor([timesteps[float(sigma)]], dtype=torch.float32)
            return super().sigma_to_t(sigma, quantize)

    return Denoiser(lambda x, t: model_output(x, float(t)), alphas_cumprod, quantize=False)


def run_dpmpp_2s_ancestral(config: dict, num_steps: int, start: int = 0):
    """Ours and k-diffusion's sample_dpmpp_2s_ancestral on EulerAncestralDiscreteScheduler's schedule.

    Returns (ours, ref) at the start of each step after the first, and at the end. k-diffusion's noise
    for step k is our call 2k + 1's (the call that adds it).
    """
    # diffusers' Euler ancestral has no schedule flags: with one, the sigmas are Euler's (ours follow Euler).
    flagged = any(config.get(f"use_{kind}_sigmas") for kind in SCHEDULES)
    schedule = (EulerDiscreteScheduler if flagged else EulerAncestralDiscreteScheduler).from_config(dict(config))
    schedule.set_timesteps(num_steps)
    ours = make_solver("dpm++2s_a", dict(config))
    ours.set_timesteps(num_steps)
    sigmas = schedule.sigmas
    assert len(ours.timesteps) == 2 * num_steps - 1 and ours.order == 2
    np.testing.assert_allclose(np.array(ours.timesteps)[::2], schedule.timesteps.numpy(), rtol=1e-6)
    call_sigmas = np.array(ours.sigmas)  # each call's sigma, then the end
    np.testing.assert_allclose(call_sigmas[:-1:2], sigmas[:-1].numpy(), rtol=1e-6)
    assert call_sigmas[-1] == sigmas[-1] == 0
    assert ours.init_noise_sigma == pytest.approx(float(schedule.init_noise_sigma), rel=1e-6)
    timesteps = {float(s): float(t) for s, t in zip(sigmas[:-1], schedule.timesteps)}
    model = kdiffusion_denoiser(schedule.alphas_cumprod, config.get("prediction_type", "epsilon"), timesteps)

    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    if start == 0:
        x_ref = noise * schedule.init_noise_sigma
        x = mx.array(noise.numpy()) * ours.init_noise_sigma
    else:
        x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        x_ref = x0 + noise * sigmas[start]
        x = ours.add_noise(mx.array(x0.numpy()), mx.array(noise.numpy()), 2 * start)
    starts, noised = [], []  # x at each step's start; the calls whose noise k-diffusion draws

    def noise_sampler(sigma, sigma_next):
        noised.append(2 * (start + len(starts) - 1) + 1)
        return call_noise(noised[-1])

    x_ref = sampling.sample_dpmpp_2s_ancestral(
        model, x_ref, sigmas[start:], disable=True, noise_sampler=noise_sampler, callback=lambda info: starts.append(info["x"].clone())
    )
    ref = starts[1:] + [x_ref]
    assert [i for i in range(2 * start, len(ours.timesteps)) if ours.noise_used(i)] == noised

    got = []
    for i in range(2 * start, len(ours.timesteps)):
        out = model_output(ours.scale_model_input(x, i), ours.timesteps[i].item())
        x = ours.step(out, i, x, mx.array(call_noise(i).numpy()))
        if i % 2 == 1 or i == len(ours.timesteps) - 1:  # a step's end
            got.append(x)
    assert len(got) == len(ref)
    return list(zip(got, ref))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_dpmpp_2s_ancestral_matches_kdiffusion(config_name, prediction_type):
    config = dict(CONFIGS[config_name], prediction_type=prediction_type)
    for num_steps in STEP_COUNTS:
        for x, x_ref in run_dpmpp_2s_ancestral(config, num_steps):
            assert relative_error(x, x_ref) <= RTOL


@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_dpmpp_2s_ancestral_img2img_start_matches_kdiffusion(strength):
    num_steps = 10
    start = num_steps - min(int(num_steps * strength), num_steps)
    for x, x_ref in run_dpmpp_2s_ancestral(CONFIGS["sd2"], num_steps, start):
        assert relative_error(x, x_ref) <= RTOL


def with_schedule(config: dict, schedule: str) -> dict:
    """``config`` with a schedule type: a sigma flag, or trailing spacing (A1111's "SGM Uniform")."""
    if schedule == "trailing":
        return dict(config, timestep_spacing="trailing")
    return dict(config, **{f"use_{schedule}_sigmas": True})


@pytest.mark.parametrize("schedule", [*SCHEDULES, "trailing"])
@pytest.mark.parametrize("name", list(REFERENCE))
def test_schedule_types_match_diffusers(name, schedule):
    config = with_schedule(CONFIGS["sd1"], schedule)
    for num_steps in (2, 7, 30):
        ref, ours = build(name, config)
        for x, x_ref in run_both(ref, ours, num_steps):
            assert relative_error(x, x_ref) <= RTOL


@pytest.mark.parametrize("schedule", [*SCHEDULES, "trailing"])
def test_dpmpp_2s_ancestral_schedule_types_match_kdiffusion(schedule):
    config = with_schedule(CONFIGS["sd2"], schedule)
    for num_steps in (2, 7, 30):
        for x, x_ref in run_dpmpp_2s_ancestral(config, num_steps):
            assert relative_error(x, x_ref) <= RTOL


@pytest.mark.parametrize(
    "name, options",
    [
        ("dpm++2m_sde", dict(solver_type="heun")),
        ("dpm++2m_sde", dict(final_sigmas_type="sigma_min")),
        ("dpm++2m_sde", dict(final_sigmas_type="sigma_min", lower_order_final=False)),
        ("dpm++2m_sde", dict(final_sigmas_type="sigma_min", euler_at_final=True)),
        ("dpm++2m_sde", dict(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)),  # Karras timesteps unrounded
        ("dpm++2m_sde", dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")),
        # bh1 ending at sigma 0 is NaN in diffusers (its last predictor step multiplies B(h) = -inf by 0).
        ("unipc", dict(solver_type="bh1", final_sigmas_type="sigma_min")),
        ("unipc", dict(solver_order=1)),
        ("unipc", dict(final_sigmas_type="sigma_min", lower_order_final=False)),
        ("unipc", dict(final_sigmas_type="sigma_min", use_karras_sigmas=True)),
        ("unipc", dict(solver_type="midpoint")),  # a DPM-Solver config's: UniPC takes it as bh2
        ("unipc", dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")),
        ("deis", dict(solver_order=1)),
        ("deis", dict(lower_order_final=False)),
        ("deis", dict(algorithm_type="dpmsolver++", solver_type="midpoint")),  # DEIS takes them as deis, logrho
        ("deis", dict(rescale_betas_zero_snr=True, final_sigmas_type="sigma_min")),  # not DEIS settings: ignored
        ("dpm++_sde", dict(rescale_betas_zero_snr=True)),  # not a DPMSolverSDEScheduler setting: ignored
        ("dpm++_sde", dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02)),
    ],
)
def test_solver_options_match_diffusers(name, options):
    for num_steps in (5, 20):  # the multistep solvers' last step is second order from 15 steps on
        ref, ours = build(name, dict(CONFIGS["sd1"], **options))
        for x, x_ref in run_both(ref, ours, num_steps):
            assert relative_error(x, x_ref) <= RTOL


CONFIG_CLASSES = {
    **{name: (cls, overrides) for name, (cls, overrides) in REFERENCE.items()},
    "dpm++2s_a": (EulerAncestralDiscreteScheduler, {}),  # the schedule's class
}
DPM_CONFIG = dict(tiny_models.SD1_SCHEDULER, _class_name="DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_type="midpoint")


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("config", [{}, tiny_models.SD1_SCHEDULER, tiny_models.SD2_SCHEDULER, DPM_CONFIG], ids=["empty", "sd1", "sd2", "dpm"])
def test_solver_settings_are_what_diffusers_from_config_holds(name, config):
    cls, overrides = CONFIG_CLASSES[name]
    ref = cls.from_config(dict(config), **overrides).config
    ours = make_solver(name, dict(config)).config
    compared = [field for field in ref if hasattr(ours, field)]
    assert {"beta_start", "beta_end", "timestep_spacing", "prediction_type"} <= set(compared)
    for field in compared:
        assert getattr(ours, field) == ref[field], field


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("unipc", dict(disable_corrector=[1]), "disable_corrector"),
        ("unipc", dict(predict_x0=False), "predict_x0"),
        ("unipc", dict(solver_order=3), "solver_order"),
        ("deis", dict(solver_order=3), "solver_order"),
        ("dpm++_sde", dict(prediction_type="sample"), "prediction_type"),
        ("dpm++2s_a", dict(prediction_type="sample"), "prediction_type"),
        ("dpm++2m_sde", dict(use_karras_sigmas=True, use_beta_sigmas=True), "at most one"),
    ],
)
def test_unsupported_solver_settings_raise(name, options, message):
    with pytest.raises(ValueError, match=message):
        make_solver(name, dict(tiny_models.SD1_SCHEDULER, **options))


def test_unknown_solver_name_lists_the_valid_names():
    with pytest.raises(ValueError, match="dpm\\+\\+2m_sde, dpm\\+\\+_sde, dpm\\+\\+2s_a, unipc, deis"):
        make_solver("heun", tiny_models.SD1_SCHEDULER)


@pytest.mark.parametrize("name", [name for name, cls in SOLVERS.items() if cls.needs_noise])
def test_stochastic_solver_step_without_noise_raises(name):
    sampler = make_solver(name, tiny_models.SD1_SCHEDULER)
    sampler.set_timesteps(3)
    x = mx.zeros(SHAPE)
    with pytest.raises(ValueError, match="noise"):
        for i in range(len(sampler.timesteps)):
            x = sampler.step(x, i, x)


@pytest.mark.parametrize("name", ["dpm++_sde", "dpm++2s_a"])
def test_second_call_of_a_step_without_its_first_raises(name):
    sampler = make_solver(name, tiny_models.SD1_SCHEDULER)
    sampler.set_timesteps(3)
    x = mx.zeros(SHAPE)
    with pytest.raises(ValueError, match="call step\\(2\\) first"):
        sampler.step(x, 3, x, x)


# Whole pipeline: our facade with each solver vs diffusers' pipeline with its class ---------------

SIZE = 32  # pixels; the tiny VAE downsamples 4x, so latents are 8x8
PROMPT = "A photo of an astronaut riding a horse on Mars."
PIPELINE_STEPS = 5


@pytest.fixture
def sequential_brownian_noise(monkeypatch):
    """diffusers' DPMSolverSDEScheduler draws from a Brownian tree; make it draw unit normals from
    torch.Generator(11) in call order, as ``torch_step_noise(11)`` gives ours."""
    import diffusers.schedulers.scheduling_dpmsolver_sde as module

    class NoiseSampler:
        def __init__(self, x, *args, **kwargs):
            self.shape, self.generator = x.shape, torch.Generator().manual_seed(11)

        def __call__(self, sigma, sigma_next):
            return torch.randn(self.shape, generator=self.generator)

    monkeypatch.setattr(module, "BrownianTreeNoiseSampler", NoiseSampler)


def our_latents(folder, name: str, init: torch.Tensor, step_noise):
    sd = StableDiffusion(str(folder), sampler=name)
    latent_size = (SIZE // 4, SIZE // 4)
    latents = run_latents(
        sd.generate_latents(PROMPT, num_steps=PIPELINE_STEPS, latent_size=latent_size, latents=nhwc(init), step_noise=step_noise)
    )
    assert len(latents) == (2 * PIPELINE_STEPS - 1 if SOLVERS[name].order == 2 else PIPELINE_STEPS)  # one per UNet call
    return latents[-1]


@pytest.mark.parametrize("name", list(REFERENCE))
@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_txt2img_with_each_solver_matches_diffusers(request, sequential_brownian_noise, flavour, name):
    folder = request.getfixturevalue(f"tiny_{flavour}")
    init = torch.randn((1, 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(5))
    latents = our_latents(folder, name, init, torch_step_noise(seed=11))

    cls, overrides = REFERENCE[name]
    pipe = reference_pipeline(folder)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **overrides)
    ref = pipe(
        PROMPT, num_inference_steps=PIPELINE_STEPS, height=SIZE, width=SIZE, latents=init.clone(),
        generator=torch.Generator().manual_seed(11), output_type="latent",
    ).images
    assert relative_error(latents, nhwc(ref)) <= 1e-4


@pytest.mark.parametrize("flavour", ["sd1", "sd2"])
def test_txt2img_with_dpmpp_2s_ancestral_matches_kdiffusion(request, flavour):
    """k-diffusion's sampler on diffusers' UNet and text encoder, with classifier-free guidance (7.5)."""
    folder = request.getfixturevalue(f"tiny_{flavour}")
    init = torch.randn((1, 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(5))
    noise = lambda i: torch.randn(init.shape, generator=torch.Generator().manual_seed(100 + i))  # noqa: E731
    latents = our_latents(folder, "dpm++2s_a", init, lambda i, shape: nhwc(noise(i)))

    pipe = reference_pipeline(folder)
    schedule = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    schedule.set_timesteps(PIPELINE_STEPS)
    with torch.no_grad():
        text, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True)
        context = torch.cat([uncond, text])

        def guided(x, t):
            out = pipe.unet(torch.cat([x, x]), t.expand(2), encoder_hidden_states=context).sample
            out_uncond, out_text = out.chunk(2)
            return out_uncond + 7.5 * (out_text - out_uncond)

        timesteps = {float(s): float(t) for s, t in zip(schedule.sigmas[:-1], schedule.timesteps)}
        model = kdiffusion_denoiser(schedule.alphas_cumprod, pipe.scheduler.config.prediction_type, timesteps)
        model.inner_model = guided
        steps = iter(range(PIPELINE_STEPS))
        ref = sampling.sample_dpmpp_2s_ancestral(
            model, init * schedule.init_noise_sigma, schedule.sigmas, disable=True,
            noise_sampler=lambda sigma, sigma_next: noise(2 * next(steps) + 1),
        )
    assert relative_error(latents, nhwc(ref)) <= 1e-4


@pytest.fixture
def posterior_mean_img2img(monkeypatch):
    """diffusers' img2img samples the VAE posterior; we start from its mean. Make diffusers do the same."""
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as module

    retrieve = module.retrieve_latents
    monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None, sample_mode="sample": retrieve(out, generator, "argmax"))


@pytest.mark.parametrize("name", ["dpm++_sde", "unipc"])  # order 2 (two calls a step) and order 1
def test_img2img_with_a_solver_starts_where_diffusers_does(tiny_sd2, posterior_mean_img2img, sequential_brownian_noise, name):
    steps, strength = 8, 0.75  # diffusers runs the last 6 steps: from call 2 * 2 = 4 (DPM++ SDE), from step 2 (UniPC)
    image = np.random.default_rng(0).uniform(0, 1, (SIZE, SIZE, 3)).astype(np.float32)
    noise = torch.randn((1, 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(7))
    sd = StableDiffusion(str(tiny_sd2), sampler=name)
    latents = run_latents(
        sd.generate_latents_from_image(
            mx.array(image * 2 - 1), PROMPT, strength=strength, num_steps=steps, noise=nhwc(noise), step_noise=torch_step_noise(seed=11)
        )
    )
    cls, overrides = REFERENCE[name]
    pipe = reference_pipeline(tiny_sd2, img2img=True)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **overrides)
    ref = pipe(
        PROMPT, image=image[None], strength=strength, num_inference_steps=steps, generator=torch.Generator().manual_seed(7), output_type="latent"
    ).images
    assert len(latents) == 6 * SOLVERS[name].order - (SOLVERS[name].order - 1)  # DPM++ SDE's last step is one call
    assert relative_error(latents[-1], nhwc(ref)) <= 1e-4


def test_dpmpp_sde_refuses_sigmas_that_do_not_end_at_zero():
    sampler = make_solver("dpm++_sde", tiny_models.SD1_SCHEDULER)
    with pytest.raises(ValueError, match="end at 0"):
        sampler.set_sigmas(np.array([14.6, 1.0, 0.03]), np.array([999.0, 500.0]))


@pytest.mark.parametrize("name", [name for name, cls in SOLVERS.items() if cls.needs_noise])
def test_stochastic_solver_draws_each_calls_noise_from_the_seed(tiny_sd1, name):
    """Without injected noise the seed gives every UNet call (2n - 1 for the two-call solvers) its noise, reproducibly."""
    sd = StableDiffusion(str(tiny_sd1), sampler=name)
    run = lambda seed: run_latents(sd.generate_latents(PROMPT, num_steps=3, latent_size=(SIZE // 4, SIZE // 4), seed=seed))[-1]  # noqa: E731
    first, again, other = run(1), run(1), run(2)
    assert np.isfinite(np.array(first)).all()
    assert mx.array_equal(first, again) and not mx.array_equal(first, other)  # the seed decides the run

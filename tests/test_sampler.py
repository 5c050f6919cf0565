"""Sampler parity with diffusers' schedulers built by ``Class.from_config(scheduler_config)``.

Both sides run the same trajectory: the "model output" is a fixed function of the scaled input
and the timestep, computed identically in torch and MLX, and Euler ancestral gets the same
torch-drawn noise on both sides.
"""

import dataclasses
import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

import tiny_models
from parity import relative_error
from stable_diffusion.config import SchedulerConfig
from stable_diffusion.sampler import (
    DDIMSampler,
    DPMPP2MSampler,
    EulerAncestralSampler,
    EulerSampler,
    LMSSampler,
    PNDMSampler,
    make_betas,
    make_sampler,
)

# diffusers' schedulers call np.array() on torch tensors, which numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

REFERENCE = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
TURBO_SCHEDULER = dict(  # sdxl-turbo-like
    _class_name="EulerAncestralDiscreteScheduler",
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    timestep_spacing="trailing",
)
CONFIGS = {"sd1": tiny_models.SD1_SCHEDULER, "sd2": tiny_models.SD2_SCHEDULER, "turbo": TURBO_SCHEDULER}
# (sampler, use_karras_sigmas): Karras sigmas exist only in diffusers' Euler and DPM-Solver.
SAMPLER_VARIANTS = [
    ("euler", False),
    ("euler", True),
    ("euler_a", False),
    ("ddim", False),
    ("dpm++2m", False),
    ("dpm++2m", True),
]
SHAPE = (1, 4, 6, 6)
STEP_COUNTS = (1, 4, 25)


SLOPE = 0.3  # d(model output) / d(scaled input) of the stand-in denoiser
FLOAT32_U = 2.0**-24  # float32 unit roundoff: one rounding costs at most this relative error


def model_output(x, t: float):
    """A stand-in denoiser, the same function of (scaled input, timestep) on both sides."""
    return SLOPE * x + math.sin(t / 100)


def build(name: str, config: dict):
    cls, overrides = REFERENCE[name]
    return cls.from_config(dict(config), **overrides), make_sampler(name, dict(config))


def assert_same_schedule(ref, ours, num_steps: int):
    assert ours.timesteps.dtype == mx.float32 and ours.timesteps.shape == (num_steps,)
    np.testing.assert_allclose(np.array(ours.timesteps), ref.timesteps.double().numpy(), rtol=1e-6, atol=1e-4)
    if hasattr(ref, "sigmas") and not isinstance(ref, DDIMScheduler):
        np.testing.assert_allclose(np.array(ours.sigmas), ref.sigmas.double().numpy(), rtol=1e-6)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)


def denoised_slope(sigma: float, prediction_type: str) -> float:
    """d(x0 estimate)/dx of the stand-in denoiser at noise level ``sigma`` (Euler's c_in = 1 / sqrt(sigma^2 + 1))."""
    c_in = 1 / math.sqrt(sigma * sigma + 1)
    if prediction_type == "epsilon":  # x - sigma * eps
        return 1 - sigma * SLOPE * c_in
    if prediction_type == "v_prediction":  # -sigma * c_in * v + c_in^2 * x
        return (1 - SLOPE * sigma) * c_in * c_in
    return SLOPE * c_in  # "sample": the output is the estimate


def first_step_cancellation(ours, x_init_max: float) -> list:
    """Per step, a bound on |ours - ref| left by the rounding of the first Euler step (absolute, float64).

    The first step from sigma s is x1 = x + d * (s1 - s) with d = (x - x0) / s and x = s * noise: at zero
    terminal SNR s = 4096 and x1 (~60) is the difference of two numbers of size |x| (~1e4). On each side,
    rounding x - x0, (.) / s, s1 - s and d * (s1 - s) costs up to u |x| each (u = 2**-24), 4 u |x| in all;
    the last addition costs u |x1|, like any step's roundings (the flat 1e-5). The two sides' roundings
    are the same only while their sigmas are bit for bit the same, and they cannot be on every CPU:
    diffusers' float32 sqrt (torch's ``** 0.5``, MKL's vsSqrt on x86) is not correctly rounded on MKL's
    generic path (taken on AMD CPUs, or with MKL_ENABLE_INSTRUCTIONS=SSE4_2): sqrt(2**24 - 1) gives 4096.0
    there and 4095.99976 (the correctly rounded value, numpy's and ours) on MKL's AVX2/AVX-512 paths.
    So the first step may leave 2 * 4 u max|x| between the sides. A later step maps an error e in x to
    g e, g = s'/s + k (1 - s'/s) (s' = sigma_down for Euler ancestral, k = denoised_slope), and the
    stand-in's k lies in [-0.03, 1], so |g| <= 1 and the bound is carried as |g| times itself. DDIM and
    DPM-Solver start at sigma 1 (init_noise_sigma = 1): their first step subtracts nothing large.
    """
    if not isinstance(ours, EulerSampler):
        return [0.0] * len(ours.timesteps)
    sigmas = ours._sigmas
    sigmas_to = ours._sigma_down if isinstance(ours, EulerAncestralSampler) else sigmas[1:]
    bound, bounds = 2 * 4 * FLOAT32_U * x_init_max, []
    for i in range(len(sigmas) - 1):
        if i > 0:
            r = float(sigmas_to[i] / sigmas[i])
            bound *= abs(r + denoised_slope(float(sigmas[i]), ours.config.prediction_type) * (1 - r))
        bounds.append(bound)
    return bounds


def run_both(ref, ours, num_steps: int, dtype=torch.float32, seed: int = 0):
    """Step both samplers through a whole trajectory.

    Returns (ours, ref, rtol) after every step: rtol is the relative error the float32 arithmetic allows
    (1e-5, plus what the first step's cancellation may leave: ``first_step_cancellation``).
    """
    ref.set_timesteps(num_steps)
    ours.set_timesteps(num_steps)
    assert_same_schedule(ref, ours, num_steps)
    if hasattr(ref, "set_begin_index"):
        # Step by index like ours: diffusers otherwise looks the first timestep up, which picks the
        # wrong step when timesteps repeat (DPM-Solver with cosine betas and Karras sigmas).
        ref.set_begin_index(0)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)
    x_ref = noise * ref.init_noise_sigma
    x = mx.array(noise.float().numpy()).astype(mx.float16 if dtype == torch.float16 else mx.float32)
    x = x * ours.init_noise_sigma
    x_init = np.array(x.astype(mx.float32))
    trajectory = []
    for i, t in enumerate(ref.timesteps):
        out_ref = model_output(ref.scale_model_input(x_ref, t), float(t))
        out = model_output(ours.scale_model_input(x, i), float(ours.timesteps[i].item()))
        if ours.needs_noise:
            # Drawn as diffusers' step draws it (randn_tensor in the model output's dtype): some torch
            # versions draw float16 normals differently from float32 ones rounded to float16.
            step_noise = randn_tensor(SHAPE, generator=torch.Generator().manual_seed(1000 + i), dtype=out_ref.dtype)
            x_ref = ref.step(out_ref, t, x_ref, generator=torch.Generator().manual_seed(1000 + i)).prev_sample
            x = ours.step(out, i, x, mx.array(step_noise.float().numpy()).astype(out.dtype))
        else:
            x_ref = ref.step(out_ref, t, x_ref).prev_sample
            x = ours.step(out, i, x)
        trajectory.append((x, x_ref))
    cancellation = first_step_cancellation(ours, float(np.abs(x_init).max()))
    return [(x, x_ref, 1e-5 + c / float(x_ref.abs().max())) for (x, x_ref), c in zip(trajectory, cancellation)]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", [None, "linspace", "leading", "trailing"])
@pytest.mark.parametrize("name, karras", SAMPLER_VARIANTS)
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_sampler_trajectory_matches_diffusers(config_name, name, karras, spacing, prediction_type):
    config = dict(CONFIGS[config_name], prediction_type=prediction_type, use_karras_sigmas=karras)
    if spacing is None:  # missing -> the target class's own default
        config.pop("timestep_spacing", None)
    else:
        config["timestep_spacing"] = spacing
    for num_steps in STEP_COUNTS:
        ref, ours = build(name, config)
        for x, x_ref, rtol in run_both(ref, ours, num_steps):
            assert x.dtype == mx.float32
            assert relative_error(x, x_ref) <= rtol


def alphas_cumprod_rtol(config: SchedulerConfig) -> np.ndarray:
    """The relative tolerance of each alphas_cumprod entry: 1e-6, plus what the zero-SNR rescale makes of one float32 ulp.

    The rescale computes ((s - s_T) * s_0 / (s_0 - s_T))**2 from s = sqrt(alphas_cumprod) in float32,
    and torch's float32 sqrt may round 1 ulp away from numpy's (it does on some CPUs). An error of
    eps * s in s and eps * s_T in s_T is an error of eps * (s + s_T) / (s - s_T) relative to s - s_T,
    twice that after squaring: near t = T, where s - s_T is small, up to ~1e-4. The last entry
    (s = s_T) is set exactly on both sides (0, or 2**-24 for the Karras-style samplers).
    """
    alphas_cumprod = np.cumprod(1 - make_betas(dataclasses.replace(config, rescale_betas_zero_snr=False)).astype(np.float64))
    rtol = np.full(alphas_cumprod.shape, 1e-6)
    if config.rescale_betas_zero_snr:
        s = np.sqrt(alphas_cumprod)
        last = s[-1]
        eps = float(np.finfo(np.float32).eps)
        amplified = 2 * eps * (s + last) / np.where(s > last, s - last, np.inf)
        rtol += 4 * amplified  # room for 2 ulps in each sqrt: 1 ulp measured, the rest for the later roundings
    return rtol


@pytest.mark.parametrize("name, karras", SAMPLER_VARIANTS)
@pytest.mark.parametrize(
    "schedule",
    [
        dict(beta_schedule="linear"),  # diffusers' default betas 1e-4 .. 2e-2
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            rescale_betas_zero_snr=True,
            prediction_type="v_prediction",
        ),
    ],
    ids=["linear", "cosine", "zero_snr"],
)
def test_beta_schedules_match_diffusers(schedule, name, karras):
    config = dict(num_train_timesteps=1000, timestep_spacing="trailing", use_karras_sigmas=karras, **schedule)
    alphas_rtol = alphas_cumprod_rtol(SchedulerConfig.from_dict(config))
    for num_steps in (1, 10):
        ref, ours = build(name, config)
        ref_alphas = ref.alphas_cumprod.numpy()
        assert (np.abs(ours.alphas_cumprod - ref_alphas) <= alphas_rtol * np.abs(ref_alphas)).all()
        for x, x_ref, rtol in run_both(ref, ours, num_steps):
            assert relative_error(x, x_ref) <= rtol


@pytest.mark.parametrize("name", ["euler", "ddim", "dpm++2m"])
def test_sample_prediction_matches_diffusers(name):
    ref, ours = build(name, dict(tiny_models.SD1_SCHEDULER, prediction_type="sample"))
    for x, x_ref, rtol in run_both(ref, ours, 8):
        assert relative_error(x, x_ref) <= rtol


@pytest.mark.parametrize("name", ["euler", "dpm++2m"])
@pytest.mark.parametrize(
    "options",
    [
        dict(final_sigmas_type="sigma_min"),
        dict(final_sigmas_type="sigma_min", euler_at_final=True),
        dict(final_sigmas_type="sigma_min", lower_order_final=False),
    ],
    ids=["sigma_min", "sigma_min_euler_at_final", "sigma_min_no_lower_order_final"],
)
def test_final_sigma_options_match_diffusers(name, options):
    for num_steps in (5, 20):  # DPM-Solver's last step is second order from 15 steps on
        ref, ours = build(name, dict(tiny_models.SD2_SCHEDULER, **options))
        for x, x_ref, rtol in run_both(ref, ours, num_steps):
            assert relative_error(x, x_ref) <= rtol


def test_dpm_heun_solver_type_matches_diffusers():
    ref, ours = build("dpm++2m", dict(tiny_models.SD1_SCHEDULER, solver_type="heun"))
    for x, x_ref, rtol in run_both(ref, ours, 10):
        assert relative_error(x, x_ref) <= rtol


@pytest.mark.parametrize("clip_sample, set_alpha_to_one", [(True, False), (False, True)])
def test_ddim_clip_and_final_alpha_match_diffusers(clip_sample, set_alpha_to_one):
    config = dict(
        tiny_models.SD1_SCHEDULER, clip_sample=clip_sample, set_alpha_to_one=set_alpha_to_one, clip_sample_range=0.5
    )
    ref, ours = build("ddim", config)
    for x, x_ref, rtol in run_both(ref, ours, 10):
        assert relative_error(x, x_ref) <= rtol


@pytest.mark.parametrize("name", list(REFERENCE))
def test_float16_trajectory_is_close_and_stays_float16(name):
    ref, ours = build(name, tiny_models.SD1_SCHEDULER)
    for x, x_ref, _ in run_both(ref, ours, 6, dtype=torch.float16):
        assert x.dtype == mx.float16 and x_ref.dtype == torch.float16
        assert np.isfinite(np.array(x.astype(mx.float32))).all()
        assert relative_error(x, x_ref) <= 1e-2


@pytest.mark.parametrize("name", list(REFERENCE))
@pytest.mark.parametrize("config_name", ["sd1", "sd2"])
def test_add_noise_at_img2img_start_matches_diffusers(config_name, name):
    num_steps, start = 10, 4
    ref, ours = build(name, CONFIGS[config_name])
    ref.set_timesteps(num_steps)
    ours.set_timesteps(num_steps)
    if hasattr(ref, "set_begin_index"):  # as StableDiffusionImg2ImgPipeline.get_timesteps does
        ref.set_begin_index(start * ref.order)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    expected = ref.add_noise(x0, noise, ref.timesteps[start : start + 1])
    got = ours.add_noise(mx.array(x0.numpy()), mx.array(noise.numpy()), start)
    assert relative_error(got, expected) <= 1e-6


def test_img2img_trajectory_from_a_start_index_matches_diffusers():
    ref, ours = build("dpm++2m", tiny_models.SD2_SCHEDULER)
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    ref.set_begin_index(3)
    x_ref = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    x = mx.array(x_ref.numpy())
    for i in range(3, 10):
        t = ref.timesteps[i]
        x_ref = ref.step(model_output(ref.scale_model_input(x_ref, t), float(t)), t, x_ref).prev_sample
        x = ours.step(model_output(ours.scale_model_input(x, i), float(ours.timesteps[i].item())), i, x)
        assert relative_error(x, x_ref) <= 1e-5


@pytest.mark.parametrize(
    "class_name, expected",
    [
        ("PNDMScheduler", PNDMSampler),
        ("LMSDiscreteScheduler", LMSSampler),
        ("EulerDiscreteScheduler", EulerSampler),
        ("EulerAncestralDiscreteScheduler", EulerAncestralSampler),
        ("DDIMScheduler", DDIMSampler),
        ("DPMSolverMultistepScheduler", DPMPP2MSampler),
        ("UnknownScheduler", EulerSampler),
    ],
)
def test_no_sampler_name_picks_the_models_own_scheduler_else_euler(class_name, expected):
    assert type(make_sampler(None, dict(tiny_models.SD1_SCHEDULER, _class_name=class_name))) is expected


def test_a_config_of_a_class_we_lack_falls_back_to_euler_as_diffusers_builds_it():
    config = dict(tiny_models.SD1_SCHEDULER, _class_name="DDPMScheduler")
    ours = make_sampler(None, config)
    ref = EulerDiscreteScheduler.from_config(config)
    for x, x_ref, rtol in run_both(ref, ours, 5):
        assert relative_error(x, x_ref) <= rtol


def test_unknown_sampler_name_lists_the_valid_names():
    with pytest.raises(ValueError, match="euler, euler_a, ddim, dpm\\+\\+2m, pndm, lms, heun, dpm2, dpm2_a, lcm"):
        make_sampler("dpm_fast", tiny_models.SD1_SCHEDULER)


@pytest.mark.parametrize("name", ["ddim", "pndm", "lcm"])
@pytest.mark.parametrize("flag", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
def test_schedule_flags_raise_for_samplers_without_them(name, flag):
    config = dict(tiny_models.SD1_SCHEDULER, **{flag: True})
    with pytest.raises(ValueError, match=flag):
        make_sampler(name, config)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("euler", dict(interpolation_type="log_linear"), "interpolation_type"),
        ("euler_a", dict(prediction_type="sample"), "prediction_type"),
        ("euler", dict(timestep_spacing="karras"), "timestep_spacing"),
    ],
)
def test_unsupported_config_values_raise(name, options, message):
    with pytest.raises(ValueError, match=message):
        make_sampler(name, dict(tiny_models.SD1_SCHEDULER, **options))


def test_models_own_dpm_solver_of_another_kind_raises():
    config = dict(tiny_models.SD1_SCHEDULER, _class_name="DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++")
    with pytest.raises(ValueError, match="sde-dpmsolver"):
        make_sampler(None, config)
    assert type(make_sampler("dpm++2m", config)) is DPMPP2MSampler


def test_euler_ancestral_step_without_noise_raises():
    sampler = make_sampler("euler_a", TURBO_SCHEDULER)
    sampler.set_timesteps(1)
    x = mx.zeros(SHAPE)
    with pytest.raises(ValueError, match="noise"):
        sampler.step(x, 0, x)


@pytest.mark.parametrize(
    "options",
    [
        dict(timestep_type="continuous"),
        dict(sigma_min=0.002),
        dict(use_lu_lambdas=True),
        dict(lambda_min_clipped=-5.1),
        dict(variance_type="learned_range"),
    ],
)
def test_scheduler_config_rejects_unimplemented_options(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        SchedulerConfig.from_dict(dict(tiny_models.SD1_SCHEDULER, **options))


def test_ddim_defaults_apply_when_the_config_omits_them():
    ours = make_sampler("ddim", tiny_models.SD2_SCHEDULER)
    ref = DDIMScheduler.from_config(tiny_models.SD2_SCHEDULER)
    assert (ours.config.clip_sample, ours.config.set_alpha_to_one) == (ref.config.clip_sample, ref.config.set_alpha_to_one) == (True, True)


@pytest.mark.parametrize("name", list(REFERENCE))
@pytest.mark.parametrize("config", [{}, tiny_models.SD1_SCHEDULER, tiny_models.SD2_SCHEDULER, TURBO_SCHEDULER], ids=["empty", "sd1", "sd2", "turbo"])
def test_scheduler_settings_are_what_diffusers_from_config_holds(name, config):
    """One source of defaults: the diffusers class's own, overridden by the config's values."""
    cls, overrides = REFERENCE[name]
    ref = cls.from_config(dict(config), **overrides).config
    ours = make_sampler(name, dict(config)).config
    for field in dataclasses.fields(ours):
        if field.name in ref:
            assert getattr(ours, field.name) == ref[field.name], field.name
    assert SchedulerConfig() == SchedulerConfig.from_dict({})


@pytest.mark.parametrize("options", [dict(beta_end="0.012"), dict(num_train_timesteps=True), dict(steps_offset=1.5), dict(beta_start=0.5, beta_end=0.1)])
def test_scheduler_config_with_values_of_the_wrong_type_or_range_raises(options):
    with pytest.raises(ValueError, match="scheduler"):
        SchedulerConfig.from_dict(dict(tiny_models.SD1_SCHEDULER, **options))

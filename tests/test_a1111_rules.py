"""rules="a1111": each k-diffusion sampler of A1111 against k-diffusion's ``sample_*`` function.

Both sides run the same denoiser: a fixed function of the scaled input and the timestep, written in
torch and in MLX. The reference wraps it as A1111 does, in k-diffusion's CompVisDenoiser (or
CompVisVDenoiser for a v-prediction model) over LDM's alphas_cumprod, and gets A1111's sigmas
(KDiffusionSampler.get_sigmas, as in test_sampler_names); ours is ``make_sampler(..., rules="a1111")``
driven as the pipeline drives it. The ancestral and SDE samplers get one fixed noise on both sides
(k-diffusion's ``noise_sampler=``), so the order in which each side draws it does not matter.
"""

import inspect
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

from kdiffusion_ref import external, sampling
from stable_diffusion.sampler_names import ROWS, TABLE, make_sampler
from test_sampler_names import SD15, LDMModel, reference_sigmas

CONFIGS = Path(__file__).resolve().parent.parent / "stable_diffusion" / "configs"
SD21 = json.loads((CONFIGS / "stable-diffusion-2-1" / "scheduler" / "scheduler_config.json").read_text())
K_DIFFUSION_IDS = [row.id for row in TABLE if row.k_diffusion != "-"]
SHAPE = (1, 4, 8, 8)
F32_EPS = float(np.finfo(np.float32).eps)

_rng = np.random.default_rng(0)
PATTERN = _rng.standard_normal(SHAPE).astype(np.float32)
LATENTS = _rng.standard_normal(SHAPE).astype(np.float32)
STEP_NOISE = _rng.standard_normal(SHAPE).astype(np.float32)


# Near the ideal noise prediction for unit-variance data, sqrt(1 - alpha_bar(t)) x_in, which keeps the
# trajectory at the size of real latents, plus a term that varies with t.
def output_torch(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, 1, 1, 1)
    return (0.05 + 0.95 * t / 999) * x + 0.2 * torch.cos(t * 0.01) * torch.from_numpy(PATTERN)


def output_mlx(x: mx.array, t: mx.array) -> mx.array:
    return (0.05 + 0.95 * t / 999) * x + 0.2 * mx.cos(t * 0.01) * mx.array(PATTERN)


class Model(LDMModel):
    """An A1111 SD model as k-diffusion's CompVis wrappers see it: alphas_cumprod and apply_model."""

    def apply_model(self, x, t, cond):
        return output_torch(x, t)


def reference(id: str, config: dict, steps: int, schedule: str) -> np.ndarray:
    row = ROWS[id]
    v = config.get("prediction_type") == "v_prediction"
    wrapper = (external.CompVisVDenoiser if v else external.CompVisDenoiser)(Model(config))
    sigmas = reference_sigmas(wrapper, schedule, steps, row.discard_penultimate)
    function = getattr(sampling, row.k_diffusion)
    noise = torch.from_numpy(STEP_NOISE)
    kwargs = {"noise_sampler": lambda sigma, sigma_next: noise} if "noise_sampler" in inspect.signature(function).parameters else {}
    x = torch.from_numpy(LATENTS) * sigmas[0]  # KDiffusionSampler.sample
    return function(wrapper, x, sigmas, extra_args={"cond": None}, disable=True, **kwargs).numpy()


def ours(id: str, config: dict, steps: int, schedule) -> np.ndarray:
    sampler = make_sampler(id, config, schedule, rules="a1111")
    sampler.set_timesteps(steps)
    x = mx.array(LATENTS) * sampler.init_noise_sigma
    for i in range(len(sampler.timesteps)):
        out = output_mlx(sampler.scale_model_input(x, i), sampler.timesteps[i])
        x = sampler.step(out, i, x, mx.array(STEP_NOISE) if sampler.needs_noise else None)
    return np.array(x)


def tolerance(expected: np.ndarray) -> float:
    """Both sides compute in float32, in different orders.

    One step's own rounding is at most ~8 ulps of the latents' size (a dozen float32 operations of the
    step and the model, each within half an ulp); what earlier steps rounded is scaled down with
    sigma by the steps after them, so all of it stays under twice one step's: 16 ulps of the size.
    """
    return 16 * F32_EPS * max(1.0, float(np.abs(expected).max()))


# k-diffusion 0.1.1's sample_dpmpp_2m_sde fails on a 1-step schedule (h_last = h is unset when the only
# step ends at sigma = 0), so A1111 cannot run it: there is no reference for that case.
@pytest.mark.parametrize("id, steps", [(id, steps) for id in K_DIFFUSION_IDS for steps in (1, 2, 7, 30) if (id, steps) != ("dpm++2m_sde", 1)])
def test_each_sampler_with_its_a1111_default_schedule_matches_k_diffusion(id, steps):
    schedule = ROWS[id].automatic or "uniform"
    expected = reference(id, SD15, steps, schedule)
    np.testing.assert_allclose(ours(id, SD15, steps, None), expected, rtol=0, atol=tolerance(expected))


@pytest.mark.parametrize("schedule", ["uniform", "karras", "exponential", "sgm_uniform", "beta"])
@pytest.mark.parametrize("id", ["euler", "dpm++2m", "dpm2"])
def test_every_schedule_type_matches_k_diffusion(id, schedule):
    expected = reference(id, SD15, 9, schedule)
    np.testing.assert_allclose(ours(id, SD15, 9, schedule), expected, rtol=0, atol=tolerance(expected))


@pytest.mark.parametrize("id", ["euler", "euler_a", "dpm++2m", "heun", "dpm2_a"])
def test_v_prediction_matches_k_diffusions_v_denoiser(id):
    assert SD21["prediction_type"] == "v_prediction"
    schedule = ROWS[id].automatic or "uniform"
    expected = reference(id, SD21, 7, schedule)
    np.testing.assert_allclose(ours(id, SD21, 7, None), expected, rtol=0, atol=tolerance(expected))

"""A1111's sampler and schedule names, and its sigma rules, against A1111's lists and k-diffusion.

The names are checked against A1111 v1.10's own tables, transcribed below (modules/
sd_samplers_kdiffusion.py ``samplers_k_diffusion``, sd_samplers_timesteps.py, sd_samplers_lcm.py),
and the diffusers class of each against the diffusers documentation's A1111 table. The sigma
rules are checked against k-diffusion's ``external.CompVisDenoiser`` and ``sampling.get_sigmas_*``
on the real SD 1.5 scheduler config, with alphas_cumprod as A1111's LDM models hold them.
"""

import json
import re
import math
from pathlib import Path

import diffusers
import numpy as np
import pytest
import scipy.stats
import torch

from kdiffusion_ref import external, sampling
from stable_diffusion import sampler_names
from stable_diffusion.config import SchedulerConfig
from stable_diffusion.sampler_names import (
    SAMPLERS,
    SCHEDULE_LABELS,
    SCHEDULES,
    TABLE,
    a1111_label,
    make_sampler,
    parse_infotext_sampler,
    resolve,
)

CONFIGS = Path(__file__).resolve().parent.parent / "stable_diffusion" / "configs"
SD15 = json.loads((CONFIGS / "stable-diffusion-v1-5" / "scheduler" / "scheduler_config.json").read_text())
F32_EPS = float(np.finfo(np.float32).eps)

# A1111 v1.10: name -> (k-diffusion function, aliases, options["scheduler"], discard_next_to_last_sigma).
A1111_K_DIFFUSION = {
    "DPM++ 2M": ("sample_dpmpp_2m", ["k_dpmpp_2m"], "karras", False),
    "DPM++ SDE": ("sample_dpmpp_sde", ["k_dpmpp_sde"], "karras", False),
    "DPM++ 2M SDE": ("sample_dpmpp_2m_sde", ["k_dpmpp_2m_sde"], "exponential", False),
    "DPM++ 2S a": ("sample_dpmpp_2s_ancestral", ["k_dpmpp_2s_a"], "karras", False),
    "Euler a": ("sample_euler_ancestral", ["k_euler_a", "k_euler_ancestral"], None, False),
    "Euler": ("sample_euler", ["k_euler"], None, False),
    "LMS": ("sample_lms", ["k_lms"], None, False),
    "Heun": ("sample_heun", ["k_heun"], None, False),
    "DPM2": ("sample_dpm_2", ["k_dpm_2"], "karras", True),
    "DPM2 a": ("sample_dpm_2_ancestral", ["k_dpm_2_a"], "karras", True),
}
A1111_OTHERS = {"DDIM": ["ddim"], "PLMS": ["plms"], "UniPC": ["unipc"], "LCM": ["k_lcm"]}
# The diffusers documentation's table (docs/source/en/api/schedulers/overview.md), A1111 name -> class.
DIFFUSERS_CLASS = {
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "DPM++ 2M SDE": "DPMSolverMultistepScheduler",
    "DPM++ SDE": "DPMSolverSDEScheduler",
    "DPM2": "KDPM2DiscreteScheduler",
    "DPM2 a": "KDPM2AncestralDiscreteScheduler",
    "Euler": "EulerDiscreteScheduler",
    "Euler a": "EulerAncestralDiscreteScheduler",
    "Heun": "HeunDiscreteScheduler",
    "LMS": "LMSDiscreteScheduler",
    "DDIM": "DDIMScheduler",
    "PLMS": "PNDMScheduler",
    "UniPC": "UniPCMultistepScheduler",
    "LCM": "LCMScheduler",
    "DEIS": "DEISMultistepScheduler",
}
ROWS = {row.a1111: row for row in TABLE}
_DPM = "DPMSolverMultistepScheduler"


# Names -----------------------------------------------------------------------------------------


def test_the_table_has_every_a1111_sampler_with_its_function_aliases_and_defaults():
    for name, (function, aliases, default, discard) in A1111_K_DIFFUSION.items():
        row = ROWS[name]
        assert (row.k_diffusion, set(row.aliases), row.automatic, row.discard_penultimate) == (function, set(aliases), default, discard), name
        assert hasattr(sampling, function)
    for name, aliases in A1111_OTHERS.items():
        assert set(ROWS[name].aliases) == set(aliases), name
        assert ROWS[name].automatic is None and not ROWS[name].discard_penultimate
    assert set(ROWS) == {*A1111_K_DIFFUSION, *A1111_OTHERS, "DEIS"}


def test_each_row_names_the_diffusers_class_of_its_sampler():
    for name, class_name in DIFFUSERS_CLASS.items():
        row = ROWS[name]
        assert row.diffusers_class == class_name and hasattr(diffusers, class_name), name
        assert SAMPLERS[row.id].diffusers_class == class_name, name
    assert dict(ROWS["DPM++ 2M SDE"].overrides)["algorithm_type"] == "sde-dpmsolver++"
    assert dict(ROWS["DPM++ 2M"].overrides)["algorithm_type"] == "dpmsolver++"
    assert ROWS["DPM++ 2S a"].diffusers_class == "" and SAMPLERS["dpm++2s_a"].diffusers_class == ""  # diffusers has none


def test_every_sampler_of_the_table_exists():
    assert set(SAMPLERS) == {row.id for row in TABLE}


@pytest.mark.parametrize("row", TABLE, ids=lambda row: row.id)
def test_every_name_alias_and_id_resolves_in_any_case(row):
    for name in (row.a1111, row.id, *row.aliases):
        for spelling in (name, name.upper(), name.lower(), f"  {name} "):
            assert resolve(spelling) == (row.id, None), spelling
    assert resolve(row.a1111, "Karras" if row.k_diffusion != "-" else None)[0] == row.id


@pytest.mark.parametrize("name", list(A1111_K_DIFFUSION))
def test_legacy_combined_names_carry_their_schedule(name):
    id = ROWS[name].id
    for suffix, schedule in (("Karras", "karras"), ("Exponential", "exponential"), ("SGM Uniform", "sgm_uniform"), ("karras", "karras"), ("SGMUniform", "sgm_uniform")):
        assert resolve(f"{name} {suffix}") == (id, schedule)
        assert resolve(f"{name} {suffix}", schedule) == (id, schedule)  # the same schedule twice is no conflict
        assert resolve(f"{name} {suffix}", "Automatic") == (id, schedule)
    with pytest.raises(ValueError, match="names the schedule 'Karras' but the schedule 'Beta' was given"):
        resolve(f"{name} Karras", "beta")


def test_old_karras_aliases():
    assert resolve("k_dpmpp_2m_ka") == ("dpm++2m", "karras")
    assert resolve("k_dpmpp_2m_sde_ka") == ("dpm++2m_sde", "karras")
    assert resolve("k_dpm_2_a_ka") == ("dpm2_a", "karras")


def test_bad_names_get_one_line():
    for name, message in (
        ("Euler b", "unknown sampler 'Euler b' (valid: 'Euler a' (euler_a), 'Euler' (euler)"),
        ("DPM++ 3M SDE", "A1111's 'DPM++ 3M SDE' is not implemented"),
        ("k_dpmpp_3m_sde", "A1111's 'DPM++ 3M SDE' is not implemented"),
        ("DPM++ 3M SDE Karras", "A1111's 'DPM++ 3M SDE' is not implemented"),
        ("DPM fast", "A1111's 'DPM fast' is not implemented"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)) as e:
            resolve(name)
        assert "\n" not in str(e.value)
    for schedule, message in (("polyexponential", "A1111's\\) is not implemented"), ("karas", "unknown schedule type 'karas'")):
        with pytest.raises(ValueError, match=message):
            resolve("Euler", schedule)
    with pytest.raises(ValueError, match="takes no schedule type \\(got 'Karras'\\)"):
        make_sampler("DDIM", SD15, "karras")
    with pytest.raises(ValueError, match="rules='a1111' applies to A1111's k-diffusion samplers; 'UniPC'"):
        make_sampler("UniPC", SD15, rules="a1111")
    with pytest.raises(ValueError, match="unknown sampler rules 'comfy'"):
        make_sampler("Euler", SD15, rules="comfy")


def test_schedule_types_are_diffusers_config_overrides():
    config = dict(SD15, use_karras_sigmas=True)  # a model config with its own schedule flag
    for schedule, expected in (
        (None, {"use_karras_sigmas": True}),
        ("uniform", {}),
        ("exponential", {"use_exponential_sigmas": True}),
        ("beta", {"use_beta_sigmas": True}),
        ("sgm_uniform", {"timestep_spacing": "trailing"}),
    ):
        ours = make_sampler("Euler", config, schedule).config
        reference = SchedulerConfig.from_dict({**SD15, **expected}, "EulerDiscreteScheduler")
        assert ours == reference, schedule
    # A class without schedule flags ignores the model's, as diffusers' from_config does.
    assert not make_sampler("DDIM", config).config.use_karras_sigmas


def test_the_model_config_picks_its_own_sampler():
    assert make_sampler(None, SD15).name == "pndm"
    dpm = dict(SD15, _class_name="DPMSolverMultistepScheduler")
    assert make_sampler(None, dpm).name == "dpm++2m"
    assert make_sampler(None, dict(dpm, algorithm_type="sde-dpmsolver++")).name == "dpm++2m_sde"
    with pytest.warns(UserWarning, match="the model's scheduler 'KarrasVeScheduler' is not implemented; sampling with Euler"):
        assert make_sampler(None, dict(SD15, _class_name="KarrasVeScheduler")).name == "euler"
    # Under A1111's rules a model's own PLMS is not one of A1111's k-diffusion samplers: A1111's default.
    assert make_sampler(None, SD15, rules="a1111").name == "dpm++2m"
    assert make_sampler(None, dict(SD15, _class_name="EulerDiscreteScheduler"), rules="a1111").name == "euler"


def test_the_row_overrides_are_what_the_sampler_runs():
    for row in TABLE:
        config = make_sampler(row.id, dict(SD15, _class_name=_DPM, algorithm_type="dpmsolver++")).config
        for key, value in row.overrides:
            assert getattr(config, key) == value, (row.id, key)


def test_a1111_img2img_starts_one_step_before_diffusers():
    """sd_samplers_common.setup_img2img_steps: t_enc = int(min(strength, 0.999) * steps); the run is
    sigmas[steps - t_enc - 1:], t_enc + 1 steps."""
    for steps, strength, start in ((20, 0.75, 4), (20, 1.0, 0), (30, 0.3, 20), (10, 0.05, 9), (7, 0.5, 3)):
        assert sampler_names.a1111_img2img_start(steps, strength) == start


# Infotext --------------------------------------------------------------------------------------


def _variants():
    for id, cls in SAMPLERS.items():
        row = sampler_names.ROWS[id]
        schedules = SCHEDULES if hasattr(cls, "set_sigmas") else (None,)
        for rules in ("diffusers", "a1111") if row.k_diffusion != "-" else ("diffusers",):
            for schedule in schedules:
                yield id, schedule, rules


@pytest.mark.parametrize("id, schedule, rules", list(_variants()))
def test_label_and_parse_round_trip(id, schedule, rules):
    """parse(label(sampler)) builds the same sampler: the same schedule on 7 steps."""
    ours = make_sampler(id, SD15, schedule, rules)
    label = a1111_label(ours)
    assert label[0] == sampler_names.ROWS[id].a1111 and label[1] in SCHEDULE_LABELS.values()
    parsed_id, parsed_schedule = parse_infotext_sampler(*label)
    again = make_sampler(parsed_id, SD15, parsed_schedule, rules)
    assert type(again) is type(ours) and again.config == ours.config
    ours.set_timesteps(7)
    again.set_timesteps(7)
    np.testing.assert_array_equal(np.array(again.timesteps), np.array(ours.timesteps))
    if ours.sigmas is not None:
        np.testing.assert_array_equal(np.array(again.sigmas), np.array(ours.sigmas))


def test_labels_as_a1111_writes_them():
    """A1111 >= 1.9 writes the schedule it ran; "Automatic" only where that is plain get_sigmas."""
    assert a1111_label(make_sampler("DPM++ 2M", SD15, rules="a1111")) == ("DPM++ 2M", "Karras")
    assert a1111_label(make_sampler("DPM++ 2M SDE", SD15, rules="a1111")) == ("DPM++ 2M SDE", "Exponential")
    assert a1111_label(make_sampler("Euler a", SD15, rules="a1111")) == ("Euler a", "Automatic")
    assert a1111_label(make_sampler("Euler a", SD15, "uniform", rules="a1111")) == ("Euler a", "Uniform")
    assert a1111_label(make_sampler("DPM++ 2M Karras", SD15)) == ("DPM++ 2M", "Karras")
    assert a1111_label(make_sampler("DPM++ 2M", SD15)) == ("DPM++ 2M", "Uniform")  # not A1111's Automatic (Karras)
    assert a1111_label(make_sampler(None, SD15)) == ("PLMS", "Automatic")


def test_parse_reads_as_a1111_does():
    assert parse_infotext_sampler("DPM++ 2M Karras", None) == ("dpm++2m", "karras")
    assert parse_infotext_sampler("DPM++ 2M SDE Karras", "Exponential") == ("dpm++2m_sde", "karras")  # the suffix wins
    assert parse_infotext_sampler("DPM++ 2M", None) == ("dpm++2m", "karras")  # a missing field is Automatic
    assert parse_infotext_sampler("DPM++ 2M", "Automatic") == ("dpm++2m", "karras")
    assert parse_infotext_sampler("DPM++ 2M SDE", "Automatic") == ("dpm++2m_sde", "exponential")
    assert parse_infotext_sampler("Euler a", None) == ("euler_a", "uniform")
    assert parse_infotext_sampler("Euler", "SGM Uniform") == ("euler", "sgm_uniform")
    assert parse_infotext_sampler("DDIM", "Automatic") == ("ddim", None)
    assert parse_infotext_sampler("PLMS", "Karras") == ("pndm", None)  # A1111 ignores it
    assert parse_infotext_sampler("UniPC", None) == ("unipc", None)  # not a k-diffusion sampler: the config's
    assert parse_infotext_sampler("k_lms", "karras") == ("lms", "karras")


# A1111's sigmas against k-diffusion --------------------------------------------------------------


class LDMModel:
    """What k-diffusion's CompVisDenoiser reads of an A1111 SD model: LDM's alphas_cumprod.

    LDM's register_schedule: betas = linspace(sqrt(start), sqrt(end), T, float64) ** 2, the cumulative
    product in float64, stored as a float32 buffer.
    """

    def __init__(self, config: dict):
        start, end, n = config["beta_start"], config["beta_end"], config["num_train_timesteps"]
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0).to(torch.float32)


def reference_sigmas(wrapper, schedule: str, steps: int, discard: bool = False) -> torch.Tensor:
    """A1111's KDiffusionSampler.get_sigmas with the schedule functions of sd_schedulers.py (float32)."""
    n = steps + 1 if discard else steps
    sigma_min, sigma_max = wrapper.sigmas[0].item(), wrapper.sigmas[-1].item()
    if schedule == "uniform":
        sigmas = wrapper.get_sigmas(n)
    elif schedule == "karras":
        sigmas = sampling.get_sigmas_karras(n, sigma_min, sigma_max)
    elif schedule == "exponential":
        sigmas = sampling.get_sigmas_exponential(n, sigma_min, sigma_max)
    elif schedule == "sgm_uniform":
        start, end = wrapper.sigma_to_t(torch.tensor(sigma_max)), wrapper.sigma_to_t(torch.tensor(sigma_min))
        sigmas = torch.tensor([wrapper.t_to_sigma(t) for t in torch.linspace(start, end, n + 1)[:-1]] + [0.0])
    else:  # beta, A1111's option defaults alpha = beta = 0.6
        ppf = [scipy.stats.beta.ppf(q, 0.6, 0.6) for q in 1 - np.linspace(0, 1, n)]
        sigmas = torch.tensor([sigma_min + p * (sigma_max - sigma_min) for p in ppf] + [0.0], dtype=torch.float32)
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas


def a1111_wrapper(config: dict = SD15):
    return external.CompVisDenoiser(LDMModel(config))


def test_the_model_sigmas_are_ldms():
    wrapper = a1111_wrapper()
    ours = sampler_names.model_sigmas(sampler_names.ldm_alphas_cumprod(SchedulerConfig.from_dict(SD15)))
    # numpy's and torch's float64 linspace may differ in the last bit; after float32 rounding at most 1 ulp.
    np.testing.assert_allclose(ours, wrapper.sigmas.numpy(), rtol=F32_EPS, atol=0)


# Tolerances: both sides compute in float32 with the same operations in the same order (linspace as
# torch's, then the interpolation or the Karras base); they end in exp / pow, which neither side rounds
# correctly: a few ulps (4). Beta is computed in float64 on both sides and rounded once: 1 ulp (2 eps).
SIGMA_RTOL = {"uniform": 4 * F32_EPS, "sgm_uniform": 4 * F32_EPS, "exponential": 4 * F32_EPS, "karras": 4 * F32_EPS, "beta": 2 * F32_EPS}


@pytest.mark.parametrize("schedule", ["uniform", "karras", "exponential", "sgm_uniform", "beta"])
@pytest.mark.parametrize("steps", [1, 2, 7, 30, 150])
@pytest.mark.parametrize("discard", [False, True])
def test_a1111_sigmas_match_k_diffusion(schedule, steps, discard):
    wrapper = a1111_wrapper()
    ours = sampler_names.a1111_sigmas(schedule, steps, wrapper.sigmas.numpy(), discard)
    reference = reference_sigmas(wrapper, schedule, steps, discard).numpy()
    assert ours.dtype == np.float32 and ours.shape == reference.shape == (steps + 1,)
    np.testing.assert_allclose(ours, reference, rtol=SIGMA_RTOL[schedule], atol=0)


@pytest.mark.parametrize("schedule", ["uniform", "karras", "sgm_uniform"])
def test_a1111_timesteps_match_k_diffusions_sigma_to_t(schedule):
    wrapper = a1111_wrapper()
    sigmas = reference_sigmas(wrapper, schedule, 30)
    ours = sampler_names.a1111_timesteps(sigmas.numpy(), wrapper.sigmas.numpy())
    reference = wrapper.sigma_to_t(sigmas[:-1]).numpy()
    # t = (1 - w) low + w high in float32 there, in float64 then rounded here: 2 ulps of t < 1024 at most.
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1024 * F32_EPS)


def test_a1111_rules_feed_the_sampler_a1111s_schedule():
    wrapper = a1111_wrapper()
    for name, schedule, discard in (("Euler", "uniform", False), ("DPM++ 2M", "karras", False), ("DPM2", "karras", True), ("Euler a", "exponential", False)):
        ours = make_sampler(name, SD15, schedule if name == "Euler a" else None, rules="a1111")
        ours.set_timesteps(9)
        reference = reference_sigmas(wrapper, schedule, 9, discard).numpy()
        run = np.unique(np.array(ours.sigmas))[::-1]  # the 2nd-order samplers repeat each sigma once
        np.testing.assert_allclose(run, reference, rtol=SIGMA_RTOL[schedule], atol=0)
        # A1111 starts from noise * sigmas[0] (in DPM-Solver's variable: times alpha = 1 / sqrt(sigma^2 + 1)).
        start = reference[0] / (math.sqrt(reference[0] ** 2 + 1) if name == "DPM++ 2M" else 1)
        assert ours.init_noise_sigma == pytest.approx(start, rel=4 * F32_EPS)

"""Samplers by the names AUTOMATIC1111's webui gives them, its schedule types, and its sigma rules.

The reference is A1111 v1.9/1.10: ``modules/sd_samplers_kdiffusion.py`` (the sampler list: name,
k-diffusion function, aliases, the default scheduler and ``discard_next_to_last_sigma``;
``KDiffusionSampler.get_sigmas``), ``sd_samplers_timesteps.py`` (DDIM, PLMS, UniPC),
``sd_samplers_lcm.py`` (LCM), ``sd_schedulers.py`` (the schedule types) and
``sd_samplers.get_sampler_and_scheduler`` (legacy names such as "DPM++ 2M Karras"). The sigmas
A1111 feeds k-diffusion come from k-diffusion 0.1.1's ``external.DiscreteSchedule`` (CompVisDenoiser)
and ``sampling.get_sigmas_karras`` / ``get_sigmas_exponential``.

Two rules for the noise levels:

- ``rules="diffusers"`` (default): each sampler is its diffusers scheduler class built with
  ``from_config(model's scheduler_config, **overrides)``; a schedule type is a config override
  (``use_karras_sigmas``...), "Automatic" is the model config as it is.
- ``rules="a1111"``: the sigmas and continuous timesteps A1111 computes for its k-diffusion samplers,
  handed to the sampler's ``set_sigmas``; "Automatic" is A1111's default schedule for that sampler.
"""

import functools
import warnings
from typing import NamedTuple, Optional

import mlx.core as mx
import numpy as np

from . import sampler as _sampler
from .config import SCHEDULE_FLAGS, SchedulerConfig
from .sampler import Sampler, beta_sigmas, linspace_float32, sigma_to_t
from .sampler_solvers import SOLVERS, make_solver

SAMPLERS: dict[str, type[Sampler]] = {**_sampler.SAMPLERS, **SOLVERS}

SCHEDULES = ("automatic", "uniform", "karras", "exponential", "sgm_uniform", "beta")
SCHEDULE_LABELS = {
    "automatic": "Automatic",
    "uniform": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "beta": "Beta",
}
# A1111's other schedule types (sd_schedulers.py), named so that they are refused as such.
_OTHER_A1111_SCHEDULES = ("polyexponential", "kl_optimal", "align_your_steps", "simple", "normal", "ddim")
RULES = ("diffusers", "a1111")


class Row(NamedTuple):
    """One sampler: the first four fields are the table --help and the README show."""

    a1111: str  # A1111's name (DEIS: ours; A1111 has none)
    id: str  # ours (a key of SAMPLERS)
    diffusers: str  # the diffusers class, with the overrides it needs
    k_diffusion: str  # the k-diffusion function A1111 runs ("-": A1111 runs its own timestep sampler)
    diffusers_class: str
    overrides: tuple  # (key, value) pairs set on the model's scheduler config
    aliases: tuple  # A1111's aliases (lower case)
    automatic: Optional[str]  # A1111's schedule for "Automatic" (its options["scheduler"]); None: get_sigmas
    discard_penultimate: bool  # A1111's discard_next_to_last_sigma


def _row(a1111, id, diffusers_class, k_diffusion, aliases=(), automatic=None, discard_penultimate=False, overrides=()):
    shown = diffusers_class + (f"({', '.join(f'{k}={v!r}' for k, v in overrides)})" if overrides else "")
    return Row(a1111, id, shown or "-", k_diffusion, diffusers_class, overrides, aliases, automatic, discard_penultimate)


_DPM_SOLVER = "DPMSolverMultistepScheduler"
TABLE: tuple[Row, ...] = (
    _row("Euler a", "euler_a", "EulerAncestralDiscreteScheduler", "sample_euler_ancestral", ("k_euler_a", "k_euler_ancestral")),
    _row("Euler", "euler", "EulerDiscreteScheduler", "sample_euler", ("k_euler",)),
    _row("LMS", "lms", "LMSDiscreteScheduler", "sample_lms", ("k_lms",)),
    _row("Heun", "heun", "HeunDiscreteScheduler", "sample_heun", ("k_heun",)),
    _row("DPM2", "dpm2", "KDPM2DiscreteScheduler", "sample_dpm_2", ("k_dpm_2",), "karras", True),
    _row("DPM2 a", "dpm2_a", "KDPM2AncestralDiscreteScheduler", "sample_dpm_2_ancestral", ("k_dpm_2_a",), "karras", True),
    _row("DPM++ 2S a", "dpm++2s_a", "", "sample_dpmpp_2s_ancestral", ("k_dpmpp_2s_a",), "karras"),
    _row("DPM++ 2M", "dpm++2m", _DPM_SOLVER, "sample_dpmpp_2m", ("k_dpmpp_2m",), "karras",
         overrides=(("algorithm_type", "dpmsolver++"), ("solver_order", 2))),
    _row("DPM++ SDE", "dpm++_sde", "DPMSolverSDEScheduler", "sample_dpmpp_sde", ("k_dpmpp_sde",), "karras"),
    _row("DPM++ 2M SDE", "dpm++2m_sde", _DPM_SOLVER, "sample_dpmpp_2m_sde", ("k_dpmpp_2m_sde",), "exponential",
         overrides=(("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2))),
    _row("DDIM", "ddim", "DDIMScheduler", "-", ("ddim",)),
    _row("PLMS", "pndm", "PNDMScheduler", "-", ("plms",)),
    _row("UniPC", "unipc", "UniPCMultistepScheduler", "-", ("unipc",)),
    _row("LCM", "lcm", "LCMScheduler", "-", ("k_lcm",)),
    _row("DEIS", "deis", "DEISMultistepScheduler", "-"),
)
# A1111's old "<sampler> Karras" rows (before v1.9) had their own aliases.
_KARRAS_ALIASES = {
    "k_lms_ka": "lms",
    "k_dpm_2_ka": "dpm2",
    "k_dpm_2_a_ka": "dpm2_a",
    "k_dpmpp_2s_a_ka": "dpm++2s_a",
    "k_dpmpp_2m_ka": "dpm++2m",
    "k_dpmpp_sde_ka": "dpm++_sde",
    "k_dpmpp_2m_sde_ka": "dpm++2m_sde",
}
# A1111 samplers we do not have: name -> (aliases, why).
NOT_IMPLEMENTED = {
    "DPM++ 3M SDE": (("k_dpmpp_3m_sde",), "k-diffusion's sample_dpmpp_3m_sde has no sampler here; 'DPM++ 2M SDE' is the nearest"),
    "DPM++ 2M SDE Heun": (("k_dpmpp_2m_sde_heun",), "the heun solver type of sample_dpmpp_2m_sde has no sampler here; use 'DPM++ 2M SDE'"),
    "DPM fast": (("k_dpm_fast",), "k-diffusion's sample_dpm_fast has no sampler here"),
    "DPM adaptive": (("k_dpm_ad",), "k-diffusion's adaptive-step sample_dpm_adaptive has no sampler here"),
    "Restart": (("restart",), "A1111's restart sampler has no sampler here"),
    "DDIM CFG++": (("ddim_cfgpp",), "A1111's DDIM CFG++ changes the guidance, which the samplers here do not own"),
}
ROWS: dict[str, Row] = {row.id: row for row in TABLE}


def _key(text: str) -> str:
    return " ".join(text.split()).lower()


def _names() -> dict[str, str]:
    names = {}
    for row in TABLE:
        for name in (row.a1111, row.id, *row.aliases):
            names[_key(name)] = row.id
    return names


def _schedule_names() -> dict[str, str]:
    names = {_key(label): id for id, label in SCHEDULE_LABELS.items()}
    names.update({id: id for id in SCHEDULES})
    names["sgmuniform"] = "sgm_uniform"  # A1111's alias
    return names


_NAMES = _names()
_SCHEDULE_NAMES = _schedule_names()
_NOT_IMPLEMENTED_NAMES = {_key(n): name for name, (aliases, _) in NOT_IMPLEMENTED.items() for n in (name, *aliases)}


def _valid_names() -> str:
    return ", ".join(f"'{row.a1111}' ({row.id})" for row in TABLE)


def schedule_id(schedule: Optional[str]) -> Optional[str]:
    """Our id of a schedule type (A1111's label or ours, any case); None and "automatic" give None."""
    if schedule is None:
        return None
    key = _key(schedule)
    if key in _SCHEDULE_NAMES:
        found = _SCHEDULE_NAMES[key]
        return None if found == "automatic" else found
    if key.replace(" ", "_") in _OTHER_A1111_SCHEDULES:
        raise ValueError(f"schedule type {schedule!r} (A1111's) is not implemented here (valid: {', '.join(SCHEDULE_LABELS.values())})")
    raise ValueError(f"unknown schedule type {schedule!r} (valid: {', '.join(SCHEDULE_LABELS.values())}, any case)")


def _split_legacy(key: str) -> tuple[str, Optional[str]]:
    """A legacy combined name "dpm++ 2m karras" -> ("dpm++ 2m", "karras") (sd_samplers.get_sampler_and_scheduler)."""
    if key in _KARRAS_ALIASES:
        return _KARRAS_ALIASES[key], "karras"
    for suffix, schedule in sorted(_SCHEDULE_NAMES.items(), key=lambda item: -len(item[0])):
        if key.endswith(" " + suffix):
            return key[: -len(suffix) - 1], schedule
    return key, None


def resolve(name: Optional[str], schedule: Optional[str] = None) -> tuple[Optional[str], Optional[str]]:
    """(our sampler id, schedule id or None for "Automatic") of a sampler name and a schedule type.

    ``name``: an A1111 name ("DPM++ 2M"), one of its aliases ("k_dpmpp_2m"), our id ("dpm++2m"), or a
    legacy combined name ("DPM++ 2M SDE Karras"), any case; None: the model config's own class.
    A legacy name's schedule and an explicit ``schedule`` other than "Automatic" must agree.
    """
    wanted = schedule_id(schedule)
    if name is None:
        return None, wanted
    key = _key(name)
    base, legacy = (key, None) if key in _NAMES else _split_legacy(key)
    if base in _NOT_IMPLEMENTED_NAMES:
        real = _NOT_IMPLEMENTED_NAMES[base]
        raise ValueError(f"sampler {name!r}: A1111's {real!r} is not implemented: {NOT_IMPLEMENTED[real][1]}")
    if base not in _NAMES:
        raise ValueError(f"unknown sampler {name!r} (valid: {_valid_names()}; any case, an A1111 alias, or a legacy name such as 'DPM++ 2M Karras')")
    id = _NAMES[base]
    if id not in SAMPLERS:
        raise ValueError(f"sampler {name!r} ({id}) is not implemented yet")
    if legacy == "automatic":
        legacy = None
    if legacy is not None and wanted is not None and legacy != wanted:
        raise ValueError(
            f"sampler {name!r} names the schedule {SCHEDULE_LABELS[legacy]!r} but the schedule {SCHEDULE_LABELS[wanted]!r} was given; "
            f"give the sampler without the suffix ({ROWS[id].a1111!r}) or drop the schedule"
        )
    return id, wanted or legacy


# A1111's sigma rules (KDiffusionSampler.get_sigmas) --------------------------------------------------


def ldm_alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """alpha_bar as A1111's models hold it: LDM's register_schedule, betas in float64, stored as float32.

    LDM's "linear" schedule is diffusers' "scaled_linear" (linear in sqrt(beta)).
    """
    n = config.num_train_timesteps
    if config.rescale_betas_zero_snr:
        raise ValueError("rules='a1111': rescale_betas_zero_snr=True is not supported (A1111 rescales alphas_cumprod its own way); use rules='diffusers'")
    if config.beta_schedule == "scaled_linear":
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=np.float64) ** 2
    elif config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, n, dtype=np.float64)
    else:
        raise ValueError(f"rules='a1111': beta_schedule={config.beta_schedule!r} is not supported (A1111's SD models use linear ones); use rules='diffusers'")
    return np.cumprod(1.0 - betas).astype(np.float32)


def model_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """k-diffusion's DiscreteEpsDDPMDenoiser sigmas, sqrt((1 - alpha_bar) / alpha_bar), in float32 as there."""
    ac = np.asarray(alphas_cumprod, dtype=np.float32)
    return np.sqrt((np.float32(1) - ac) / ac)


def t_to_sigma(t: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """k-diffusion's DiscreteSchedule.t_to_sigma: interpolation in log sigma between training steps (float32)."""
    t = np.asarray(t, dtype=np.float32)
    log_sigmas = np.log(sigmas)
    low, high = np.floor(t).astype(np.int64), np.ceil(t).astype(np.int64)
    w = t - np.floor(t)
    return np.exp((np.float32(1) - w) * log_sigmas[low] + w * log_sigmas[high])


def uniform_sigmas(n: int, sigmas: np.ndarray) -> np.ndarray:
    """A1111's "Uniform" and its k-diffusion default: DiscreteSchedule.get_sigmas(n), t from T - 1 to 0."""
    return t_to_sigma(linspace_float32(len(sigmas) - 1, 0, n), sigmas)


def sgm_uniform_sigmas(n: int, sigmas: np.ndarray) -> np.ndarray:
    """A1111's "SGM Uniform" (sd_schedulers.sgm_uniform): n + 1 evenly spaced t from T - 1 to 0, the last dropped."""
    return t_to_sigma(linspace_float32(len(sigmas) - 1, 0, n + 1)[:-1], sigmas)


def karras_sigmas(n: int, sigmas: np.ndarray, rho: float = 7.0) -> np.ndarray:
    """k-diffusion's get_sigmas_karras over the model's sigma range, in float32 as there."""
    min_inv_rho, max_inv_rho = float(sigmas[0]) ** (1 / rho), float(sigmas[-1]) ** (1 / rho)
    ramp = linspace_float32(0, 1, n)
    return (np.float32(max_inv_rho) + ramp * np.float32(min_inv_rho - max_inv_rho)) ** np.float32(rho)


def exponential_sigmas(n: int, sigmas: np.ndarray) -> np.ndarray:
    """k-diffusion's get_sigmas_exponential: evenly spaced in log sigma over the model's range (float32)."""
    return np.exp(linspace_float32(np.log(float(sigmas[-1])), np.log(float(sigmas[0])), n))


def a1111_beta_sigmas(n: int, sigmas: np.ndarray) -> np.ndarray:
    """A1111's "Beta" (sd_schedulers.beta_scheduler, alpha = beta = 0.6, its option defaults): linear in sigma."""
    return beta_sigmas(float(sigmas[0]), float(sigmas[-1]), n).astype(np.float32)


A1111_SCHEDULES = {
    "uniform": uniform_sigmas,
    "karras": karras_sigmas,
    "exponential": exponential_sigmas,
    "sgm_uniform": sgm_uniform_sigmas,
    "beta": a1111_beta_sigmas,
}


def a1111_sigmas(schedule: str, steps: int, sigmas: np.ndarray, discard_penultimate: bool = False) -> np.ndarray:
    """The steps + 1 noise levels (the last 0) A1111's KDiffusionSampler.get_sigmas feeds the sampler (float32).

    ``discard_penultimate`` (DPM2, DPM2 a): one step more is computed and its next-to-last sigma dropped.
    """
    n = steps + 1 if discard_penultimate else steps
    out = np.append(A1111_SCHEDULES[schedule](n, sigmas).astype(np.float32), np.float32(0))
    return np.delete(out, -2) if discard_penultimate else out


def a1111_timesteps(run_sigmas: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """The continuous timesteps the UNet gets at each sigma but the last (CompVisDenoiser's sigma_to_t)."""
    return sigma_to_t(np.asarray(run_sigmas[:-1], dtype=np.float32), np.log(sigmas)).astype(np.float32)


class _A1111Rules:
    """Mixed into a sigma-based sampler: ``set_timesteps`` runs A1111's schedule instead of diffusers'."""

    a1111_schedule: str  # the schedule run ("Automatic" resolved)
    a1111_requested: Optional[str]  # the schedule asked for (None: "Automatic")
    a1111_model_sigmas: np.ndarray  # the model's training sigmas as A1111 holds them

    def set_timesteps(self, num_steps: int) -> None:
        self._check_steps(num_steps)
        row = ROWS[self.name]
        sigmas = a1111_sigmas(self.a1111_schedule, num_steps, self.a1111_model_sigmas, row.discard_penultimate)
        self.set_sigmas(sigmas, a1111_timesteps(sigmas, self.a1111_model_sigmas))
        # A1111 starts from noise * sigmas[0] (KDiffusionSampler.sample): that is x0 = 0 noised to the
        # first step, in this sampler's own variable (x0 + sigma eps, or the VP form alpha x0 + sigma_t eps).
        self.init_noise_sigma = float(self.add_noise(mx.zeros((1,)), mx.ones((1,)), 0).item())


@functools.cache
def _with_a1111_rules(cls: type) -> type:
    return type(cls.__name__, (_A1111Rules, cls), {"__doc__": f"{cls.__doc__} With A1111's sigmas."})


# Building samplers ----------------------------------------------------------------------------------


# A1111's sampler when none is named (sd_samplers.samplers[0]).
A1111_DEFAULT = "dpm++2m"


def a1111_img2img_start(num_steps: int, strength: float) -> int:
    """The step A1111's img2img starts at (sd_samplers_common.setup_img2img_steps, KDiffusionSampler.sample_img2img).

    It runs int(min(strength, 0.999) * steps) + 1 of the steps' sigmas: one step more than diffusers'
    get_timesteps, from sigmas[steps - t_enc - 1].
    """
    return num_steps - int(min(strength, 0.999) * num_steps) - 1


def _own_id(scheduler_config: dict, rules: str) -> str:
    """The sampler of the config's own class; Euler (A1111's rules: DPM++ 2M) when we have none of it."""
    own = scheduler_config.get("_class_name")
    if own == _DPM_SOLVER:
        id = "dpm++2m_sde" if scheduler_config.get("algorithm_type") == "sde-dpmsolver++" else "dpm++2m"
    else:
        id = next((id for id, cls in SAMPLERS.items() if cls.diffusers_class == own), None)
    if rules == "a1111" and (id is None or ROWS[id].k_diffusion == "-"):
        return A1111_DEFAULT
    if id is None:
        warnings.warn(f"the model's scheduler {own!r} is not implemented; sampling with Euler (pass a sampler to choose another)")
        return "euler"
    return id


def _is_sigma_based(cls: type) -> bool:
    return hasattr(cls, "set_sigmas")


def _diffusers_schedule(config: dict, schedule: Optional[str]) -> dict:
    """The config overrides of a schedule type under diffusers' rules (None: the config as it is)."""
    if schedule is None:
        return config
    config = {**config, **{flag: False for flag in SCHEDULE_FLAGS}}
    if schedule == "sgm_uniform":
        return {**config, "timestep_spacing": "trailing"}
    if schedule in ("karras", "exponential", "beta"):
        return {**config, f"use_{schedule}_sigmas": True}
    return config


def make_sampler(name: Optional[str], scheduler_config: dict, schedule: Optional[str] = None, rules: str = "diffusers") -> Sampler:
    """A new sampler for one run, on the model's ``scheduler_config.json`` dict.

    ``name``: see ``resolve`` (None: the config's own class; a class we do not implement falls back to
    Euler with a warning; under A1111's rules a class that is not an A1111 k-diffusion sampler gives
    A1111's default, DPM++ 2M). ``schedule``: a schedule type (SCHEDULES or A1111's label), for sigma-based samplers.
    ``rules``: "diffusers" (the class's ``from_config`` with the schedule as a config override) or
    "a1111" (A1111's sigmas and timesteps, for A1111's k-diffusion samplers).
    """
    if rules not in RULES:
        raise ValueError(f"unknown sampler rules {rules!r} (valid: {', '.join(RULES)})")
    id, schedule = resolve(name, schedule)
    id = id or _own_id(scheduler_config, rules)
    row, cls = ROWS[id], SAMPLERS[id]
    sigma_based = _is_sigma_based(cls)
    if schedule is not None and not sigma_based:
        raise ValueError(f"sampler {row.a1111!r} takes no schedule type (got {SCHEDULE_LABELS[schedule]!r}); leave the schedule out")
    if rules == "a1111" and row.k_diffusion == "-":
        raise ValueError(f"rules='a1111' applies to A1111's k-diffusion samplers; {row.a1111!r} is not one of them: use rules='diffusers'")
    config = dict(scheduler_config)
    if not sigma_based or rules == "a1111":
        # diffusers' classes without these flags ignore them; under A1111's rules the schedule is A1111's.
        config = {k: v for k, v in config.items() if k not in SCHEDULE_FLAGS}
    if rules == "diffusers":
        config = _diffusers_schedule(config, schedule)
    # The modules' own builders apply each row's overrides (DPM++ 2M SDE's algorithm_type...).
    sampler = make_solver(id, config) if id in SOLVERS else _sampler.make_sampler(id, config)
    if rules == "diffusers":
        return sampler
    # The same sampler with A1111's set_timesteps (a subclass that adds no state of its own).
    sampler.__class__ = _with_a1111_rules(cls)
    sampler.a1111_requested = schedule
    sampler.a1111_schedule = schedule or row.automatic or "uniform"
    sampler.a1111_model_sigmas = model_sigmas(ldm_alphas_cumprod(sampler.config))
    return sampler


# Infotext ------------------------------------------------------------------------------------------


def _config_schedule(sampler: Sampler) -> str:
    """The schedule type a diffusers-rules sampler runs, read from its config."""
    config = sampler.config
    flag = next((flag for flag in SCHEDULE_FLAGS if getattr(config, flag)), None)
    if flag is not None:
        return flag[len("use_") : -len("_sigmas")]
    return "sgm_uniform" if config.timestep_spacing == "trailing" else "uniform"


def a1111_label(sampler: Sampler) -> tuple[str, Optional[str]]:
    """The ``Sampler:`` and ``Schedule type:`` values A1111 (>= 1.9) writes for this sampler's run.

    A1111 writes the schedule it ran; "Automatic" only where that is the sampler's k-diffusion
    default (Euler, Euler a, LMS, Heun) or for samplers that take no schedule (DDIM, PLMS, LCM).
    Under diffusers' rules the schedule is read from the config: a spacing A1111 does not have
    ("leading") is written "Uniform", its nearest.
    """
    row = ROWS[sampler.name]
    if isinstance(sampler, _A1111Rules):
        if sampler.a1111_requested is None and row.automatic is None:
            return row.a1111, SCHEDULE_LABELS["automatic"]
        return row.a1111, SCHEDULE_LABELS[sampler.a1111_schedule]
    if not _is_sigma_based(type(sampler)):
        return row.a1111, SCHEDULE_LABELS["automatic"]
    return row.a1111, SCHEDULE_LABELS[_config_schedule(sampler)]


def parse_infotext_sampler(sampler_field: Optional[str], schedule_field: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(our id, schedule id or None) from an infotext's ``Sampler:`` and ``Schedule type:`` values.

    As A1111 reads them (sd_samplers.get_sampler_and_scheduler, infotext_utils): a missing schedule is
    "Automatic"; a legacy name's suffix ("DPM++ 2M Karras") names the schedule and wins over the field;
    "Automatic" is A1111's default schedule for the sampler (Karras for DPM++ 2M), uniform for its
    other k-diffusion samplers, and None (the model config's) for the rest. Samplers without
    schedule types (DDIM, PLMS, LCM) get None whatever the field says.
    """
    if sampler_field is None:
        return None, schedule_id(schedule_field)
    key = _key(sampler_field)
    base, legacy = (key, None) if key in _NAMES else _split_legacy(key)
    id, _ = resolve(base)
    if not _is_sigma_based(SAMPLERS[id]):
        return id, None  # A1111 writes a schedule type for these too, and ignores it
    schedule = legacy if legacy not in (None, "automatic") else schedule_id(schedule_field)
    if schedule is None and ROWS[id].k_diffusion != "-":
        schedule = ROWS[id].automatic or "uniform"
    return id, schedule

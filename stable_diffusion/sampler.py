"""Samplers: noise schedules, timestep spacing and step functions.

Each sampler reproduces one diffusers 0.42.1 scheduler built with ``Class.from_config(config)``
from the model's ``scheduler_config.json``:

    "euler"    EulerDiscreteScheduler
    "euler_a"  EulerAncestralDiscreteScheduler (Euler ancestral, k-diffusion's sample_euler_ancestral)
    "ddim"     DDIMScheduler with eta = 0, as the pipelines call it
    "dpm++2m"  DPMSolverMultistepScheduler with algorithm_type="dpmsolver++", solver_order=2

The schedule math is small pure numpy functions (k-diffusion style), computed in the precision
diffusers uses (torch float32 tensors, numpy float64 where diffusers uses numpy), then stored as
float32. Step-index-dependent scalars are precomputed in ``set_timesteps`` as Python floats, so
``scale_model_input``, ``step`` and ``add_noise`` are lazy MLX ops on the latents.
Steps are addressed by index ``i`` into ``timesteps`` (diffusers' internal step index): the
img2img start ``t_start`` is simply the first ``i`` passed.
"""

import math
from typing import Optional

import mlx.core as mx
import numpy as np

from .config import SPACINGS, SchedulerConfig


# Schedule math -------------------------------------------------------------------------------


def linspace_float32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=torch.float32)`` bit for bit, as diffusers builds betas.

    A float32 step, then start + i * step from the front half and end - (n - 1 - i) * step from the
    back half, each rounded once to float32 (numpy's correctly rounded linspace differs by 1 ulp).
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64(np.float32((end32 - start32) / np.float32(max(n - 1, 1))))
    i = np.arange(n)
    front = np.float64(start32) + step * i
    back = np.float64(end32) - step * (n - 1 - i)
    return np.where(i < max(n // 2, 1), front, back).astype(np.float32)


def betas_for_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The "squaredcos_cap_v2" (improved DDPM cosine) betas, computed in float64 then float32."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.array(betas, dtype=np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (Lin et al. 2023, algorithm 1), in float32."""
    alphas_bar_sqrt = np.sqrt(np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(np.float32)


def make_betas(config: SchedulerConfig) -> np.ndarray:
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        betas = linspace_float32(config.beta_start, config.beta_end, n)
    elif config.beta_schedule == "scaled_linear":
        betas = linspace_float32(config.beta_start**0.5, config.beta_end**0.5, n) ** 2
    elif config.beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(n)
    else:
        raise ValueError(f"scheduler: beta_schedule={config.beta_schedule!r} is not supported")
    if config.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def make_alphas_cumprod(config: SchedulerConfig, floor_zero_snr: bool = True) -> np.ndarray:
    """Cumulative product of alphas (float32; accumulated in float64 as torch does on CPU)."""
    alphas_cumprod = np.cumprod((1.0 - make_betas(config)).astype(np.float64)).astype(np.float32)
    if config.rescale_betas_zero_snr and floor_zero_snr:
        # The Karras-style schedulers keep the last sigma finite; DDIM does not.
        alphas_cumprod[-1] = 2**-24
    return alphas_cumprod


def sigmas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """k-diffusion's sigma(t) = sqrt((1 - alpha_bar) / alpha_bar) for every training timestep."""
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod).astype(np.float32)


def spaced_timesteps(spacing: str, num_steps: int, num_train_timesteps: int, steps_offset: int) -> np.ndarray:
    """Descending timesteps (float64) per "Common Diffusion Noise Schedules..." table 2.

    "linspace" is left unrounded: the Euler schedulers use it as is, DDIM/DPM round it.
    """
    if spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_steps)[::-1].copy()
    if spacing == "leading":
        step_ratio = num_train_timesteps // num_steps
        return (np.arange(0, num_steps) * step_ratio).round()[::-1] + steps_offset
    if spacing == "trailing":
        step_ratio = num_train_timesteps / num_steps
        return np.arange(num_train_timesteps, 0, -step_ratio).round() - 1
    raise ValueError(f"scheduler: timestep_spacing={spacing!r} is not supported (supported: {list(SPACINGS)})")


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels, eq. 5 (float64)."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Continuous timesteps of ``sigmas`` by linear interpolation in log-sigma."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, None]  # (num_train, num_sigmas)
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * high_idx


def final_sigma(config: SchedulerConfig, alphas_cumprod: np.ndarray) -> float:
    if config.final_sigmas_type == "zero":
        return 0.0
    if config.final_sigmas_type == "sigma_min":
        return float(np.sqrt((1 - alphas_cumprod[0]) / alphas_cumprod[0]))
    raise ValueError(f"scheduler: final_sigmas_type={config.final_sigmas_type!r} is not supported")


# Samplers ------------------------------------------------------------------------------------


class Sampler:
    """Base sampler: holds the training schedule and, once ``set_timesteps`` ran, one run's timesteps.

    A sampler is built per generation (``make_sampler``): its schedule and any multistep history
    belong to that run alone.
    """

    name: str = ""
    diffusers_class: str = ""
    needs_noise: bool = False

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.timestep_spacing = config.timestep_spacing
        self.alphas_cumprod = make_alphas_cumprod(config)
        self.train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self.timesteps: Optional[mx.array] = None
        self.sigmas: Optional[mx.array] = None
        self.init_noise_sigma: float = 1.0

    def set_timesteps(self, num_steps: int) -> None:
        raise NotImplementedError

    def scale_model_input(self, x: mx.array, i: int) -> mx.array:
        return x

    def step(self, model_output: mx.array, i: int, x: mx.array, noise: Optional[mx.array] = None) -> mx.array:
        raise NotImplementedError

    def add_noise(self, x0: mx.array, noise: mx.array, i: int) -> mx.array:
        raise NotImplementedError

    def _check_steps(self, num_steps: int) -> None:
        if num_steps < 1 or num_steps > self.config.num_train_timesteps:
            raise ValueError(f"num_steps must be in [1, {self.config.num_train_timesteps}], got {num_steps}")


class EulerSampler(Sampler):
    """Euler method on the probability-flow ODE (diffusers' EulerDiscreteScheduler, s_churn = 0)."""

    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"

    def _schedule(self, num_steps: int, karras: bool, sigma_last: float):
        cfg = self.config
        timesteps = spaced_timesteps(self.timestep_spacing, num_steps, cfg.num_train_timesteps, cfg.steps_offset)
        timesteps = timesteps.astype(np.float32)
        sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        if karras:
            sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), num_steps)
            timesteps = sigma_to_t(sigmas, np.log(self.train_sigmas)).astype(np.float32)
        return timesteps, np.concatenate([sigmas, [sigma_last]]).astype(np.float32)

    def set_timesteps(self, num_steps: int) -> None:
        self._check_steps(num_steps)
        timesteps, sigmas = self._schedule(
            num_steps, self.config.use_karras_sigmas, final_sigma(self.config, self.alphas_cumprod)
        )
        self._set_schedule(timesteps, sigmas)

    def _set_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray) -> None:
        self._sigmas = sigmas
        self.timesteps = mx.array(timesteps)
        self.sigmas = mx.array(sigmas)
        max_sigma = sigmas.max()
        # "leading" never reaches t = T - 1: the initial noise is the marginal of x_t, sqrt(sigma^2 + 1).
        if self.timestep_spacing in ("linspace", "trailing"):
            self.init_noise_sigma = float(max_sigma)
        else:
            self.init_noise_sigma = float(np.sqrt(max_sigma * max_sigma + np.float32(1)))
        # c_in = 1 / sqrt(sigma^2 + 1), kept as the divisor diffusers uses.
        self._in_scale = np.sqrt(sigmas * sigmas + np.float32(1))

    def scale_model_input(self, x: mx.array, i: int) -> mx.array:
        return x / float(self._in_scale[i])

    def _denoised(self, model_output: mx.array, i: int, x: mx.array) -> mx.array:
        """The model's estimate of x0 (x is float32; model_output keeps its dtype, as in diffusers)."""
        sigma = self._sigmas[i]
        kind = self.config.prediction_type
        if kind == "epsilon":
            return x - float(sigma) * model_output
        if kind == "v_prediction":
            c_out = -sigma / np.sqrt(sigma * sigma + np.float32(1))
            return model_output * float(c_out) + x / float(sigma * sigma + np.float32(1))
        return model_output

    def step(self, model_output: mx.array, i: int, x: mx.array, noise: Optional[mx.array] = None) -> mx.array:
        x = x.astype(mx.float32)
        sigma = self._sigmas[i]
        derivative = (x - self._denoised(model_output, i, x)) / float(sigma)
        x = x + derivative * float(self._sigmas[i + 1] - sigma)
        return x.astype(model_output.dtype)

    def add_noise(self, x0: mx.array, noise: mx.array, i: int) -> mx.array:
        return x0 + noise * float(self._sigmas[i])


class EulerAncestralSampler(EulerSampler):
    """Euler step to sigma_down plus fresh noise of std sigma_up (diffusers' EulerAncestralDiscreteScheduler)."""

    name = "euler_a"
    diffusers_class = "EulerAncestralDiscreteScheduler"
    needs_noise = True

    def set_timesteps(self, num_steps: int) -> None:
        self._check_steps(num_steps)
        timesteps, sigmas = self._schedule(num_steps, karras=False, sigma_last=0.0)
        self._set_schedule(timesteps, sigmas)
        sigma_from, sigma_to = sigmas[:-1], sigmas[1:]
        self._sigma_up = np.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2)
        self._sigma_down = np.sqrt(sigma_to**2 - self._sigma_up**2)

    def step(self, model_output: mx.array, i: int, x: mx.array, noise: Optional[mx.array] = None) -> mx.array:
        if noise is None:
            raise ValueError("EulerAncestralSampler.step needs `noise` (unit normal, same shape as x)")
        x = x.astype(mx.float32)
        sigma = self._sigmas[i]
        derivative = (x - self._denoised(model_output, i, x)) / float(sigma)
        x = x + derivative * float(self._sigma_down[i] - sigma)
        x = x + noise * float(self._sigma_up[i])
        return x.astype(model_output.dtype)


class DDIMSampler(Sampler):
    """Deterministic DDIM (eta = 0), diffusers' DDIMScheduler; computes in the latents' dtype as it does."""

    name = "ddim"
    diffusers_class = "DDIMScheduler"

    def __init__(self, config: SchedulerConfig):
        super().__init__(config)
        # DDIM keeps alpha_bar(T) = 0 under zero-SNR rescaling (diffusers does not floor it here).
        self.alphas_cumprod = make_alphas_cumprod(config, floor_zero_snr=False)

    def set_timesteps(self, num_steps: int) -> None:
        self._check_steps(num_steps)
        cfg = self.config
        timesteps = spaced_timesteps(self.timestep_spacing, num_steps, cfg.num_train_timesteps, cfg.steps_offset)
        timesteps = timesteps.round().astype(np.int64)
        ac = self.alphas_cumprod
        final = np.float32(1.0) if cfg.set_alpha_to_one else ac[0]
        prev = timesteps - cfg.num_train_timesteps // num_steps
        self._timesteps = timesteps
        self._alpha_t = ac[timesteps]
        self._alpha_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(np.float32)
        self.timesteps = mx.array(timesteps.astype(np.float32))
        self.sigmas = None
        self.init_noise_sigma = 1.0

    def step(self, model_output: mx.array, i: int, x: mx.array, noise: Optional[mx.array] = None) -> mx.array:
        alpha_t, alpha_prev = self._alpha_t[i], self._alpha_prev[i]
        beta_t = np.float32(1) - alpha_t
        sqrt_a, sqrt_b = float(np.sqrt(alpha_t)), float(np.sqrt(beta_t))
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = (x - sqrt_b * model_output) / sqrt_a
            eps = model_output
        elif kind == "sample":
            x0 = model_output
            eps = (x - sqrt_a * x0) / sqrt_b
        else:
            x0 = sqrt_a * x - sqrt_b * model_output
            eps = sqrt_a * model_output + sqrt_b * x
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = mx.clip(x0, -r, r)
        return float(np.sqrt(alpha_prev)) * x0 + float(np.sqrt(np.float32(1) - alpha_prev)) * eps

    def add_noise(self, x0: mx.array, noise: mx.array, i: int) -> mx.array:
        alpha = self.alphas_cumprod[self._timesteps[i]]
        return float(np.sqrt(alpha)) * x0 + float(np.sqrt(np.float32(1) - alpha)) * noise


class DPMPP2MSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022): DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", order 2."""

    name = "dpm++2m"
    diffusers_class = "DPMSolverMultistepScheduler"

    def __init__(self, config: SchedulerConfig):
        super().__init__(config)
        self._prev_denoised: Optional[mx.array] = None
        self._prev_i: Optional[int] = None

    def set_timesteps(self, num_steps: int) -> None:
        self._check_steps(num_steps)
        cfg = self.config
        n_train = cfg.num_train_timesteps
        if self.timestep_spacing == "trailing":
            timesteps = spaced_timesteps("trailing", num_steps, n_train, cfg.steps_offset)
        else:
            # linspace / leading over num_steps + 1 points, dropping the last (the t = 0 end).
            timesteps = spaced_timesteps(self.timestep_spacing, num_steps + 1, n_train, cfg.steps_offset)
            timesteps = timesteps[:-1]
        timesteps = timesteps.round().astype(np.int64)
        train_sigmas = self.train_sigmas
        if cfg.use_karras_sigmas:
            sigmas = karras_sigmas(float(train_sigmas[0]), float(train_sigmas[-1]), num_steps)
            timesteps = sigma_to_t(sigmas, np.log(train_sigmas))
            if cfg.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
            timesteps = timesteps.astype(np.int64)
        else:
            sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        sigmas = np.concatenate([sigmas, [final_sigma(cfg, self.alphas_cumprod)]]).astype(np.float32)

        self._sigmas = sigmas
        self.timesteps = mx.array(timesteps.astype(np.float32))
        self.sigmas = mx.array(sigmas)
        self.init_noise_sigma = 1.0
        # x_t = alpha_t x0 + sigma_t eps, with lambda_t = log(alpha_t / sigma_t) the solver's time.
        self._alpha = (np.float32(1) / np.sqrt(sigmas * sigmas + np.float32(1))).astype(np.float32)
        self._sigma = (sigmas * self._alpha).astype(np.float32)
        with np.errstate(divide="ignore"):
            self._lambda = np.log(self._alpha) - np.log(self._sigma)
        self._num_steps = num_steps
        self._prev_denoised = None
        self._prev_i = None

    def _denoised(self, model_output: mx.array, i: int, x: mx.array) -> mx.array:
        alpha_t, sigma_t = float(self._alpha[i]), float(self._sigma[i])
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (x - sigma_t * model_output) / alpha_t
        if kind == "v_prediction":
            return alpha_t * x - sigma_t * model_output
        return model_output

    def step(self, model_output: mx.array, i: int, x: mx.array, noise: Optional[mx.array] = None) -> mx.array:
        cfg = self.config
        n = self._num_steps
        # The last step is first order when the final sigma is 0 (the 2nd-order term would be inf * 0).
        first_order_final = i == n - 1 and (
            cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
        )
        denoised = self._denoised(model_output, i, x)
        # The multistep history is only valid for the step right before this one (a new run or an
        # img2img start begins with a first-order step, as diffusers' lower_order_nums = 0 does).
        prev = self._prev_denoised if self._prev_i == i - 1 else None
        self._prev_denoised, self._prev_i = denoised, i
        x = x.astype(mx.float32)

        t, s0 = i + 1, i
        h = self._lambda[t] - self._lambda[s0]
        c_x = float(self._sigma[t] / self._sigma[s0])
        c_d = self._alpha[t] * (np.exp(-h) - np.float32(1))
        out = c_x * x - float(c_d) * denoised
        if prev is not None and not first_order_final:
            r0 = (self._lambda[s0] - self._lambda[s0 - 1]) / h
            d1 = float(np.float32(1) / r0) * (denoised - prev)
            if cfg.solver_type == "midpoint":
                out = out - float(np.float32(0.5) * c_d) * d1
            else:
                c_heun = self._alpha[t] * ((np.exp(-h) - np.float32(1)) / h + np.float32(1))
                out = out + float(c_heun) * d1
        return out.astype(denoised.dtype)

    def add_noise(self, x0: mx.array, noise: mx.array, i: int) -> mx.array:
        return float(self._alpha[i]) * x0 + float(self._sigma[i]) * noise


SAMPLERS: dict[str, type[Sampler]] = {
    "euler": EulerSampler,
    "euler_a": EulerAncestralSampler,
    "ddim": DDIMSampler,
    "dpm++2m": DPMPP2MSampler,
}

def make_sampler(name: Optional[str], scheduler_config: dict) -> Sampler:
    """A new sampler ``name`` (a key of SAMPLERS) on the model's ``scheduler_config.json`` dict.

    As diffusers' ``Class.from_config(scheduler_config)``: the class's defaults, overridden by the
    config's values. ``name=None`` picks the model's own class: EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler, DDIMScheduler and DPMSolverMultistepScheduler map to "euler",
    "euler_a", "ddim" and "dpm++2m"; any other class (PNDMScheduler as in SD 1.x,
    LMSDiscreteScheduler, ...) falls back to "euler". Naming "dpm++2m" explicitly sets
    algorithm_type="dpmsolver++", solver_order=2 (a model's own DPM-Solver of another kind raises).
    """
    if name is None:
        own = scheduler_config.get("_class_name")
        name = next((s.name for s in SAMPLERS.values() if s.diffusers_class == own), "euler")
    elif name == "dpm++2m":
        scheduler_config = {**scheduler_config, "algorithm_type": "dpmsolver++", "solver_order": 2}
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r} (valid: {', '.join(SAMPLERS)})")
    cls = SAMPLERS[name]
    return cls(SchedulerConfig.from_dict(scheduler_config, cls.diffusers_class))

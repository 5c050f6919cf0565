"""Samplers: noise schedules, timestep spacing and step functions.

Each sampler reproduces one diffusers 0.42.1 scheduler built with ``Class.from_config(config)``
from the model's ``scheduler_config.json``:

    "euler"    EulerDiscreteScheduler
    "euler_a"  EulerAncestralDiscreteScheduler (Euler ancestral, k-diffusion's sample_euler_ancestral)
    "ddim"     DDIMScheduler with eta = 0, as the pipelines call it
    "dpm++2m"  DPMSolverMultistepScheduler with algorithm_type="dpmsolver++", solver_order=2
    "pndm"     PNDMScheduler with skip_prk_steps=True (PLMS; SD 1.5's and SD 2.1-base's own)
    "lms"      LMSDiscreteScheduler (k-diffusion's sample_lms)
    "heun"     HeunDiscreteScheduler (k-diffusion's sample_heun)
    "dpm2"     KDPM2DiscreteScheduler (k-diffusion's sample_dpm_2)
    "dpm2_a"   KDPM2AncestralDiscreteScheduler (k-diffusion's sample_dpm_2_ancestral)
    "lcm"      LCMScheduler (latent consistency models, LCM-LoRA)

The schedule math is small pure numpy functions (k-diffusion style), computed in the precision
diffusers uses (torch float32 tensors, numpy float64 where diffusers uses numpy), then stored as
float32. Step-index-dependent scalars are precomputed in ``set_timesteps`` as Python floats, so
``scale_model_input``, ``step`` and ``add_noise`` are lazy MLX ops on the latents.
Steps are addressed by index ``i`` into ``timesteps`` (diffusers' internal step index, one per
UNet call): the img2img start ``t_start * order`` is simply the first ``i`` passed. The sigma-based
samplers take the schedule flags use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas
(diffusers' formulas; the Beta quantile without scipy) and any caller's sigmas via ``set_sigmas``.
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


def exponential_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """Noise levels evenly spaced in log sigma (float64)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))


def incomplete_beta(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (float64), by its continued fraction.

    The fraction (modified Lentz) converges fast for x < (a + 1) / (a + b + 2); above that
    I_x(a, b) = 1 - I_(1-x)(b, a) keeps it there.
    """
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - incomplete_beta(1.0 - x, b, a)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-16:
            break
    return math.exp(log_front) * fraction / a


def beta_ppf(q: float, a: float, b: float) -> float:
    """The Beta(a, b) quantile (scipy.stats.beta.ppf), by bisection on ``incomplete_beta`` to float64 resolution."""
    if q <= 0.0 or q >= 1.0:
        return 0.0 if q <= 0.0 else 1.0
    low, high = 0.0, 1.0
    while True:
        mid = 0.5 * (low + high)
        if mid in (low, high):
            return mid
        if incomplete_beta(mid, a, b) < q:
            low = mid
        else:
            high = mid


def beta_sigmas(sigma_min: float, sigma_max: float, num_steps: int, a: float = 0.6, b: float = 0.6) -> np.ndarray:
    """Noise levels at the Beta(0.6, 0.6) quantiles of evenly spaced points ("Beta Sampling is All You Need", float64)."""
    quantiles = [beta_ppf(float(q), a, b) for q in 1 - np.linspace(0, 1, num_steps)]
    return np.array([sigma_min + ppf * (sigma_max - sigma_min) for ppf in quantiles])


SCHEDULE_SIGMAS = {"karras": karras_sigmas, "exponential": exponential_sigmas, "beta": beta_sigmas}


def schedule_type(config: SchedulerConfig) -> Optional[str]:
    """The config's noise-level schedule: "karras", "exponential", "beta", or None (the spacing's own)."""
    flags = {"karras": config.use_karras_sigmas, "exponential": config.use_exponential_sigmas, "beta": config.use_beta_sigmas}
    return next((kind for kind, on in flags.items() if on), None)


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


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list:
    """Linear multistep weights of the derivatives at steps i, i-1, ..., i-order+1 (float64).

    Weight j is the integral from sigma_i to sigma_(i+1) of the Lagrange basis polynomial that is 1 at
    sigma_(i-j) and 0 at the other nodes: a polynomial of degree order - 1, integrated exactly (diffusers
    integrates it numerically with scipy's quad). The variable is shifted to u = sigma - sigma_i so the
    bounds are 0 and h.
    """
    nodes = sigmas[i - np.arange(order)].astype(np.float64) - float(sigmas[i])
    h = float(sigmas[i + 1]) - float(sigmas[i])
    weights = []
    for j in range(order):
        others = np.delete(nodes, j)
        basis = np.atleast_1d(np.poly(others)) / np.prod(nodes[j] - others)  # coefficients, highest power first
        weights.append(float(np.polyval(np.polyint(basis), h)))
    return weights


# Samplers ------------------------------------------------------------------------------------


class Sampler:
    """Base sampler: holds the training schedule and, once ``set_timesteps`` ran, one run's timesteps.

    A sampler is built per generation (``make_sampler``): its schedule and any multistep history
    belong to that run alone. ``timesteps`` has one entry per UNet call; ``order`` is diffusers'
    ``scheduler.order`` (img2img starts at index ``t_start * order``).
    """

    name: str = ""
    diffusers_class: str = ""
    needs_noise: bool = False
    order: int = 1

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

    def _check_in_schedule(self, timesteps: np.ndarray, num_steps: int) -> None:
        """Refuse timesteps past the training schedule: "leading" spacing plus steps_offset reaches
        T at num_steps = T, which the classes that index alphas_cumprod (DDIM, PNDM) cannot run
        (diffusers fails there with an IndexError)."""
        cfg = self.config
        last = cfg.num_train_timesteps - 1
        if timesteps.max() > last:
            fits = lambda n: spaced_timesteps(self.timestep_spacing, n, cfg.num_train_timesteps, cfg.steps_offset).round().max() <= last  # noqa: E731
            most = next(n for n in range(num_steps - 1, 0, -1) if fits(n))
            raise ValueError(f"{self.name}: {num_steps} steps with steps_offset={cfg.steps_offset} reach timestep {int(timesteps.max())}, past the schedule's last ({last}); use at most {most} steps")

    def _check_noise(self, noise: Optional[mx.array]) -> None:
        if noise is None:
            raise ValueError(f"{type(self).__name__}.step needs `noise` (unit normal, same shape as x)")


def sigma_denoised(prediction_type: str, model_output: mx.array, x: mx.array, sigma: np.float32) -> mx.array:
    """The model's estimate of x0 at noise level ``sigma`` (k-diffusion's c_skip x + c_out F)."""
    if prediction_type == "epsilon":
        return x - float(sigma) * model_output
    if prediction_type == "v_prediction":
        c_out = -sigma / np.sqrt(sigma * sigma + np.float32(1))
        return model_output * float(c_out) + x / float(sigma * sigma + np.float32(1))
    return model_output


def vp_denoised(prediction_type: str, model_output: mx.array, x: mx.array, alpha: np.float32, sigma: np.float32) -> mx.array:
    """The model's estimate of x0 from x_t = alpha x0 + sigma eps (the DPM-Solver family's variable)."""
    if prediction_type == "epsilon":
        return (x - float(sigma) * model_output) / float(alpha)
    if prediction_type == "v_prediction":
        return float(alpha) * x - float(sigma) * model_output
    return model_output


class SigmaSampler(Sampler):
    """A sampler in k-diffusion's variable x = x0 + sigma * eps (diffusers' *DiscreteScheduler classes).

    ``set_timesteps`` computes diffusers' schedule and hands it to ``set_sigmas``, which a caller may
    also call with its own sigmas (A1111's).
    """

    # diffusers' KDPM2 classes round the Karras timesteps; Euler, Heun and LMS keep them fractional.
    round_karras_timesteps = False

    def set_timesteps(self, num_steps: int) -> None:
        self._check_steps(num_steps)
        cfg = self.config
        timesteps = spaced_timesteps(self.timestep_spacing, num_steps, cfg.num_train_timesteps, cfg.steps_offset)
        timesteps = timesteps.astype(np.float32)
        sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        kind = schedule_type(cfg)
        if kind is not None:
            sigmas = SCHEDULE_SIGMAS[kind](float(sigmas[-1]), float(sigmas[0]), num_steps)
            timesteps = sigma_to_t(sigmas, np.log(self.train_sigmas))
            if kind == "karras" and self.round_karras_timesteps:
                timesteps = timesteps.round()
        self.set_sigmas(np.concatenate([sigmas, [self._final_sigma()]]).astype(np.float32), timesteps)

    def _final_sigma(self) -> float:
        return 0.0

    def set_sigmas(self, sigmas: np.ndarray, timesteps: np.ndarray) -> None:
        """One run's schedule: ``sigmas`` (n + 1, the last one where the run ends) and ``timesteps`` (n)."""
        sigmas = np.asarray(sigmas, dtype=np.float32)
        timesteps = np.asarray(timesteps, dtype=np.float64)
        if sigmas.ndim != 1 or timesteps.shape != (len(sigmas) - 1,) or len(timesteps) < 1:
            raise ValueError(f"set_sigmas needs n + 1 sigmas and n timesteps (n >= 1), got {sigmas.shape} and {timesteps.shape}")
        self._sigmas = sigmas
        self._set_run(sigmas, timesteps)
        max_sigma = sigmas.max()
        # "leading" never reaches t = T - 1: the initial noise is the marginal of x_t, sqrt(sigma^2 + 1).
        if self.timestep_spacing in ("linspace", "trailing"):
            self.init_noise_sigma = float(max_sigma)
        else:
            self.init_noise_sigma = float(np.sqrt(max_sigma * max_sigma + np.float32(1)))

    def _set_run(self, sigmas: np.ndarray, timesteps: np.ndarray) -> None:
        """The per-call arrays: ``_call_sigmas`` (the sigma of each UNet call, then the end) and the timesteps."""
        self._call_sigmas = sigmas
        self.timesteps = mx.array(timesteps.astype(np.float32))
        self.sigmas = mx.array(sigmas)

    def scale_model_input(self, x: mx.array, i: int) -> mx.array:
        return x / float(_input_divisor(self._input_sigma(i)))

    def _input_sigma(self, i: int) -> np.float32:
        return self._call_sigmas[i]

    def _denoised(self, model_output: mx.array, x: mx.array, sigma: np.float32) -> mx.array:
        return sigma_denoised(self.config.prediction_type, model_output, x, sigma)

    def add_noise(self, x0: mx.array, noise: mx.array, i: int) -> mx.array:
        return x0 + noise * float(self._call_sigmas[i])


def _input_divisor(sigma: np.float32) -> np.float32:
    """sqrt(sigma^2 + 1): the model input is x / this (c_in), computed in float32 as diffusers does."""
    return np.sqrt(sigma * sigma + np.float32(1))


class EulerSampler(SigmaSampler):
    """Euler method on the probability-flow ODE (diffusers' EulerDiscreteScheduler, s_churn = 0)."""

    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"

    def _final_sigma(self) -> float:
        return final_sigma(self.config, self.alphas_cumprod)

    def step(self, model_output: mx.array, i: int, x: mx.array, noise: Optional[mx.array] = None) -> mx.array:
        x = x.astype(mx.float32)
        sigma = self._sigmas[i]
        derivative = (x - self._denoised(model_output, x, sigma)) / float(sigma)
        x = x + derivative * float(self._sigmas[i + 1] - sigma)
        return x.astype(model_output.dtype)


class EulerAncestralSampler(EulerSampler):
    """Euler step to sigma_down plus fresh noise of std sigma_up (diffusers' EulerAncestralDiscreteScheduler)."""

    name = "euler_a"
    diffusers_class = "EulerAncestralDiscreteScheduler"
    needs_noise = True

    def _final_sigma(self) -> float:
        return 0.0

    def set_sigmas(self, sigmas: np.ndarray, timesteps: np.ndarray) -> None:
        super().set_sigmas(sigmas, timesteps)
        sigmas = self._sigmas
        sigma_from, sigma_to = sigmas[:-1], sigmas[1:]
        self._sigma_up = np.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2)
        self._sigma_down = np.sqrt(sigma_to**2 - self._sigma_up**2)

    def step(self, model_output: mx.array, i: int, x: mx.array, noise: Optional[mx.array] = None) -> mx.array:
        self._check_noise(noise)
        x = x.astype(mx.float32)
        sigma = self._sigmas[i]
        derivative = (x - self._denoised(model_output, x, sigma)) / float(sigma)
        x = x + derivative * float(self._sigma_down[i] - sigma)
        x = x + noise * float(self._sigma_up[i])
        return x.astype(model_output.dtype)


class LMSSampler(SigmaSampler):
    """Linear multistep of order 4 on the sigma ODE (diffusers' LMSDiscreteScheduler, k-diffusion's sample_lms)."""

    name = "lms"
    diffusers_class = "LMSDiscreteScheduler"
    lms_order = 4

    def set_sigmas(self, sigmas: np.ndarray, timesteps: np.ndarray) -> None:
        super().set_sigmas(sigmas, timesteps)
        # diffusers takes the order from the step index, not from the history it holds: an img2img
        # run that starts at index s weighs its first derivative as the newest of min(s + 1, 4).
        n = len(self._sigmas) - 1
        self._weights = [lms_coefficients(self._sigmas, i, min(i + 1, self.lms_order)) for i in range(n)]
        self._derivatives: list = []  # the run's latest derivatives, newest last

    def step(self, model_output: mx.array, i: int, x: mx.array, noise: Optional[mx.array] = None) -> mx.array:
        x = x.astype(mx.float32)
        sigma = self._sigmas[i]
        derivative = (x - self._denoised(model_output, x, sigma)) / float(sigma)
        self._derivatives = (self._derivatives + [derivative])[-self.lms_order :]
        for weight, d in zip(self._weights[i], reversed(self._derivatives)):
            x = x + weight * d
        return x.astype(model_output.dtype)


class HeunSampler(SigmaSampler):
    """Heun's 2nd-order method (Karras et al. 2022, algorithm 1 without churn): diffusers' HeunDiscreteScheduler.

    Each step but the last takes two UNet calls: an Euler step to the next sigma, then the average of
    the two derivatives from the same start. ``timesteps`` holds every call (2n - 1, as diffusers).
    """

    name = "heun"
    diffusers_class = "HeunDiscreteScheduler"
    order = 2

    def _set_run(self, sigmas: np.ndarray, timesteps: np.ndarray) -> None:
        calls = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        super()._set_run(calls, np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)]))
        self._held: Optional[tuple] = None  # (x, derivative, dt) of a first-order call awaiting its second

    def step(self, model_output: mx.array, i: int, x: mx.array, noise: Optional[mx.array] = None) -> mx.array:
        x = x.astype(mx.float32)
        sigmas = self._call_sigmas
        if self._held is None:
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            derivative = (x - self._clipped(self._denoised(model_output, x, sigma))) / float(sigma)
            dt = sigma_next - sigma
            self._held = (x, derivative, dt)
        else:
            sigma_next = sigmas[i]
            start, first, dt = self._held
            derivative = (x - self._clipped(self._denoised(model_output, x, sigma_next))) / float(sigma_next)
            derivative = (first + derivative) / 2
            x = start
            self._held = None
        return (x + derivative * float(dt)).astype(model_output.dtype)

    def _clipped(self, denoised: mx.array) -> mx.array:
        if not self.config.clip_sample:
            return denoised
        r = self.config.clip_sample_range
        return mx.clip(denoised, -r, r)


def _lerp_half(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """torch.lerp(start, end, 0.5) in float32 (its weight >= 0.5 branch: end - (end - start) * 0.5)."""
    return end - (end - start) * np.float32(0.5)


class DPM2Sampler(SigmaSampler):
    """k-diffusion's DPM-Solver-2 ("DPM2"): diffusers' KDPM2DiscreteScheduler.

    A step evaluates the model at sigma_i, takes an Euler step to the geometric mean of sigma_i and
    sigma_(i+1), evaluates there and steps from x_i with that derivative. 2n - 1 UNet calls; the last
    step is first order (to a midpoint of 0: the model's x0 estimate).
    """

    name = "dpm2"
    diffusers_class = "KDPM2DiscreteScheduler"
    order = 2
    round_karras_timesteps = True

    def _set_run(self, sigmas: np.ndarray, timesteps: np.ndarray) -> None:
        with np.errstate(divide="ignore", invalid="ignore"):  # log 0 at the end, as diffusers
            log_sigmas = np.log(sigmas)
            midpoints = np.exp(_lerp_half(log_sigmas, np.roll(log_sigmas, 1)))
        self._set_interleaved(sigmas, midpoints, timesteps, midpoints[1:-1])

    def _set_interleaved(self, sigmas, midpoints, timesteps, call_midpoints) -> None:
        """diffusers' arrays: each value after the first doubled, then the last again; the timesteps of the
        midpoint calls between those of the sigma calls."""
        doubled = lambda v: np.concatenate([v[:1], np.repeat(v[1:], 2), v[-1:]])  # noqa: E731
        mid_t = sigma_to_t(call_midpoints, np.log(self.train_sigmas))
        calls_t = np.concatenate([timesteps[:1], np.stack([mid_t, timesteps[1:]], axis=-1).reshape(-1)])
        super()._set_run(doubled(sigmas), calls_t)
        self._midpoints = doubled(midpoints.astype(np.float32))
        self._held: Optional[mx.array] = None  # x of a first-order call awaiting its second

    def _input_sigma(self, i: int) -> np.float32:
        return self._call_sigmas[i] if self._held is None else self._midpoints[i]

    def step(self, model_output: mx.array, i: int, x: mx.array, noise: Optional[mx.array] = None) -> mx.array:
        x = x.astype(mx.float32)
        sigmas, mids = self._call_sigmas, self._midpoints
        if self._held is None:
            sigma, mid = sigmas[i], mids[i + 1]
            derivative = (x - self._denoised(model_output, x, sigma)) / float(sigma)
            dt = mid - sigma
            self._held = x
        else:
            sigma, mid, sigma_next = sigmas[i - 1], mids[i], sigmas[i]
            derivative = (x - self._denoised(model_output, x, mid)) / float(mid)
            dt = sigma_next - sigma
            x, self._held = self._held, None
        return (x + derivative * float(dt)).astype(model_output.dtype)


class DPM2AncestralSampler(DPM2Sampler):
    """DPM2 to sigma_down plus fresh noise of std sigma_up: diffusers' KDPM2AncestralDiscreteScheduler.

    Noise is added at the second call of each step (odd call indices from an even start): n - 1 draws.
    """

    name = "dpm2_a"
    diffusers_class = "KDPM2AncestralDiscreteScheduler"
    needs_noise = True

    def _set_run(self, sigmas: np.ndarray, timesteps: np.ndarray) -> None:
        sigmas_next = np.concatenate([sigmas[1:], [np.float32(0)]])
        with np.errstate(divide="ignore", invalid="ignore"):  # 0 / 0 at the end, as diffusers
            up = np.sqrt(sigmas_next**2 * (sigmas**2 - sigmas_next**2) / sigmas**2)
            down = np.sqrt(sigmas_next**2 - up**2)
            down[-1] = 0.0
            midpoints = np.exp(_lerp_half(np.log(sigmas), np.log(down)))
        midpoints[-2:] = 0.0
        doubled = lambda v: np.concatenate([v[:1], np.repeat(v[1:], 2), v[-1:]])  # noqa: E731
        self._up, self._down = doubled(up), doubled(down)
        self._set_interleaved(sigmas, midpoints, timesteps, midpoints[:-2])

    def _input_sigma(self, i: int) -> np.float32:
        return self._call_sigmas[i] if self._held is None else self._midpoints[i - 1]

    def step(self, model_output: mx.array, i: int, x: mx.array, noise: Optional[mx.array] = None) -> mx.array:
        x = x.astype(mx.float32)
        if self._held is None:
            sigma, mid = self._call_sigmas[i], self._midpoints[i]
            derivative = (x - self._denoised(model_output, x, sigma)) / float(sigma)
            self._held = x
            return (x + derivative * float(mid - sigma)).astype(model_output.dtype)
        self._check_noise(noise)
        sigma, mid = self._call_sigmas[i - 1], self._midpoints[i - 1]
        up, down = self._up[i - 1], self._down[i - 1]
        derivative = (x - self._denoised(model_output, x, mid)) / float(mid)
        x, self._held = self._held + derivative * float(down - sigma), None
        return (x + noise * float(up)).astype(model_output.dtype)


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
        self._check_in_schedule(timesteps, num_steps)
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
        return noised(self.alphas_cumprod[self._timesteps[i]], x0, noise)


def noised(alpha_bar: np.float32, x0: mx.array, noise: mx.array) -> mx.array:
    """The forward process q(x_t | x0) at alpha_bar(t): sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise."""
    return float(np.sqrt(alpha_bar)) * x0 + float(np.sqrt(np.float32(1) - alpha_bar)) * noise


class PNDMSampler(Sampler):
    """Pseudo numerical methods (Liu et al. 2022): diffusers' PNDMScheduler.

    With skip_prk_steps (the SD configs), PLMS: n steps make n + 1 UNet calls (one for n = 1), the
    second-highest timestep twice, its second call closing a 2nd-order first step; later steps combine
    up to 4 past model outputs with the Adams-Bashforth weights. Without, the first 3 steps are
    4-call Runge-Kutta steps (n + 9 calls). Each update is the paper's transfer formula (9).
    """

    name = "pndm"
    diffusers_class = "PNDMScheduler"

    def set_timesteps(self, num_steps: int) -> None:
        self._check_steps(num_steps)
        cfg = self.config
        ascending = spaced_timesteps(self.timestep_spacing, num_steps, cfg.num_train_timesteps, cfg.steps_offset)
        ascending = ascending[::-1].round().astype(np.int64)
        self._check_in_schedule(ascending, num_steps)
        self._half = cfg.num_train_timesteps // num_steps // 2
        if cfg.skip_prk_steps:
            prk = ascending[:0]
            plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        elif num_steps < 4:
            raise ValueError(f"PNDM's Runge-Kutta warm-up (skip_prk_steps=False) needs num_steps >= 4, got {num_steps}")
        else:
            # Each of the 3 highest steps at t, t - stride/2 (twice) and t - stride, as diffusers lists them.
            prk = np.repeat(ascending[-4:], 2) + np.tile([0, self._half], 4)
            prk = np.repeat(prk[:-1], 2)[1:-1][::-1]
            plms = ascending[:-3][::-1]
        self._prk = prk
        self._timesteps = np.concatenate([prk, plms])
        self._stride = cfg.num_train_timesteps // num_steps
        self._final_alpha = np.float32(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = mx.array(self._timesteps.astype(np.float32))
        self.init_noise_sigma = 1.0
        self._outputs: list = []  # diffusers' ets: past model outputs, newest last
        self._counter = 0  # calls made in this run (an img2img run starts at 0 too)
        self._start_x: Optional[mx.array] = None  # x where the step under way started
        self._rk_sum: Optional[mx.array] = None  # the Runge-Kutta step's weighted outputs so far

    def step(self, model_output: mx.array, i: int, x: mx.array, noise: Optional[mx.array] = None) -> mx.array:
        step = self._runge_kutta if self._counter < len(self._prk) else self._linear_multistep
        x = step(model_output, int(self._timesteps[i]), x)
        self._counter += 1
        return x

    def _runge_kutta(self, model_output: mx.array, t: int, x: mx.array) -> mx.array:
        """One of the 4 calls of a classical Runge-Kutta step (weights 1/6, 1/3, 1/3, 1/6), diffusers' step_prk."""
        phase = self._counter % 4
        t_prev = t - (0 if self._counter % 2 else self._half)
        if phase == 0:
            self._rk_sum = (1 / 6) * model_output
            self._outputs.append(model_output)
            self._start_x = x
        elif phase < 3:
            self._rk_sum = self._rk_sum + (1 / 3) * model_output
        else:
            model_output = self._rk_sum + (1 / 6) * model_output
        return self._transfer(self._start_x, int(self._prk[self._counter // 4 * 4]), t_prev, model_output)

    def _linear_multistep(self, model_output: mx.array, t: int, x: mx.array) -> mx.array:
        """diffusers' step_plms."""
        t_prev = t - self._stride
        if self._counter != 1:
            self._outputs = self._outputs[-3:] + [model_output]
        else:  # the repeated timestep: finish the first step from its start
            t_prev, t = t, t + self._stride
        e = self._outputs
        if len(e) == 1 and self._counter == 0:
            self._start_x = x
        elif len(e) == 1 and self._counter == 1:
            model_output = (model_output + e[-1]) / 2
            x, self._start_x = self._start_x, None
        elif len(e) == 2:
            model_output = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            model_output = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])
        return self._transfer(x, t, t_prev, model_output)

    def _transfer(self, x: mx.array, t: int, t_prev: int, model_output: mx.array) -> mx.array:
        """x at t_prev from x at t and the (combined) noise estimate, PNDM eq. (9), float32 as diffusers."""
        alpha = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self._final_alpha
        beta, beta_prev = np.float32(1) - alpha, np.float32(1) - alpha_prev
        if self.config.prediction_type == "v_prediction":
            model_output = float(np.sqrt(alpha)) * model_output + float(np.sqrt(beta)) * x
        x_coeff = np.sqrt(alpha_prev / alpha)
        denominator = alpha * np.sqrt(beta_prev) + np.sqrt(alpha * beta * alpha_prev)
        return float(x_coeff) * x - float(alpha_prev - alpha) * model_output / float(denominator)

    def add_noise(self, x0: mx.array, noise: mx.array, i: int) -> mx.array:
        return noised(self.alphas_cumprod[self._timesteps[i]], x0, noise)


class LCMSampler(Sampler):
    """Latent consistency model sampling (Luo et al. 2023): diffusers' LCMScheduler.

    Each call maps x_t to the consistency function's x0 (the boundary condition c_skip x + c_out x0_pred)
    and, except at the last step, noises it again to the next timestep: needs noise at every call but
    the last.
    """

    name = "lcm"
    diffusers_class = "LCMScheduler"
    needs_noise = True

    def __init__(self, config: SchedulerConfig):
        super().__init__(config)
        # As DDIM: diffusers' LCM keeps alpha_bar(T) = 0 under zero-SNR rescaling.
        self.alphas_cumprod = make_alphas_cumprod(config, floor_zero_snr=False)

    def set_timesteps(self, num_steps: int) -> None:
        cfg = self.config
        original = cfg.original_inference_steps
        if not 1 <= original <= cfg.num_train_timesteps:
            raise ValueError(f"scheduler: original_inference_steps={original} must be in [1, {cfg.num_train_timesteps}]")
        if not 1 <= num_steps <= original:
            raise ValueError(f"num_steps must be in [1, {original}] for LCM (the scheduler's original_inference_steps), got {num_steps}")
        # The distillation's timesteps, every k-th from k - 1, highest first; the run takes n of them evenly.
        k = cfg.num_train_timesteps // original
        origin = (np.arange(1, original + 1) * k - 1)[::-1]
        picks = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
        self._timesteps = origin[picks]
        self._final_alpha = np.float32(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = mx.array(self._timesteps.astype(np.float32))
        self.init_noise_sigma = 1.0

    def _boundary(self, t: int) -> tuple:
        """c_skip, c_out of the consistency parametrisation at t (sigma_data = 0.5), float32 as diffusers."""
        scaled = np.float32(t) * np.float32(self.config.timestep_scaling)
        c_skip = np.float32(0.25) / (scaled * scaled + np.float32(0.25))
        c_out = scaled / np.sqrt(scaled * scaled + np.float32(0.25))
        return c_skip, c_out

    def step(self, model_output: mx.array, i: int, x: mx.array, noise: Optional[mx.array] = None) -> mx.array:
        last = i == len(self._timesteps) - 1
        if not last:
            self._check_noise(noise)
        t = int(self._timesteps[i])
        t_prev = t if last else int(self._timesteps[i + 1])
        alpha = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self._final_alpha
        sqrt_a, sqrt_b = float(np.sqrt(alpha)), float(np.sqrt(np.float32(1) - alpha))
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = (x - sqrt_b * model_output) / sqrt_a
        elif kind == "v_prediction":
            x0 = sqrt_a * x - sqrt_b * model_output
        else:
            x0 = model_output
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = mx.clip(x0, -r, r)
        c_skip, c_out = self._boundary(t)
        denoised = float(c_out) * x0 + float(c_skip) * x
        if last:
            return denoised
        return noised(alpha_prev, denoised, noise)

    def add_noise(self, x0: mx.array, noise: mx.array, i: int) -> mx.array:
        return noised(self.alphas_cumprod[self._timesteps[i]], x0, noise)


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
        kind = schedule_type(cfg)
        if kind is not None:
            # Unlike the discrete schedulers, the range is the whole training range.
            sigmas = SCHEDULE_SIGMAS[kind](float(train_sigmas[0]), float(train_sigmas[-1]), num_steps)
            timesteps = sigma_to_t(sigmas, np.log(train_sigmas))
            if kind == "karras" and cfg.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
            timesteps = timesteps.astype(np.int64)  # truncates, as diffusers' torch cast does
        else:
            sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        self.set_sigmas(np.concatenate([sigmas, [final_sigma(cfg, self.alphas_cumprod)]]).astype(np.float32), timesteps)

    def set_sigmas(self, sigmas: np.ndarray, timesteps: np.ndarray) -> None:
        """One run's schedule: ``sigmas`` (n + 1, the last one where the run ends) and ``timesteps`` (n)."""
        sigmas = np.asarray(sigmas, dtype=np.float32)
        self._sigmas = sigmas
        self.timesteps = mx.array(np.asarray(timesteps).astype(np.float32))
        self.sigmas = mx.array(sigmas)
        self.init_noise_sigma = 1.0
        # x_t = alpha_t x0 + sigma_t eps, with lambda_t = log(alpha_t / sigma_t) the solver's time.
        self._alpha = (np.float32(1) / np.sqrt(sigmas * sigmas + np.float32(1))).astype(np.float32)
        self._sigma = (sigmas * self._alpha).astype(np.float32)
        with np.errstate(divide="ignore"):
            self._lambda = np.log(self._alpha) - np.log(self._sigma)
        self._num_steps = len(sigmas) - 1
        self._prev_denoised = None
        self._prev_i = None

    def _denoised(self, model_output: mx.array, i: int, x: mx.array) -> mx.array:
        return vp_denoised(self.config.prediction_type, model_output, x, self._alpha[i], self._sigma[i])

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
    sampler.name: sampler
    for sampler in (
        EulerSampler,
        EulerAncestralSampler,
        DDIMSampler,
        DPMPP2MSampler,
        PNDMSampler,
        LMSSampler,
        HeunSampler,
        DPM2Sampler,
        DPM2AncestralSampler,
        LCMSampler,
    )
}


def make_sampler(name: Optional[str], scheduler_config: dict) -> Sampler:
    """A new sampler ``name`` (a key of SAMPLERS) on the model's ``scheduler_config.json`` dict.

    As diffusers' ``Class.from_config(scheduler_config)``: the class's defaults, overridden by the
    config's values. ``name=None`` picks the model's own class when it is one of SAMPLERS' classes
    (PNDMScheduler for SD 1.5 and SD 2.1-base), else "euler". Naming "dpm++2m" explicitly sets
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

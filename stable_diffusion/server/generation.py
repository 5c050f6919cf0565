"""txt2img and img2img jobs on the library: A1111's request -> the facade's generators -> pictures.

Runs on the queue's worker thread (``jobs.Worker``), one job at a time. The denoising is the
library's own (``generate_latents`` / ``generate_latents_from_image``, ``decode``); this module adds
what A1111's ``process_images`` adds around it: ``n_iter`` batches of ``batch_size`` images with
seeds ``seed + k`` (image k of the request, drawn once when the seed is -1), the progress of each
step, previews, interrupt/skip between steps, and the infotext of each picture.

Image k of a request is exactly what ``generate_latents(seed=seed + k, n_images=1)`` makes: its
initial noise and a stochastic sampler's step noise come from its own seed
(``distributed.initial_noise`` / ``step_noise``, as the scripts batch).
"""

import datetime
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from .. import distributed, images, inpaint, lora
from ..file_hash import model_hash
from ..pipeline import load_model
from ..sampler_names import ROWS, a1111_label, make_sampler, resolve
from . import a1111, catalog
from .a1111 import ApiError
from .jobs import Cancelled

# A1111's seed range: get_fixed_seed draws in [0, 4294967294).
SEED_DRAW = 4294967294
PREVIEW_SIDE = 32  # previews decode at most this many latent pixels a side (256 px for SD)


def sampler_rules(sampler: str) -> str:
    """The sampler rules of a request's sampler (our id): A1111's (k-diffusion's sigmas, so that an A1111
    infotext makes the same image) for the samplers A1111 runs through k-diffusion; diffusers' classes
    for A1111's own timestep samplers (DDIM, PLMS, UniPC, LCM: SillyTavern's default is DDIM), whose
    A1111 code is not ported."""
    return "diffusers" if ROWS[sampler].k_diffusion == "-" else "a1111"


@dataclass
class Settings:
    """The server's command line, as the jobs read it."""

    model: str
    models_dir: Optional[str] = None
    lora_dir: Optional[str] = None
    output_dir: str = "outputs"
    save_images: bool = False
    float16: bool = False
    preview_every: int = 0
    max_pixels: int = 2048 * 2048
    max_images: int = 100


@dataclass
class Plan:
    """A checked request: what the worker runs."""

    mode: str  # "txt2img" or "img2img"
    request: dict
    checkpoint: catalog.Checkpoint
    restore: bool  # override_settings_restore_afterwards
    sampler: Optional[str]
    schedule: Optional[str]
    clip_skip: int
    init_image: Optional[Image.Image] = None
    mask: Optional[Image.Image] = None
    extra: dict = field(default_factory=dict)


class Models:
    """The checkpoint list, the one model in memory, and the options clients set (/options)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.listing = catalog.checkpoints(settings.model, settings.models_dir)
        self.current = self.listing[0]  # the options' sd_model_checkpoint
        self.loaded: Optional[catalog.Checkpoint] = None
        self.sd = None
        self.hash: Optional[str] = None
        self.options = {"CLIP_stop_at_last_layers": 1, "samples_format": "png", "sd_vae": "Automatic", "show_progress_every_n_steps": settings.preview_every}

    def refresh(self):
        self.listing = catalog.checkpoints(self.settings.model, self.settings.models_dir)

    def find(self, name: str) -> catalog.Checkpoint:
        found = catalog.find(self.listing, name)
        if found is None:
            self.refresh()  # a file copied into --models-dir since the start
            found = catalog.find(self.listing, name)
        if found is None:
            raise ApiError(404, f"model {name!r} not found (GET /sdapi/v1/sd-models lists them)")
        return found

    def get(self, checkpoint: catalog.Checkpoint):
        """The facade of ``checkpoint``, loaded now if another one is in memory (worker thread only)."""
        if self.loaded != checkpoint:
            self.sd = self.loaded = None  # the old weights go before the new ones come
            self.sd = load_model(checkpoint.source, float16=self.settings.float16)
            self.loaded = checkpoint
            self.hash = model_hash(checkpoint.source)[:10] if os.path.isfile(checkpoint.source) else None
        return self.sd


def plan(mode: str, body, models: Models, settings: Settings) -> Plan:
    """Read and check a request before it is queued: types, ranges, names, pictures. ApiError otherwise."""
    request = a1111.read_fields(body, a1111.TXT2IMG if mode == "txt2img" else a1111.IMG2IMG)
    for flag, what in (("enable_hr", "hires fix"), ("restore_faces", "face restoration"), ("tiling", "tiling")):
        if request[flag]:
            raise ApiError(422, f"{flag}: {what} is not supported by this server; send {flag}: false")
    if request["subseed_strength"]:
        raise ApiError(422, "subseed_strength: variation seeds are not supported by this server; send 0")
    if request["script_name"]:
        raise ApiError(422, f"script {request['script_name']!r} not found (this server runs no scripts)")
    if request["alwayson_scripts"]:  # ControlNet and the other extensions' arguments: refused, not ignored, as A1111 refuses a missing one
        raise ApiError(422, f"always on script {next(iter(request['alwayson_scripts']))!r} not found (this server runs no scripts)")
    for name in ("steps", "batch_size", "n_iter"):
        if request[name] < 1:
            raise ApiError(422, f"field {name!r}: must be at least 1, got {request[name]}")
    if request["steps"] > 1000:
        raise ApiError(422, f"field 'steps': {request['steps']} is more than the models' 1000 training timesteps")
    if request["batch_size"] * request["n_iter"] > settings.max_images:
        raise ApiError(422, f"batch_size x n_iter = {request['batch_size'] * request['n_iter']} images: more than the server's limit of {settings.max_images} per request")
    for name in ("width", "height"):
        if request[name] < 8:
            raise ApiError(422, f"field {name!r}: must be at least 8, got {request[name]}")
    if request["width"] * request["height"] > settings.max_pixels:
        raise ApiError(422, f"{request['width']}x{request['height']} is more than the server's limit of {settings.max_pixels} pixels (--max-pixels)")
    if not -1 <= request["seed"] < 2**64:
        raise ApiError(422, f"field 'seed': must be -1 (draw one) or a whole number in [0, 2**64), got {request['seed']}")
    sampler, schedule = _sampler(request["sampler_name"] or request["sampler_index"], request["scheduler"])

    overrides = request["override_settings"]
    wanted = overrides.get("sd_model_checkpoint")
    checkpoint = models.current if wanted is None else models.find(a1111.as_str("override_settings.sd_model_checkpoint", wanted))
    clip_skip = models.options["CLIP_stop_at_last_layers"]
    if "CLIP_stop_at_last_layers" in overrides:
        clip_skip = a1111.as_int("override_settings.CLIP_stop_at_last_layers", overrides["CLIP_stop_at_last_layers"])
    if request["clip_skip"] is not None:
        clip_skip = request["clip_skip"]
    result = Plan(mode, request, checkpoint, request["override_settings_restore_afterwards"], sampler, schedule, clip_skip)
    if mode == "img2img":
        _plan_img2img(result, settings)
    return result


def _sampler(name: str, scheduler: Optional[str]) -> tuple:
    """(sampler id, schedule id) as A1111 takes them: its timestep samplers (DDIM, PLMS, UniPC, LCM) ignore
    the scheduler (SillyTavern sends "normal" with DDIM by default); an unknown name is a 404, as A1111's."""
    try:
        sampler, _ = resolve(name)
        if ROWS[sampler].k_diffusion == "-":
            return sampler, None
        return resolve(name, scheduler)
    except ValueError as e:
        raise ApiError(404, f"sampler not found: {e}") from None


def _plan_img2img(plan: Plan, settings: Settings):
    request = plan.request
    if not request["init_images"]:
        raise ApiError(404, "Init image not found: send init_images, a list of one base64 picture")
    if not 0 < request["denoising_strength"] <= 1:
        raise ApiError(422, f"field 'denoising_strength': must be in (0, 1], got {request['denoising_strength']:g}")
    if request["resize_mode"] != 0:
        raise ApiError(422, "resize_mode: only 0 (just resize) is supported")
    plan.init_image = images.to_rgb(a1111.decode_image(request["init_images"][0], "init_images[0]", settings.max_pixels))
    if request["mask"]:
        mask = a1111.mask_picture(a1111.decode_image(request["mask"], "mask", settings.max_pixels))
        if request["inpainting_mask_invert"] not in (0, 1):
            raise ApiError(422, f"field 'inpainting_mask_invert': 0 or 1, got {request['inpainting_mask_invert']}")
        if request["inpainting_mask_invert"]:
            mask = mask.point(lambda v: 255 - v)
        if request["mask_blur"] < 0 or request["inpaint_full_res_padding"] < 0:
            raise ApiError(422, "mask_blur and inpaint_full_res_padding must be >= 0")
        plan.mask = mask


def draw_seeds(seed: int, n: int) -> list[int]:
    """A1111's seeds of a request: seed + k for image k; -1 draws the first."""
    first = secrets.randbelow(SEED_DRAW) if seed == -1 else seed
    return distributed.seeds_for(first, n)


def run(job, plan: Plan, models: Models, settings: Settings) -> dict:
    """The worker's part of /txt2img and /img2img: the A1111 response dict."""
    request, progress = plan.request, job.progress
    progress.begin(f"{plan.mode} (loading {plan.checkpoint.title})" if models.loaded != plan.checkpoint else plan.mode, request["n_iter"])
    previous = models.current
    sd = _model(models, plan.checkpoint)
    progress.job = plan.mode
    try:
        output, meta = _generate(job, plan, sd, models, settings)
    finally:
        if not plan.restore:
            models.current = plan.checkpoint
        else:
            models.current = previous
    pictures = output.pictures
    if request["save_images"] or settings.save_images:
        _save(pictures, output, plan.mode, settings)
    encoded = [a1111.encode_png(p, t) for p, t in zip(pictures, output.infotexts)] if request["send_images"] else []
    info = a1111.info_json(request, output, job_timestamp=progress.job_timestamp, **meta)
    parameters = dict(request)
    if plan.mode == "img2img" and not request["include_init_images"]:
        parameters["init_images"], parameters["mask"] = None, None
    return {"images": encoded, "parameters": parameters, "info": info}


def _model(models: Models, checkpoint):
    try:
        return models.get(checkpoint)
    except ValueError as e:
        raise ApiError(422, f"model {checkpoint.title!r}: {e}") from None


def _generate(job, plan: Plan, sd, models: Models, settings: Settings):
    request, progress = plan.request, job.progress
    f = sd.latent_factor
    width, height = request["width"] // f * f, request["height"] // f * f
    if width < f or height < f:
        raise ApiError(422, f"{request['width']}x{request['height']} is smaller than this model's {f} px latent pixel")
    steps, cfg, bs = request["steps"], request["cfg_scale"], request["batch_size"]
    rules = sampler_rules(plan.sampler)
    label, schedule_label = a1111_label(make_sampler(plan.sampler, sd.scheduler_config, plan.schedule, rules))
    seeds = draw_seeds(request["seed"], bs * request["n_iter"])
    strength = request.get("denoising_strength") if plan.mode == "img2img" else None
    calls = sd.denoising_calls(steps, strength, plan.sampler, plan.schedule, rules)
    all_calls = sd.denoising_calls(steps, None, plan.sampler, plan.schedule, rules)  # the step keys split over the full schedule
    source = _Img2Img(plan, sd, width, height) if plan.mode == "img2img" else None
    extra = source.extra() if source else {}
    options = dict(sampler=plan.sampler, schedule=plan.schedule, sampler_rules=rules, clip_skip=plan.clip_skip, lora_dir=settings.lora_dir)
    prompt, negative = request["prompt"], request["negative_prompt"]
    lora_hashes = _lora_hashes(sd, prompt, negative, steps, plan.clip_skip, settings.lora_dir)

    pictures, used = [], []
    for n in range(request["n_iter"]):
        if job.should_stop() in ("interrupted", "cancelled"):
            break
        progress.batch(n, calls)
        batch = seeds[n * bs : (n + 1) * bs]
        shape = (height // f, width // f, sd.autoencoder.config.latent_channels)
        noise = distributed.initial_noise(batch, shape)
        step_noise = distributed.step_noise(batch, all_calls)
        common = dict(num_steps=steps, cfg_weight=cfg, negative_text=negative, step_noise=step_noise, **options)
        if source is None:
            latents = sd.generate_latents(prompt, n_images=len(batch), latents=noise, **common)
        else:
            latents = source.generate(prompt, len(batch), noise, common)
        x = _denoise(job, sd, latents, calls, max(models.options["show_progress_every_n_steps"], 0))
        if x is None:
            continue
        decoded = np.asarray(sd.decode(x))
        pictures += source.paste(decoded) if source else [Image.fromarray(p) for p in images.to_uint8(decoded)]
        used += batch

    def infotext(seed):
        return images.format_parameters(
            prompt,
            negative,
            Steps=steps,
            Sampler=label,
            Schedule_type=schedule_label,
            CFG_scale=f"{cfg:g}",
            Seed=seed,
            Size=f"{width}x{height}",
            Model_hash=models.hash,
            Model=Path(plan.checkpoint.title).stem,
            Denoising_strength=f"{strength:g}" if strength is not None else None,
            Clip_skip=plan.clip_skip if plan.clip_skip > 1 else None,
            **extra,
            Lora_hashes=lora_hashes,
        )

    output = a1111.Output(pictures, [infotext(s) for s in used], [prompt] * len(used), [negative] * len(used), used, [-1] * len(used))
    meta = dict(
        width=width,
        height=height,
        sampler=label,
        model_name=Path(plan.checkpoint.title).stem,
        model_hash=models.hash,
        clip_skip=plan.clip_skip,
        denoising_strength=strength,
        extra={key.replace("_", " "): value for key, value in extra.items() if value is not None},  # A1111's infotext names
        inpainting=plan.mask is not None and sd.unet.config.in_channels == 9,
    )
    return output, meta


def _lora_hashes(sd, prompt, negative, steps, clip_skip, lora_dir) -> Optional[str]:
    from ..pipeline import prompt_lora_file

    info, _ = sd.prompt_info(prompt, negative, steps, "a1111", "Original", clip_skip)
    files = [prompt_lora_file(name, weight, lora_dir) for name, weight in info.loras]
    return lora.infotext_hashes(files) if files else None


def _denoise(job, sd, latents, calls: int, preview_every: int):
    """Run a generator's steps, reporting each; stop early on interrupt/skip (the latest latent is
    decoded, as A1111 does), or raise Cancelled when the client is gone. Returns the last latent."""
    x = None
    try:
        for i, x in enumerate(latents, start=1):
            job.progress.step(i)
            stop = job.should_stop()
            if stop == "cancelled":
                raise Cancelled()
            if stop:
                break
            if preview_every and i % preview_every == 0 and i < calls:
                job.progress.set_preview(preview(sd, x), i)
    finally:
        latents.close()
    return x


def preview(sd, x) -> str:
    """The first image's current latent decoded small (average-pooled to at most PREVIEW_SIDE a side), as base64 PNG."""
    z = x[:1]
    h, w = z.shape[1:3]
    k = max(1, -(-max(h, w) // PREVIEW_SIDE))
    if k > 1:
        z = z[:, : h // k * k, : w // k * k]
        z = z.reshape(1, h // k, k, w // k, k, z.shape[-1]).mean(axis=(2, 4))
    picture = images.to_uint8(np.asarray(sd.decode(z)))[0]
    return a1111.encode_png(Image.fromarray(picture), None)


class _Img2Img:
    """An img2img request's picture, mask and "only masked" crop, ready for the facade."""

    def __init__(self, plan: Plan, sd, width: int, height: int):
        self.plan, self.sd = plan, sd
        request = plan.request
        picture = plan.init_image
        if picture.size != (width, height):  # A1111's resize_mode 0: just resize (Lanczos)
            picture = picture.resize((width, height), Image.Resampling.LANCZOS)
        self.picture, self.crop = picture, None
        self.mask = None if plan.mask is None else plan.mask.resize((width, height), Image.Resampling.LANCZOS) if plan.mask.size != (width, height) else plan.mask
        self.blur = request["mask_blur"]
        if self.mask is not None and request["inpaint_full_res"]:
            try:
                self.crop = inpaint.crop_to_mask(picture, self.mask, request["inpaint_full_res_padding"], width, height, blur=self.blur, multiple=sd.latent_factor)
            except ValueError as e:
                raise ApiError(422, f"mask: {e}") from None

    def extra(self) -> dict:
        if self.mask is None:
            return {}
        request = self.plan.request
        full = request["inpaint_full_res"]
        return {
            "Mask_blur": request["mask_blur"],
            "Inpaint_area": "Only masked" if full else None,
            "Masked_area_padding": request["inpaint_full_res_padding"] if full else None,
        }

    def generate(self, prompt, n, noise, common):
        request = self.plan.request
        strength = request["denoising_strength"]
        if self.crop is not None:
            image, mask, blur = self.crop.image, self.crop.mask, 0
        else:
            image, mask, blur = self.picture, self.mask, self.blur if self.mask is not None else 0
        return self.sd.generate_latents_from_image(
            images.to_model_input(image), prompt, n_images=n, strength=strength, noise=noise, mask=mask, mask_blur=blur, **common
        )

    def paste(self, decoded) -> list:
        if self.crop is not None:
            return self.crop.paste(decoded)
        return [Image.fromarray(p) for p in images.to_uint8(decoded)]


def _save(pictures, output, mode: str, settings: Settings):
    """save_images: each picture as A1111 names it (NNNNN-SEED.png) in OUTPUT/<mode>-images/<date>/; nothing else is written."""
    folder = Path(settings.output_dir) / f"{mode}-images" / datetime.date.today().isoformat()
    folder.mkdir(parents=True, exist_ok=True)
    start = len([p for p in folder.iterdir() if p.suffix == ".png"])
    for k, (picture, text, seed) in enumerate(zip(pictures, output.infotexts, output.seeds)):
        images.save_image(picture, folder / f"{start + k:05d}-{seed}.png", text)


def switch(job, models: Models, name: str):
    """POST /options sd_model_checkpoint: load the model on the worker (in turn with the jobs)."""
    checkpoint = models.find(name)
    job.progress.begin(f"load {checkpoint.title}", 1)
    _model(models, checkpoint)
    models.current = checkpoint

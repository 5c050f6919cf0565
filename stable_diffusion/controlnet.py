"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"), in NHWC.

Follows diffusers' ``ControlNetModel`` (models/controlnets/controlnet.py): a copy of the UNet's
``conv_in``, time embedding (SDXL: and ``add_embedding``), down blocks and mid block, built from
unet.py's own blocks; the control image enters through ``controlnet_cond_embedding`` (a small
conv stack down to the latent size), added to ``conv_in``'s output; every skip and the mid block's
output leave through a 1x1 conv (``controlnet_down_blocks``, ``controlnet_mid_block``) as the
residuals ``UNetModel`` adds to its own skips and mid block.

Loads a diffusers folder or Hub repo (``config.json`` + ``diffusion_pytorch_model.safetensors``)
and a single file in the original layout (``control_model.input_hint_block.*``, ``zero_convs.*``,
``middle_block_out.*`` and the LDM UNet's ``input_blocks``/``middle_block``), as diffusers'
``convert_controlnet_checkpoint`` reads it. Safetensors only.
"""

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image

from . import model_io, safetensors_io
from .config import UNetConfig
from .errors import ModelLoadError, one_line
from .hub_configs import FAMILY_FOLDERS, HubModel
from .images import open_picture, to_rgb
from .inpaint import nearest_resize
from .ldm_keys import convert_unet
from .unet import LinearGroup, UNetMidBlock2DCrossAttn, UNetModel, add_input_layers, build_down_blocks, embed_time, run_down_blocks

CHANNEL_ORDERS = ("rgb", "bgr")

# Short names for the ControlNets people use most; each maps to a living Hub repo in diffusers' layout.
_V11 = "lllyasviel/control_v11"
CONTROLNET_PRESETS = {
    "sd15-canny": f"{_V11}p_sd15_canny",
    "sd15-depth": f"{_V11}f1p_sd15_depth",
    "sd15-openpose": f"{_V11}p_sd15_openpose",
    "sd15-lineart": f"{_V11}p_sd15_lineart",
    "sd15-lineart-anime": f"{_V11}p_sd15s2_lineart_anime",
    "sd15-softedge": f"{_V11}p_sd15_softedge",
    "sd15-scribble": f"{_V11}p_sd15_scribble",
    "sd15-seg": f"{_V11}p_sd15_seg",
    "sd15-normalbae": f"{_V11}p_sd15_normalbae",
    "sd15-mlsd": f"{_V11}p_sd15_mlsd",
    "sd15-inpaint": f"{_V11}p_sd15_inpaint",
    "sd15-tile": f"{_V11}f1e_sd15_tile",
    "sd15-shuffle": f"{_V11}e_sd15_shuffle",
    "sd15-ip2p": f"{_V11}e_sd15_ip2p",
    "sdxl-canny": "diffusers/controlnet-canny-sdxl-1.0",
    "sdxl-canny-mid": "diffusers/controlnet-canny-sdxl-1.0-mid",
    "sdxl-canny-small": "diffusers/controlnet-canny-sdxl-1.0-small",
    "sdxl-depth": "diffusers/controlnet-depth-sdxl-1.0",
    "sdxl-depth-mid": "diffusers/controlnet-depth-sdxl-1.0-mid",
    "sdxl-depth-small": "diffusers/controlnet-depth-sdxl-1.0-small",
}
_UNION = (
    "ControlNetUnionModel (xinsir/controlnet-union-sdxl-1.0 and its kind: one network for several control types) "
    "is not supported; use a single-condition ControlNet such as diffusers/controlnet-canny-sdxl-1.0"
)


@dataclass
class ControlNetConfig(UNetConfig):
    """The UNet fields a ControlNet copies, plus its own (diffusers' ``ControlNetModel`` arguments)."""

    conditioning_channels: int = 3
    conditioning_embedding_out_channels: Tuple[int, ...] = (16, 32, 96, 256)
    controlnet_conditioning_channel_order: str = "rgb"
    # Each residual is averaged over H and W (the "shuffle" ControlNet).
    global_pool_conditions: bool = False

    @classmethod
    def from_dict(cls, config: dict) -> "ControlNetConfig":
        what = "controlnet"
        if not isinstance(config, dict):
            raise ValueError(f"{what}: expected a JSON object, got a {type(config).__name__}")
        if config.get("_class_name") == "ControlNetUnionModel" or "num_control_type" in config:
            raise ValueError(_UNION)
        # A ControlNet has no up blocks: UNetConfig checks the shared fields given the mirror of
        # the down blocks, which nothing builds.
        mirror = ["CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D" for t in config.get("down_block_types", ())[::-1]]
        unet = UNetConfig.from_dict({**config, "up_block_types": mirror})
        channels = config.get("conditioning_channels", 3)
        embedding = config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
        order = config.get("controlnet_conditioning_channel_order", "rgb")
        pool = config.get("global_pool_conditions", False)
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"{what}: conditioning_channels={channels!r} must be a whole number >= 1")
        if not isinstance(embedding, (list, tuple)) or not embedding or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in embedding):
            raise ValueError(f"{what}: conditioning_embedding_out_channels={embedding!r} must be a list of whole numbers >= 1")
        if order not in CHANNEL_ORDERS:
            raise ValueError(f"{what}: controlnet_conditioning_channel_order={order!r} is not supported (supported: {list(CHANNEL_ORDERS)})")
        if not isinstance(pool, bool):
            raise ValueError(f"{what}: global_pool_conditions={pool!r} must be true or false")
        return cls(
            **{f.name: getattr(unet, f.name) for f in fields(UNetConfig)},
            conditioning_channels=channels,
            conditioning_embedding_out_channels=tuple(embedding),
            controlnet_conditioning_channel_order=order,
            global_pool_conditions=pool,
        )


class ControlNetConditioningEmbedding(nn.Module):
    """conv_in, then (3x3 conv, stride-2 3x3 conv) per step of ``channels``, each followed by SiLU, then conv_out."""

    def __init__(self, out_channels: int, in_channels: int, channels: Tuple[int, ...]):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        self.blocks = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(channels[-1], out_channels, kernel_size=3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = nn.silu(self.conv_in(x))
        for block in self.blocks:
            x = nn.silu(block(x))
        return self.conv_out(x)


class ControlNetModel(nn.Module):
    """diffusers ``ControlNetModel``: latents, timestep, text and a control image -> the UNet's residuals."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config  # ControlNetConfig.from_dict refused what is not implemented
        channels = config.block_out_channels
        time_embed_dim = add_input_layers(self, config)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            channels[0], config.conditioning_channels, config.conditioning_embedding_out_channels
        )

        self.down_blocks = build_down_blocks(config, time_embed_dim)
        if config.mid_block_type == "UNetMidBlock2DCrossAttn":
            self.mid_block = UNetMidBlock2DCrossAttn(config, time_embed_dim)
        # One 1x1 conv per skip: conv_in's output, each resnet's, each downsampler's.
        skip_channels = [channels[0]]
        for i, c in enumerate(channels):
            skip_channels += [c] * (config.layers_per_block[i] + (i < len(channels) - 1))
        self.controlnet_down_blocks = [nn.Conv2d(c, c, kernel_size=1) for c in skip_channels]
        self.controlnet_mid_block = nn.Conv2d(channels[-1], channels[-1], kernel_size=1)

        blocks = [*self.down_blocks, *([self.mid_block] if "mid_block" in self else [])]
        self._time_projections = LinearGroup([(resnet, "time_emb_proj") for block in blocks for resnet in block.resnets])

    # The same groups as the UNet's: every time_emb_proj, and each attention's projections.
    fuse_projections = UNetModel.fuse_projections
    sanitize = UNetModel.sanitize

    def __call__(
        self,
        x: mx.array,
        timestep,
        encoder_x: mx.array,
        controlnet_cond: mx.array,
        conditioning_scale: float = 1.0,
        text_time: tuple[mx.array, mx.array] | None = None,
        guess_mode: bool = False,
    ) -> tuple[list[mx.array], mx.array]:
        """x (B, H, W, C_in) latents; timestep scalar or (B,); encoder_x (B, L, D); controlnet_cond
        (B or 1, 8H, 8W, conditioning_channels), RGB in [0, 1]; SDXL's text_time as for the UNet.

        Returns (one residual per UNet skip, the mid block's residual), scaled by
        ``conditioning_scale`` (guess mode: also by 10^-1 ... 10^0 from the first skip to the mid block).
        """
        config = self.config
        dtype = self.conv_in.weight.dtype
        x = x.astype(dtype)
        encoder_x = encoder_x.astype(dtype)
        cond = controlnet_cond.astype(dtype)
        if config.controlnet_conditioning_channel_order == "bgr":
            cond = cond[..., ::-1]

        emb = embed_time(self, timestep, x.shape[0], text_time)
        tembs = iter(self._time_projections(nn.silu(emb)))

        if cond.ndim != 4 or cond.shape[0] not in (1, x.shape[0]) or cond.shape[-1] != config.conditioning_channels:
            raise ValueError(
                f"controlnet_cond of shape {tuple(cond.shape)}: expected (1 or {x.shape[0]}, height, width, {config.conditioning_channels})"
            )
        h = self.conv_in(x)
        hint = self.controlnet_cond_embedding(cond)
        if hint.shape[1:3] != h.shape[1:3]:
            raise ValueError(
                f"controlnet_cond of size {cond.shape[1]}x{cond.shape[2]} does not match latents of "
                f"size {x.shape[1]}x{x.shape[2]}; give the control image at the picture's size (8x the latents')"
            )
        h, skips = run_down_blocks(self.down_blocks, h + hint, tembs, encoder_x)
        if "mid_block" in self:
            h = self.mid_block(h, tembs, encoder_x)

        down = [conv(skip) for conv, skip in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(h)
        scales = [conditioning_scale] * (len(down) + 1)
        if guess_mode and not config.global_pool_conditions:
            # torch.logspace(-1, 0, n) (float32), times the scale, as diffusers.
            scales = (np.logspace(-1, 0, len(down) + 1).astype(np.float32) * np.float32(conditioning_scale)).tolist()
        down = [d * s for d, s in zip(down, scales)]
        mid = mid * scales[-1]
        if config.global_pool_conditions:
            down = [d.mean(axis=(1, 2), keepdims=True) for d in down]
            mid = mid.mean(axis=(1, 2), keepdims=True)
        return down, mid


# ---- several ControlNets in one denoising step --------------------------------------------------


@dataclass
class Control:
    """One ControlNet's guidance of a generation: its control image (1 or N, H, W, C) in [0, 1] at
    the picture's size, its weight, and the fraction of the steps it acts on (diffusers'
    ``controlnet_conditioning_scale``, ``control_guidance_start``/``end``)."""

    model: ControlNetModel
    image: mx.array
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def keeps(self, step: int, num_steps: int) -> bool:
        """diffusers' ``controlnet_keep[step]`` (num_steps: the length of the scheduler's timesteps)."""
        return not (step / num_steps < self.start or (step + 1) / num_steps > self.end)


def control_residuals(
    controls: list[Control],
    x: mx.array,
    timestep,
    context: mx.array,
    text_time: tuple[mx.array, mx.array] | None,
    step: int,
    num_steps: int,
    uncond_rows: int = 0,
    guess_mode: bool = False,
) -> tuple[list[mx.array], mx.array] | None:
    """The summed residuals of ``controls`` for one UNet call on ``x``, as diffusers' ControlNet
    pipelines and ``MultiControlNetModel`` compute them; None when no ControlNet acts on this step.

    ``uncond_rows``: how many leading rows of this batch are classifier-free guidance's
    unconditional half. In guess mode (also whenever the first ControlNet pools its conditions,
    as diffusers decides) the ControlNets see only the other rows and the unconditional rows get
    zero residuals. A ControlNet outside its start/end span contributes nothing: diffusers runs
    it at scale 0, which adds zeros.
    """
    guess_mode = guess_mode or controls[0].model.config.global_pool_conditions
    first = uncond_rows if guess_mode else 0
    rows = x.shape[0] - first
    active = [c for c in controls if c.keeps(step, num_steps)]
    if not active or rows == 0:
        return None
    t = timestep if isinstance(timestep, mx.array) else mx.array(timestep)
    t = mx.broadcast_to(t.reshape(-1), (x.shape[0],))[first:]
    text_time = None if text_time is None else tuple(a[first:] for a in text_time)
    down, mid = None, None
    for c in active:
        image = c.image if c.image.shape[0] == 1 else mx.concatenate([c.image] * (rows // c.image.shape[0]))
        d, m = c.model(x[first:], t, context[first:], image, c.scale, text_time, guess_mode)
        down, mid = (d, m) if down is None else ([a + b for a, b in zip(down, d)], mid + m)
    if first:
        down = [mx.concatenate([mx.zeros((first, *d.shape[1:]), d.dtype), d]) for d in down]
        mid = mx.concatenate([mx.zeros((first, *mid.shape[1:]), mid.dtype), mid])
    return down, mid


def prepare_control_image(image, height: int, width: int) -> mx.array:
    """A control image as diffusers' ControlNet pipelines prepare it (``VaeImageProcessor(do_convert_rgb=True,
    do_normalize=False).preprocess(image, height, width)``): (1 or N, height, width, 3) float32 in [0, 1].

    ``image``: a picture file or PIL image (made RGB, Lanczos-resized), or an (H, W, 3) / (N, H, W, 3)
    float array in [0, 1] (resized nearest-neighbour, as torch's ``interpolate``, when of another size).
    A picture's transparency is dropped, its colours kept (``convert("RGB")``, as diffusers' ``load_image``
    and ``convert_to_rgb``; an input image is composited on white instead); 16-bit greyscale is scaled to 8 bits.
    """
    if isinstance(image, (str, Path)):
        image = open_picture(image, "control image")
    if isinstance(image, Image.Image):
        image = image.convert("RGB") if image.mode in ("RGBA", "LA", "PA", "RGBa", "La", "P") else to_rgb(image)
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        return mx.array(np.asarray(image, dtype=np.float32) / 255.0)[None]
    try:
        a = np.asarray(image)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"the control image must be a picture or an (H, W, 3) array in [0, 1], got {type(image).__name__} ({one_line(e)[:80]})") from None
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3 or 0 in a.shape:
        raise ValueError(f"the control image array has shape {a.shape}; expected (H, W, 3) or (N, H, W, 3), RGB")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"the control image array has dtype {a.dtype}; expected floats in [0, 1] (for 8-bit values divide by 255)")
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise ValueError("the control image array must hold finite values in [0, 1]")
    if a.shape[1:3] != (height, width):
        a = np.stack([np.stack([nearest_resize(c[..., k], height, width) for k in range(3)], axis=-1) for c in a])
    return mx.array(a.astype(np.float32))


def controlnet_name(controlnet: ControlNetModel) -> str:
    """What an infotext calls the ControlNet (A1111 writes the model's file name): its folder's, file's or repo's name."""
    return getattr(controlnet, "source_name", "controlnet")


def checked_controls(controls, unet_config, latent_factor: int, n_images: int, height: int, width: int) -> list:
    """A generation's ``controls`` checked (ValueError, one line) and their images prepared at ``height`` x ``width``.

    ``latent_factor``: the VAE's, by which the ControlNet's hint convs must downsample the control image too.
    """
    if controls is None:
        return []
    if isinstance(controls, Control) or not isinstance(controls, (list, tuple)):
        raise ValueError(f"controls must be a list of Control(model, image, ...), got {type(controls).__name__}")
    prepared = []
    for i, control in enumerate(controls):
        what = f"controls[{i}]"
        if not isinstance(control, Control):
            raise ValueError(f"{what} must be a Control(model, image, scale, start, end), got {type(control).__name__}")
        if not isinstance(control.model, ControlNetModel):
            raise ValueError(f"{what}.model must be a ControlNet (load_controlnet(...)), got {type(control.model).__name__}")
        config = control.model.config
        if (config.cross_attention_dim, config.addition_embed_type) != (unet_config.cross_attention_dim, unet_config.addition_embed_type):
            raise ValueError(
                f"{what}: the ControlNet {controlnet_name(control.model)!r} is for another model family "
                f"(text width {config.cross_attention_dim}, this model's {unet_config.cross_attention_dim}); use one made for this model"
            )
        if config.conditioning_channels != 3:
            raise ValueError(
                f"{what}: the ControlNet {controlnet_name(control.model)!r} takes {config.conditioning_channels}-channel control images; only RGB ones are supported"
            )
        hint_factor = 2 ** (len(config.conditioning_embedding_out_channels) - 1)
        if hint_factor != latent_factor:
            raise ValueError(
                f"{what}: the ControlNet {controlnet_name(control.model)!r} reads control images at {hint_factor}x its latents, "
                f"this model's VAE makes latents at 1/{latent_factor} of the picture; use a ControlNet made for this model"
            )
        for name in ("scale", "start", "end"):
            value = getattr(control, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not np.isfinite(value):
                raise ValueError(f"{what}.{name} must be a finite number, got {value!r}")
        if not 0 <= control.start < control.end <= 1:
            raise ValueError(f"{what}: start {control.start:g} and end {control.end:g} must satisfy 0 <= start < end <= 1 (fractions of the steps)")
        image = prepare_control_image(control.image, height, width)
        mx.eval(image)  # here, so that a step run on another thread can read it
        if image.shape[0] not in (1, n_images):
            raise ValueError(f"{what}: {image.shape[0]} control images for {n_images} images; give one, or one per image")
        prepared.append(replace(control, image=image, scale=float(control.scale), start=float(control.start), end=float(control.end)))
    return prepared


class ControlRun:
    """A generation's ControlNets: the residuals of each of its UNet batches.

    ``n_calls``: the UNet calls of the run (img2img: those that run), over which start and end count,
    as diffusers' ``controlnet_keep`` counts the (truncated) timesteps.
    """

    def __init__(self, controls: list, guess_mode: bool, n_calls: int):
        self.controls, self.guess_mode, self.n_calls = controls, guess_mode, n_calls
        for model in {id(c.model): c.model for c in controls}.values():
            if not getattr(model, "_fused", False):
                model.fuse_projections()  # as the UNet's: fewer, larger matmuls, the same weights
                model._fused = True
                # The fused weights are lazy concatenations: made here, so that a step run on another thread can read them.
                mx.eval(model.parameters())

    def unet_arguments(self, x: mx.array, timestep, context: mx.array, text_time, k: int, uncond_rows: int) -> dict:
        """The UNet's residual arguments for the run's k-th call on the batch ``x`` ({} when no ControlNet acts)."""
        residuals = control_residuals(self.controls, x, timestep, context, text_time, k, self.n_calls, uncond_rows, self.guess_mode)
        if residuals is None:
            return {}
        down, mid = residuals
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


# ---- loading -------------------------------------------------------------------------------------

LDM_PREFIX = "control_model."
_DIFFUSERS_KEY = "controlnet_cond_embedding.conv_in.weight"
_LDM_KEY = "input_hint_block.0.weight"


class _SingleFile:
    """A single ControlNet file's config and weights, read the way ``model_io.load_component`` reads a component."""

    def __init__(self, name: str, config: dict, weights: dict):
        self.name = name
        self._config = config
        self._weights = weights

    def config(self, component: str) -> dict:
        return self._config

    def weights(self, component: str, float16: bool) -> tuple[dict, str]:
        return self._weights, self.name


def load_controlnet(model: str, float16: bool = False, config_dir: Optional[str] = None) -> ControlNetModel:
    """A ControlNet from a preset name (``CONTROLNET_PRESETS``), a diffusers folder, a Hub repo id or
    a single ``.safetensors`` file.

    float16: the model's dtype (and the folder's ``fp16`` weights when it has them). ``config_dir``
    (a folder holding the ControlNet's ``config.json``) applies to single files, whose keys
    cannot tell every setting; without it a single file is read as a ControlNet of the SD family
    its tensors show (SD 1.x, SD 2.x, SDXL), as ``ControlNetModel.from_unet`` builds one from
    that family's reference UNet. The model's ``source_name`` is what infotexts call it.
    """
    if not isinstance(model, (str, Path)) or not str(model).strip():
        raise ValueError(f"controlnet must be a preset name, a folder, a Hub repo id or a .safetensors file, got {model!r}")
    model = CONTROLNET_PRESETS.get(str(model), str(model))
    path = Path(model).expanduser()
    dtype = mx.float16 if float16 else mx.float32
    if path.is_file():
        controlnet = model_io.load_component(_single_file(path, config_dir), "controlnet", ControlNetModel, ControlNetConfig, dtype)
        controlnet.source_name = path.stem
        return _read(controlnet)
    if config_dir is not None:
        raise ModelLoadError(f"controlnet {model!r}: config_dir applies to single .safetensors files only")
    source = model_io.resolve(model, float16, patterns=_repo_files, what="controlnet")
    # A diffusers ControlNet folder is one component: config.json and the weights at its top
    # (component ""); a pipeline folder holds it in controlnet/.
    component = "controlnet" if not (source.root / "config.json").exists() and (source.root / "controlnet").is_dir() else ""
    controlnet = model_io.load_component(source, component, ControlNetModel, ControlNetConfig, dtype, float16_files=float16)
    controlnet.source_name = path.name if path.is_dir() else model.rpartition("/")[2]
    return _read(controlnet)


def _read(controlnet: ControlNetModel) -> ControlNetModel:
    """The weights read now, in the loading thread: a lazily loaded array cannot be evaluated from
    another thread (mlx >= 0.31.2), and generations run their steps in worker threads."""
    mx.eval(controlnet.parameters())
    return controlnet


def _repo_files(files: list[str], float16: bool) -> tuple[list[str], list[str]]:
    """A ControlNet repo's config and one variant of its weights, at the repo's top (model_io.resolve's ``patterns``)."""
    top = [f for f in files if "/" not in f]
    if "config.json" not in top:
        raise ModelLoadError("the repo has no config.json at its top (not a diffusers ControlNet); pass one of its .safetensors files instead")
    return ["config.json"], model_io.select_weight_files(top, float16)


def _single_file(path: Path, config_dir: Optional[str]) -> _SingleFile:
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path}: only .safetensors ControlNet files are loaded (never pickles); convert it first")
    arrays, _ = safetensors_io.load(path)
    if config_dir is not None:
        config = model_io.read_config(Path(config_dir).expanduser(), "")
        weights = to_diffusers_names(arrays, str(path), config)
    else:
        weights = to_diffusers_names(arrays, str(path))
        config = derived_config({k: tuple(v.shape) for k, v in weights.items()})
    return _SingleFile(str(path), config, weights)


def to_diffusers_names(arrays: dict, where: str, config: Optional[dict] = None) -> dict:
    """A single ControlNet file's tensors under diffusers' names.

    The original layout (diffusers' ``convert_controlnet_checkpoint``): ``control_model.*`` (or
    unprefixed, as some SD 2 files); the v1.0 files also carry the SD model they were trained
    with, which is not read. The hint block's convs are ``input_hint_block.{0,2,...,14}``
    (SiLUs between), ``zero_convs.i.0`` follows skip i, ``middle_block_out.0`` the mid block;
    everything else is the LDM UNet's names (ldm_keys), numbered by the config's
    layers_per_block (without a config: 2, as every SD family's). A file already in diffusers'
    names is taken as it is.
    """
    if "task_embedding" in arrays or any(k.startswith(("control_add_embedding.", "transformer_layes.")) for k in arrays):
        raise ModelLoadError(f"{where}: {_UNION}")
    if _DIFFUSERS_KEY in arrays:
        return dict(arrays)
    if any(k.startswith(LDM_PREFIX) for k in arrays):
        arrays = {k[len(LDM_PREFIX) :]: v for k, v in arrays.items() if k.startswith(LDM_PREFIX)}
    if _LDM_KEY not in arrays:
        sample = ", ".join(repr(k) for k in list(arrays)[:3])
        raise ModelLoadError(f"{where}: not a ControlNet (no {LDM_PREFIX}{_LDM_KEY} or {_DIFFUSERS_KEY}; keys: {sample}, ...)")
    hint = sorted({int(k.split(".")[1]) for k in arrays if k.startswith("input_hint_block.")})
    last = hint[-1]
    out, unet = {}, {}
    for key, value in arrays.items():
        module, _, param = key.rpartition(".")
        parts = module.split(".")
        if parts[0] == "input_hint_block":
            i = int(parts[1])
            name = "conv_in" if i == 0 else "conv_out" if i == last else f"blocks.{i // 2 - 1}"
            out[f"controlnet_cond_embedding.{name}.{param}"] = value
        elif parts[0] == "zero_convs" and parts[2:] == ["0"]:
            out[f"controlnet_down_blocks.{parts[1]}.{param}"] = value
        elif module == "middle_block_out.0":
            out[f"controlnet_mid_block.{param}"] = value
        else:
            unet[key] = value
    converted, unknown = convert_unet(unet, config or {"layers_per_block": 2})
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ModelLoadError(f"{where}: unknown keys {[k.removeprefix('model.diffusion_model.') for k in unknown[:5]]}{more} in this ControlNet file")
    return out | converted


def derived_config(shapes: dict) -> dict:
    """The config.json of a single ControlNet file (diffusers names -> shapes): its SD family's
    reference UNet config (``ControlNetModel.from_unet``), with the transformer depth of each
    attending level and the hint block's channels read from the tensors (the SDXL "mid" and
    "small" ControlNets keep fewer transformer blocks than the UNet). The family: SDXL when it has
    ``add_embedding``, SD 2.x when its first cross-attention reads 1024-wide text, else SD 1.x."""
    context = shapes.get("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight")
    family = "sdxl" if "add_embedding.linear_1.weight" in shapes else "sd2" if context and context[-1] == 1024 else "sd1"
    config = HubModel(FAMILY_FOLDERS[family]).config("unet")
    depths = list(_as_list(config.get("transformer_layers_per_block", 1), len(config["down_block_types"])))
    for i in range(len(depths)):
        if any(k.startswith(f"down_blocks.{i}.attentions.0.") for k in shapes):
            blocks = [int(k.split(".")[5]) for k in shapes if k.startswith(f"down_blocks.{i}.attentions.0.transformer_blocks.")]
            depths[i] = max(blocks, default=-1) + 1
    config["transformer_layers_per_block"] = depths
    conv_in = shapes["controlnet_cond_embedding.conv_in.weight"]  # PyTorch layout (out, in, kh, kw)
    strided = sorted(int(k.split(".")[2]) for k in shapes if k.startswith("controlnet_cond_embedding.blocks.") and k.endswith(".weight"))[1::2]
    config["conditioning_channels"] = conv_in[1]
    config["conditioning_embedding_out_channels"] = [conv_in[0]] + [shapes[f"controlnet_cond_embedding.blocks.{i}.weight"][0] for i in strided]
    return config


def _as_list(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n

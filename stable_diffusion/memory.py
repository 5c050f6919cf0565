"""How much memory a generation needs and how much this process may use, from the configs alone.

Checked before any weight is read, so that a run which cannot fit is refused in one line instead of
dying half-way: on the CPU, MLX cannot report a failed allocation and the process segfaults.

The estimate counts what dominates each stage of a run, in the dtype it is held in:

- weights: every parameter of the UNet, the VAE and the text encoders at its load dtype. The models
  are built without weights to count them: MLX allocates nothing until an array is evaluated;
- denoising: the UNet's first-level activations (see ``_unet_activations``) and the larger of its
  temporaries: the largest self-attention score matrix, quadratic in the latent area
  (``unet.attention_scores_bytes``, which follows however the attention slices its queries), or on
  the CPU a 3x3 conv's unfolded input (MLX's CPU convolution unfolds it in float32);
- decoding (or img2img's encoding): the VAE's full-resolution activations and the larger of its
  widest conv's unfolded input (CPU) and its mid-block self-attention, one head over every latent
  pixel (the same sliced attention);
- pictures: what is kept in host memory at once (a batch's decoded pixels, and for a grid every
  picture of the job, its stacked copy, the grid and the copy PIL saves from).

Stages run one after another, so a run needs weights + the larger of denoising and decoding +
pictures. It is a lower bound: smaller intermediates are left out, so a run it admits can still
need more, but nothing it refuses could have run.
"""

import os
import resource
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from . import unet as unet_module
from .clip import CLIPTextModel
from .config import AutoencoderConfig, UNetConfig
from .vae import Autoencoder

# The bytes of one (H, W, 3) uint8 picture are kept this many times while a grid is made: every
# picture, the stacked copy of the job's pictures, the grid itself, and PIL's copy of it when saving.
GRID_COPIES = 4


@dataclass(frozen=True)
class Model:
    """What the estimate reads: the component configs and the itemsize each runs in."""

    unet: UNetConfig
    vae: AutoencoderConfig
    text_encoders: tuple  # CLIPTextModelConfig of each encoder
    itemsize: int  # bytes per value of the UNet and text encoders (2 for float16)
    vae_itemsize: int  # the VAE's (SDXL's VAE stays float32 when force_upcast is set)


def parameter_count(module) -> int:
    """The number of values in a module's parameters (its arrays are never evaluated)."""
    return sum(v.size for _, v in tree_flatten(module.parameters()))


def weights_bytes(model: Model) -> int:
    """Every weight at its load dtype."""
    network = parameter_count(unet_module.UNetModel(model.unet)) + sum(
        parameter_count(CLIPTextModel(config)) for config in model.text_encoders
    )
    return network * model.itemsize + parameter_count(Autoencoder(model.vae)) * model.vae_itemsize


def _level_sizes(h: int, w: int, levels: int) -> list[tuple]:
    """The (h, w) of each UNet level: every downsample is a stride-2 conv padded by 1 (ceil)."""
    sizes = [(h, w)]
    for _ in range(levels - 1):
        h, w = (h + 1) // 2, (w + 1) // 2
        sizes.append((h, w))
    return sizes


def _attention_levels(config: UNetConfig) -> list[int]:
    """The UNet levels whose blocks self-attend (a cross-attention block does both)."""
    n = len(config.block_out_channels)
    ups = config.up_block_types[::-1]  # up block i runs at level n - 1 - i
    levels = [i for i in range(n) if config.down_block_types[i].startswith("CrossAttn") or ups[i].startswith("CrossAttn")]
    if config.mid_block_type == "UNetMidBlock2DCrossAttn" and n - 1 not in levels:
        levels.append(n - 1)
    return levels


def _unet_activations(config: UNetConfig, rows: int, h: int, w: int, itemsize: int) -> int:
    """The first level runs at the full latent size: rows x h x w x block_out_channels[0] values,
    layers_per_block + 2 of them alive at once (the skips kept for the up path and the working tensor)."""
    return rows * h * w * config.block_out_channels[0] * (max(config.layers_per_block) + 2) * itemsize


def _unet_widest_conv(config: UNetConfig, rows: int, h: int, w: int) -> int:
    """On the CPU, the unfolded input of the first level's widest 3x3 conv: the last up block's first
    resnet reads the level below's features concatenated with a skip."""
    channels = config.block_out_channels
    return _unfolded(rows * h * w, channels[min(1, len(channels) - 1)] + channels[0])


def _unfolded(pixels: int, channels: int) -> int:
    """MLX's CPU convolution unfolds a 3x3 conv's input (9 values per input value) in float32."""
    return pixels * 9 * channels * 4 if mx.default_device() == mx.cpu else 0


def _unet_attention(config: UNetConfig, rows: int, h: int, w: int, itemsize: int) -> int:
    """The largest self-attention score matrix of one UNet call (the cross-attention's keys are the 77 tokens)."""
    # upcast_attention: the scores of a float16 model are computed in float32 (unet.Attention).
    scores_itemsize = 4 if config.upcast_attention else itemsize
    sizes = _level_sizes(h, w, len(config.block_out_channels))
    return max(
        (
            unet_module.attention_scores_bytes(rows, config.num_attention_heads[i], sizes[i][0] * sizes[i][1], sizes[i][0] * sizes[i][1], scores_itemsize)
            for i in _attention_levels(config)
        ),
        default=0,
    )


def _vae(config: AutoencoderConfig, images: int, height: int, width: int, itemsize: int, widest: int) -> int:
    """One VAE pass over ``images`` pictures: a conv's input and output at the full pixel size, on
    the CPU the unfolded input of the widest full-size 3x3 conv (``widest`` channels), and the mid
    block's attention scores (one head, every latent pixel against every other)."""
    alive = images * height * width * config.block_out_channels[0] * itemsize * 2
    f = config.downsample_factor
    latent = (height // f) * (width // f)
    attention = unet_module.attention_scores_bytes(images, 1, latent, latent, itemsize) if config.mid_block_add_attention else 0
    return alive + max(_unfolded(images * height * width, widest), attention)  # a conv and the attention run in turn


def estimate(model: Model, width: int, height: int, batch: int, guided: bool, decode_batch: int = 1, encode: bool = False, kept: int = 0) -> dict:
    """Bytes by part of one run: ``batch`` images denoised at once (twice the rows with guidance),
    decoded ``decode_batch`` at a time, the input encoded first when ``encode`` (img2img, one
    picture), and ``kept`` pictures held for a grid."""
    f = model.vae.downsample_factor
    h, w = height // f, width // f
    rows = batch * (2 if guided else 1)
    # A conv and an attention run in turn: the larger of their temporaries is added to what stays alive.
    temporaries = max(_unet_widest_conv(model.unet, rows, h, w), _unet_attention(model.unet, rows, h, w, model.itemsize))
    denoising = _unet_activations(model.unet, rows, h, w, model.itemsize) + temporaries
    chunk = min(decode_batch, batch)
    channels = model.vae.block_out_channels
    # The decoder's last upsample conv reads block_out_channels[1] at the full size; the encoder's convs there block_out_channels[0].
    decoding = _vae(model.vae, chunk, height, width, model.vae_itemsize, channels[min(1, len(channels) - 1)])
    if encode:
        decoding = max(decoding, _vae(model.vae, 1, height, width, model.vae_itemsize, channels[0]))
    picture = height * width * 3
    pictures = batch * picture * (4 + 1) + kept * picture * GRID_COPIES  # a batch in float32 and uint8, and the grid's
    return {"weights": weights_bytes(model), "denoising": denoising, "VAE": decoding, "pictures": pictures}


def total(parts: dict) -> int:
    """What a run needs at its peak: the weights, the larger stage and the pictures kept."""
    return parts["weights"] + max(parts["denoising"], parts["VAE"]) + parts["pictures"]


# ---------------------------------------------------------------------------------------------
# What this process may use


def memory_limit() -> tuple[int, str]:
    """(bytes, what sets them): the smallest of the machine's RAM, the address-space limit
    (``ulimit -v``, less what the process already maps), the cgroup's memory limit (a container's),
    and the GPU's memory where MLX computes on one and reports it."""
    limits = [(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine has")]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append((max(soft - _mapped_bytes(), 0), "the address-space limit (ulimit -v) leaves"))
    cgroup = _cgroup_limit()
    if cgroup is not None:
        limits.append((cgroup, "the cgroup's memory limit is"))
    if mx.default_device() == mx.gpu:
        info = mx.device_info()
        for key in ("memory_size", "total_memory"):
            if info.get(key):
                limits.append((int(info[key]), "the GPU has"))
                break
    return min(limits)


def available_memory() -> int:
    """Bytes this process may use (see memory_limit)."""
    return memory_limit()[0]


def _mapped_bytes() -> int:
    """The process's virtual size now (what RLIMIT_AS counts); 0 where /proc is missing."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _cgroup_limit() -> int | None:
    """The tightest memory limit of this process's cgroup and its ancestors (v2 memory.max, v1
    memory.limit_in_bytes); None when there is none or it cannot be read."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: 0::/path
            root, name = Path("/sys/fs/cgroup"), "memory.max"
        elif "memory" in controllers.split(","):
            root, name = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"
        else:
            continue
        folder = root / path.lstrip("/")
        for place in [folder, *folder.parents]:
            try:
                text = (place / name).read_text().strip()
            except OSError:
                text = ""
            if text.isdigit():
                found.append(int(text))
            if place == root:
                break
    return min(found) if found else None


def format_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n} B"
        n /= 1000


def check(parts: dict, what: str, advice: str = ""):
    """ValueError naming ``what`` (e.g. "4 image(s) of 512x512") when ``total(parts)`` is more than this process may use."""
    need = total(parts)
    have, limit = memory_limit()
    if need > have:
        detail = ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items() if v)
        raise ValueError(f"{what} need at least {format_bytes(need)} of memory ({detail}) but {limit} {format_bytes(have)}" + (f"; {advice}" if advice else ""))

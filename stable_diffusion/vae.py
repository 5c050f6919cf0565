"""The Stable Diffusion variational autoencoder (KL-regularised), in NHWC.

Follows diffusers' ``AutoencoderKL`` (models/autoencoders/autoencoder_kl.py) with its ``Encoder`` and
``Decoder`` (autoencoders/vae.py), ``DownEncoderBlock2D``, ``UpDecoderBlock2D`` and
``UNetMidBlock2D`` (unets/unet_2d_blocks.py) and the mid block's ``Attention`` with
``AttnProcessor2_0`` (attention_processor.py); ``ResnetBlock2D``, ``Downsample2D`` and ``Upsample2D``
are the UNet's (diffusers shares them too). Module names are the diffusers state-dict keys.

Large images can be encoded and decoded in overlapping tiles blended together, as diffusers'
``AutoencoderKL.enable_tiling()`` does (``tiled_encode``/``tiled_decode``): memory then follows the
tile, not the image; the result differs slightly from the untiled one, as diffusers' does.
"""

import math
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import AutoencoderConfig
from .norm import GroupNorm
from .unet import Downsample2D, ResnetBlock2D, Upsample2D, attention_scores_bytes, scaled_dot_product_attention

EPS = 1e-6

# Attention key spellings of checkpoints saved before diffusers' Attention class (the "deprecated
# attention block"), still found on the Hub; diffusers renames them on load the same way.
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

TILE_OVERLAP = 0.25  # diffusers' tile_overlap_factor
# The peak of an untiled encode or decode, in full-resolution activations of block_out_channels[0]
# channels: measured on the CPU with MLX 0.32.4 at 76-78 for decoding with the SD VAE and the tiny
# test VAE at several sizes (the unfolded inputs of the full-size 3x3 convs dominate), 38-50 for
# encoding. A GPU, which does not unfold, needs less: the bound is conservative there.
PEAK_ACTIVATIONS = 78


def untiled_bytes(config: AutoencoderConfig, images: int, height: int, width: int, itemsize: int) -> int:
    """Estimated peak bytes of an untiled encode or decode of ``images`` pictures of height x width
    pixels: the full-resolution activations and the mid block's (sliced) attention scores."""
    activations = images * height * width * config.block_out_channels[0] * itemsize * PEAK_ACTIVATIONS
    f = config.downsample_factor
    latent = (height // f) * (width // f)
    scores = attention_scores_bytes(images, 1, latent, latent, itemsize) if config.mid_block_add_attention else 0
    return activations + scores


def tile_size(config: AutoencoderConfig, images: int, height: int, width: int, itemsize: int, tiled: bool | None) -> int | None:
    """The tile (image pixels) to encode or decode with, or None to run whole. ``tiled`` True or
    False decides; None tiles only what would not fit untiled: when ``untiled_bytes`` exceeds what
    MLX may still allocate (its memory limit less what is allocated now). The tile is diffusers'
    ``tile_sample_min_size``, the VAE config's ``sample_size``."""
    if tiled is None:
        tiled = untiled_bytes(config, images, height, width, itemsize) > mx.get_memory_limit() - mx.get_active_memory()
    return config.sample_size if tiled else None


def _blend(a: mx.array, b: mx.array, extent: int, axis: int) -> mx.array:
    """diffusers' ``blend_v`` (axis 1) / ``blend_h`` (axis 2) in NHWC: ``b``'s first ``extent`` rows
    (columns) fade linearly from ``a``'s last ones into ``b``'s own."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent == 0:
        return b
    shape = [1, 1, 1, 1]
    shape[axis] = extent
    w = np.arange(extent) / extent  # y / blend_extent, in float64 as Python computes it
    head = mx.take(a, mx.arange(a.shape[axis] - extent, a.shape[axis]), axis=axis) * mx.array(1 - w, b.dtype).reshape(shape)
    head = head + mx.take(b, mx.arange(extent), axis=axis) * mx.array(w, b.dtype).reshape(shape)
    return mx.concatenate([head, mx.take(b, mx.arange(extent, b.shape[axis]), axis=axis)], axis=axis)


def tiled(fn: Callable[[mx.array], mx.array], x: mx.array, tile_in: int, tile_out: int) -> mx.array:
    """``fn`` (NHWC -> NHWC, ``tile_in`` pixels in giving ``tile_out`` out) over overlapping tiles of ``x``.

    diffusers' ``tiled_decode`` / ``_tiled_encode``: tiles start every ``tile_in * (1 - overlap)``
    pixels; each output tile is blended with the finished tile above, then the one to its left, over
    ``tile_out * overlap`` rows, and its top-left ``tile_out - blend`` square is kept. Each tile is
    evaluated before the next is built, so only one tile's activations are alive at a time.
    """
    stride = int(tile_in * (1 - TILE_OVERLAP))
    blend = int(tile_out * TILE_OVERLAP)
    keep = tile_out - blend
    above, rows = [], []
    for i in range(0, x.shape[1], stride):
        row = []
        for j in range(0, x.shape[2], stride):
            tile = fn(x[:, i : i + tile_in, j : j + tile_in])
            if above:
                tile = _blend(above[len(row)], tile, blend, axis=1)
            if row:
                tile = _blend(row[-1], tile, blend, axis=2)
            mx.eval(tile)
            row.append(tile)
        rows.append(mx.concatenate([tile[:, :keep, :keep] for tile in row], axis=2))
        above = row
    return mx.concatenate(rows, axis=1)


class Attention(nn.Module):
    """Single-head self-attention over all pixels, with its own GroupNorm and a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        h = self.group_norm(x).reshape(B, 1, H * W, C)  # (B, heads=1, HW, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        # The fused kernels, and their fallback (a precise softmax), take the softmax in float32; the
        # scores stay bounded as the UNet's do (one head of C > 128 channels always materialises them).
        h = scaled_dot_product_attention(q, k, v, 1 / math.sqrt(C))
        h = self.to_out[0](h).reshape(B, H, W, C)
        return x + h


class DownEncoderBlock2D(nn.Module):
    """Resnets, then an optional downsample."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, EPS) for i in range(num_layers)
        ]
        if add_downsample:
            self.downsamplers = [Downsample2D(out_channels, padding=0)]  # LDM's asymmetric pad: windows start at pixel 0

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        if "downsamplers" in self:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    """Resnets, then an optional upsample."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, EPS) for i in range(num_layers)
        ]
        if add_upsample:
            self.upsamplers = [Upsample2D(out_channels)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        if "upsamplers" in self:
            x = self.upsamplers[0](x, (2 * x.shape[1], 2 * x.shape[2]))
        return x


class UNetMidBlock2D(nn.Module):
    """Resnet, attention, resnet (the attention is optional)."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.attentions = [Attention(channels, groups)] if add_attention else []
        self.resnets = [ResnetBlock2D(channels, channels, None, groups, EPS) for _ in range(2)]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Image -> the mean and log-variance of the latent posterior, concatenated on channels."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        channels = config.block_out_channels
        groups = config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = [
            DownEncoderBlock2D(
                channels[max(i - 1, 0)],
                channels[i],
                config.layers_per_block,
                groups,
                add_downsample=i < len(channels) - 1,
            )
            for i in range(len(channels))
        ]
        self.mid_block = UNetMidBlock2D(channels[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, channels[-1], EPS)
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x, silu=True))


class Decoder(nn.Module):
    """Latents -> image; each up block has one more resnet than the encoder's down blocks."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        channels = tuple(reversed(config.block_out_channels))
        groups = config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(channels[0], groups, config.mid_block_add_attention)
        self.up_blocks = [
            UpDecoderBlock2D(
                channels[max(i - 1, 0)],
                channels[i],
                config.layers_per_block + 1,
                groups,
                add_upsample=i < len(channels) - 1,
            )
            for i in range(len(channels))
        ]
        self.conv_norm_out = GroupNorm(groups, channels[-1], EPS)
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x, silu=True))


class Autoencoder(nn.Module):
    """diffusers' AutoencoderKL: ``encode`` gives the posterior, ``decode`` the image."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        latent = config.latent_channels
        if config.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        if config.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(latent, latent, 1)

    def encode(self, x: mx.array, tile_size: int | None = None) -> tuple[mx.array, mx.array]:
        """(B, H, W, in_channels) in [-1, 1] -> the posterior's (mean, logvar), each (B, H/f, W/f, latent_channels).

        Unscaled: the caller multiplies latents by ``scaling_factor``. With ``tile_size`` (diffusers'
        ``tile_sample_min_size``, the VAE config's ``sample_size``) an image larger than it on either
        side is encoded in tiles.
        """
        x = x.astype(self.encoder.conv_in.weight.dtype)
        if tile_size is not None and max(x.shape[1:3]) > tile_size:
            h = tiled(self._moments, x, tile_size, tile_size // self.config.downsample_factor)
        else:
            h = self._moments(x)
        mean, logvar = mx.split(h, 2, axis=-1)
        # As diffusers' DiagonalGaussianDistribution.
        return mean, mx.clip(logvar, -30.0, 20.0)

    def _moments(self, x: mx.array) -> mx.array:
        h = self.encoder(x)
        return self.quant_conv(h) if "quant_conv" in self else h

    def decode(self, z: mx.array, tile_size: int | None = None) -> mx.array:
        """(B, h, w, latent_channels), already divided by ``scaling_factor`` -> (B, h*f, w*f, out_channels), unclipped.

        With ``tile_size`` (in image pixels, as for ``encode``) latents larger than ``tile_size / f``
        on either side are decoded in tiles.
        """
        z = z.astype(self.decoder.conv_in.weight.dtype)
        tile_latent = None if tile_size is None else tile_size // self.config.downsample_factor
        if tile_latent is not None and max(z.shape[1:3]) > tile_latent:
            return tiled(self._decode_tile, z, tile_latent, tile_size)
        return self._decode_tile(z)

    def _decode_tile(self, z: mx.array) -> mx.array:
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Rename legacy attention keys and move PyTorch layouts to MLX's."""
        out = {}
        for key, value in weights.items():
            if ".attentions." in key:
                path, name, param = key.rsplit(".", 2)
                key = f"{path}.{_LEGACY_ATTENTION_NAMES.get(name, name)}.{param}"
                # Legacy checkpoints store these projections as 1x1 convs (O, I, 1, 1).
                if name != "group_norm" and value.ndim == 4:
                    value = value.reshape(value.shape[:2])
            if value.ndim == 4:
                # PyTorch convs are (out, in, kh, kw); MLX wants (out, kh, kw, in).
                value = value.transpose(0, 2, 3, 1)
            out[key] = value
        return out

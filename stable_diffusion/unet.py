"""The Stable Diffusion denoising UNet (SD 1.x, SD 2.x, SDXL), in NHWC.

Follows diffusers' ``UNet2DConditionModel`` (models/unets/unet_2d_condition.py) and the blocks it
builds: ``ResnetBlock2D`` (resnet.py), ``Downsample2D``/``Upsample2D``, ``CrossAttnDownBlock2D``,
``DownBlock2D``, ``UNetMidBlock2DCrossAttn``, ``CrossAttnUpBlock2D``, ``UpBlock2D``
(unet_2d_blocks.py), ``Transformer2DModel`` and ``BasicTransformerBlock`` with a GEGLU feed-forward
(transformers/transformer_2d.py, attention.py), ``Timesteps``/``TimestepEmbedding``
(embeddings.py) and SDXL's "text_time" added embedding. Module names are the diffusers state-dict
keys, so ``sanitize`` only moves conv weights to MLX's (out, kh, kw, in) layout.

Numerics: the model runs in the dtype of its weights. GroupNorm/LayerNorm statistics are taken in
float32 (``mx.fast.layer_norm`` accumulates in float32 whatever the input dtype; ``nn.GroupNorm``
with ``pytorch_compatible=True`` uses it), the timestep sinusoids are computed in float32 (then
cast, as diffusers does), and the attention softmax runs in float32 inside
``mx.fast.scaled_dot_product_attention``. Attention over many pixels runs in query slices whose
scores stay under ``ATTENTION_SCORES_LIMIT`` (``scaled_dot_product_attention``), with the same results.
"""

import math

from functools import partial
from typing import Iterator, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import UNetConfig
from .norm import GroupNorm, on_cuda


def timestep_embedding(t: mx.array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> mx.array:
    """diffusers' ``get_timestep_embedding``: (N,) timesteps -> (N, dim) sinusoids, in float32."""
    half = dim // 2
    exponent = -math.log(10000) * mx.arange(half, dtype=mx.float32) / (half - freq_shift)
    args = t.astype(mx.float32)[:, None] * mx.exp(exponent)[None]  # (N, half)
    sin, cos = mx.sin(args), mx.cos(args)
    emb = mx.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = mx.pad(emb, [(0, 0), (0, 1)])
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers ``TimestepEmbedding`` with act_fn="silu")."""

    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(x)))


@partial(mx.compile, shapeless=True)
def _add3(a: mx.array, b: mx.array, c: mx.array) -> mx.array:
    """(a + b) + c in one kernel, rounded after each add as the unfused ops round."""
    return a + b + c


@partial(mx.compile, shapeless=True)
def _geglu(hidden: mx.array, gate: mx.array) -> mx.array:
    return hidden * nn.gelu(gate)


def conv_add(conv: nn.Conv2d, x: mx.array, residual: mx.array) -> mx.array:
    """``conv(x) + residual`` with the conv's bias and the residual added in one kernel."""
    y = mx.conv2d(x, conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups)
    return _add3(y, conv.bias, residual)


class LinearGroup:
    """Linear layers that read the same input, run as one matmul once ``fuse()`` has been called.

    ``fuse()`` concatenates the layers' weights (and biases) into one array and makes each layer's
    weight a view into it, so the memory is not doubled and the layers keep their diffusers names
    (LoRA, saving, quantization still see them). Whenever a layer's weight has been replaced since
    (a LoRA merge, ``load_weights``, quantization), ``__call__`` runs the layers one by one again,
    so the group can never compute with stale weights.
    """

    def __init__(self, places: list[tuple[nn.Module, str]]):
        self._places = places  # (module, attribute) of each layer: looked up on every call
        self._fused = None  # (weight, bias or None, the weight views given to the layers, split points)

    def _layers(self) -> list:
        return [getattr(owner, name) for owner, name in self._places]

    def fuse(self) -> None:
        layers = self._layers()
        self._fused = None
        if not all(type(layer) is nn.Linear for layer in layers):
            return  # quantized layers keep their own kernels
        has_bias = ["bias" in layer for layer in layers]
        if any(has_bias) != all(has_bias):
            return
        weight = mx.concatenate([layer.weight for layer in layers])
        bias = mx.concatenate([layer.bias for layer in layers]) if all(has_bias) else None
        mx.eval(weight if bias is None else (weight, bias))
        ends = np.cumsum([layer.weight.shape[0] for layer in layers]).tolist()
        for layer, start, end in zip(layers, [0] + ends[:-1], ends):
            layer.weight = weight[start:end]
            if bias is not None:
                layer.bias = bias[start:end]
        mx.eval([layer.parameters() for layer in layers])
        self._fused = (weight, bias, [layer.weight for layer in layers], ends[:-1])

    def __call__(self, x: mx.array) -> list:
        layers = self._layers()
        if self._fused is None or any(layer.get("weight") is not view for layer, view in zip(layers, self._fused[2])):
            return [layer(x) for layer in layers]
        weight, bias, _, splits = self._fused
        y = x @ weight.T if bias is None else mx.addmm(bias, x, weight.T)
        return mx.split(y, splits, axis=-1)


def _attention_scores_stay_float32(head_dim: int) -> bool:
    # On a CUDA GPU, fp16/bf16 attention with head_dim a multiple of 8 up to 128 runs in cuDNN's
    # fused kernel, which keeps the scores in float32 (checked on an H100 with MLX 0.32.4: scores
    # far beyond the fp16 range come out finite and exact). The composed fallback (CPU, other head
    # sizes, Metal for some) stores the scaled Q·K^T in the input dtype before its float32 softmax.
    return on_cuda() and head_dim % 8 == 0 and head_dim <= 128


# The most attention-score bytes one call materialises where the scores are materialised (see
# _scores_materialised). 1 GiB: a native-size step never slices (SD 1.5 at 512² with guidance,
# 2 x 8 heads x 4096² float32 scores, is exactly 1 GiB; SDXL at 1024² in float16 is 640 MiB), the
# bound stays below the UNet's own weights (1.7 GB for SD 1.5 in float16) so the scores never
# dominate a step's peak, and each slice still multiplies matrices with millions of rows x keys.
ATTENTION_SCORES_LIMIT = 2**30


def attention_query_slice(batch: int, heads: int, queries: int, keys: int, itemsize: int) -> int:
    """How many queries one slice of a materialised attention takes: all of them when their scores
    fit in ``ATTENTION_SCORES_LIMIT``, else as many as fit (at least one)."""
    row = batch * heads * keys * itemsize
    return max(1, min(queries, ATTENTION_SCORES_LIMIT // row))


def attention_scores_bytes(batch: int, heads: int, queries: int, keys: int, itemsize: int) -> int:
    """Peak bytes of the attention scores one attention call holds where they are materialised
    (CPU, Metal, CUDA's composed path): one query slice's (batch, heads, slice, keys) matrix (the
    softmax runs in place, measured 1.03x the matrix unsliced). Memory estimates call this, so they
    follow the slicing ``scaled_dot_product_attention`` does."""
    return batch * heads * attention_query_slice(batch, heads, queries, keys, itemsize) * keys * itemsize


def _scores_materialised(q: mx.array, k: mx.array) -> bool:
    # cuDNN's fused kernel never holds the scores; it takes fp16/bf16 self-attention with the head
    # sizes of _attention_scores_stay_float32 (some MLX versions send q_len != k_len elsewhere, so
    # cross-attention counts as materialised: its 77 keys keep its scores small anyway).
    fused = q.dtype in (mx.float16, mx.bfloat16) and q.shape[2] == k.shape[2]
    return not (fused and _attention_scores_stay_float32(q.shape[-1]))


def scaled_dot_product_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """``mx.fast.scaled_dot_product_attention`` on (B, heads, L, d) arrays, in query slices when the
    scores it would materialise exceed ``ATTENTION_SCORES_LIMIT``. The softmax is per query row, so
    each slice computes exactly the rows the whole call would (diffusers' attention slicing)."""
    B, heads, L, _ = q.shape
    step = attention_query_slice(B, heads, L, k.shape[2], q.dtype.size) if _scores_materialised(q, k) else L
    if step >= L:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    slices = []
    for start in range(0, L, step):
        slices.append(mx.fast.scaled_dot_product_attention(q[:, :, start : start + step], k, v, scale=scale))
        # Evaluated one by one: built lazily, MLX schedules every slice's scores at once (measured
        # on CPU: 8 slices peaked at 8.4x one slice's scores; 1.3x evaluated one at a time).
        mx.eval(slices[-1])
    return mx.concatenate(slices, axis=2)


class Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v and a biased output projection (diffusers ``Attention``).

    Once ``fuse_projections()`` has run, self-attention computes q, k and v in one matmul, and
    cross-attention k and v in one (``LinearGroup``).
    """

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None, upcast: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.scale = head_dim**-0.5
        self.upcast = upcast
        self.is_cross_attention = context_dim is not None
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = [nn.Linear(inner, query_dim)]
        names = ["to_k", "to_v"] if self.is_cross_attention else ["to_q", "to_k", "to_v"]
        self._projections = LinearGroup([(self, name) for name in names])

    def fuse_projections(self) -> None:
        self._projections.fuse()

    def __call__(self, x: mx.array, context: mx.array | None = None) -> mx.array:
        B, L, _ = x.shape
        if self.is_cross_attention:
            q, (k, v) = self.to_q(x), self._projections(context)
        else:
            q, k, v = self._projections(x)
        S = k.shape[1]
        q = q.reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3)  # (B, h, L, d)
        k = k.reshape(B, S, self.heads, -1).transpose(0, 2, 1, 3)  # (B, h, S, d)
        v = v.reshape(B, S, self.heads, -1).transpose(0, 2, 1, 3)
        dtype = q.dtype
        if self.upcast and dtype != mx.float32 and not _attention_scores_stay_float32(q.shape[-1]):
            # upcast_attention: scores in float32 (SD 2.x overflows fp16 otherwise).
            q, k, v = q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32)
        out = scaled_dot_product_attention(q, k, v, self.scale).astype(dtype)
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)  # (B, L, h*d)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """proj -> (hidden, gate) halves -> hidden * gelu(gate), exact (erf) GELU."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def __call__(self, x: mx.array) -> mx.array:
        hidden, gate = mx.split(self.proj(x), 2, axis=-1)
        return _geglu(hidden, gate)


class FeedForward(nn.Module):
    """diffusers ``FeedForward`` with activation_fn="geglu", mult=4: net.0 (GEGLU), net.1 (dropout), net.2."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = [GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim)]

    def __call__(self, x: mx.array) -> mx.array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention and feed-forward, each with a residual."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads, head_dim, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, head_dim, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm (eps 1e-6) -> proj_in -> transformer blocks -> proj_out, plus the input."""

    def __init__(self, config: UNetConfig, channels: int, heads: int, depth: int, context_dim: int):
        super().__init__()
        head_dim = channels // heads
        inner = heads * head_dim
        self.norm = GroupNorm(config.norm_num_groups, channels, eps=1e-6)
        # A 1x1 conv on NHWC is a per-pixel linear map: both spellings keep their diffusers names.
        if config.use_linear_projection:
            self.proj_in = nn.Linear(channels, inner)
            self.proj_out = nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, kernel_size=1)
            self.proj_out = nn.Conv2d(inner, channels, kernel_size=1)
        self.transformer_blocks = [
            BasicTransformerBlock(inner, heads, head_dim, context_dim, config.upcast_attention) for _ in range(depth)
        ]

    def __call__(self, x: mx.array, context: mx.array) -> mx.array:
        B, H, W, C = x.shape
        h = self.proj_in(self.norm(x))
        h = h.reshape(B, H * W, -1)  # (B, HW, inner)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.reshape(B, H, W, -1)
        if isinstance(self.proj_out, nn.Conv2d):
            return conv_add(self.proj_out, h, x)
        return self.proj_out(h) + x


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv, plus the projected time embedding (UNet only), GroupNorm-SiLU-conv, plus a shortcut.

    The VAE uses it too, without a time embedding (``temb_channels=None``).
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: Optional[int], groups: int, eps: float):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def __call__(self, x: mx.array, temb: Optional[mx.array] = None) -> mx.array:
        """``temb`` is this block's projected time embedding (B, out_channels): see ``UNetModel.time_projections``."""
        h = self.norm1(x, silu=True)
        h = self.conv1(h) if temb is None else conv_add(self.conv1, h, temb[:, None, None, :])
        shortcut = self.conv_shortcut(x) if "conv_shortcut" in self else x
        return conv_add(self.conv2, self.norm2(h, silu=True), shortcut)


class Downsample2D(nn.Module):
    """A stride-2 3x3 conv; with padding 0 the input is first padded on the right and bottom only."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def __call__(self, x: mx.array) -> mx.array:
        if self.padding == 0:
            x = mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])
        return self.conv(x)


def upsample_nearest(x: mx.array, size: tuple[int, int]) -> mx.array:
    """PyTorch ``F.interpolate(mode="nearest")`` to ``size``: 2x by broadcasting, any other size by gathering."""
    B, H, W, C = x.shape
    if size == (2 * H, 2 * W):
        x = mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C))
        return x.reshape(B, 2 * H, 2 * W, C)
    # PyTorch's source index: floor(dst * (in / out)) in float32, clamped to in - 1.
    rows, cols = (
        np.minimum(np.floor(np.arange(out, dtype=np.float32) * np.float32(n / out)), n - 1).astype(np.int32)
        for n, out in ((H, size[0]), (W, size[1]))
    )
    return mx.take(mx.take(x, mx.array(rows), axis=1), mx.array(cols), axis=2)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling (to the skip connection's size) followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def __call__(self, x: mx.array, size: tuple[int, int]) -> mx.array:
        return self.conv(upsample_nearest(x, size))


class DownBlock(nn.Module):
    """``DownBlock2D`` / ``CrossAttnDownBlock2D``: resnets (each followed by a transformer when
    cross-attending), then an optional downsample; every intermediate output is a skip."""

    def __init__(self, config: UNetConfig, i: int, in_channels: int, temb_channels: int):
        super().__init__()
        out_channels = config.block_out_channels[i]
        n = config.layers_per_block[i]
        self.resnets = [
            ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, temb_channels, config.norm_num_groups, config.norm_eps)
            for j in range(n)
        ]
        if config.down_block_types[i] == "CrossAttnDownBlock2D":
            self.attentions = [
                Transformer2DModel(
                    config,
                    out_channels,
                    config.num_attention_heads[i],
                    config.transformer_layers_per_block[i],
                    config.cross_attention_dim[i],
                )
                for _ in range(n)
            ]
        if i < len(config.block_out_channels) - 1:
            self.downsamplers = [Downsample2D(out_channels, config.downsample_padding)]

    def __call__(self, x: mx.array, tembs: Iterator[mx.array], context: mx.array) -> tuple[mx.array, list[mx.array]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, next(tembs))
            if "attentions" in self:
                x = self.attentions[j](x, context)
            skips.append(x)
        if "downsamplers" in self:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UNetMidBlock2DCrossAttn(nn.Module):
    """resnet, then (transformer, resnet) pairs."""

    def __init__(self, config: UNetConfig, temb_channels: int):
        super().__init__()
        channels = config.block_out_channels[-1]
        self.resnets = [
            ResnetBlock2D(channels, channels, temb_channels, config.norm_num_groups, config.norm_eps)
            for _ in range(config.mid_block_layers + 1)
        ]
        self.attentions = [
            Transformer2DModel(
                config,
                channels,
                config.num_attention_heads[-1],
                config.transformer_layers_per_block[-1],
                config.cross_attention_dim[-1],
            )
            for _ in range(config.mid_block_layers)
        ]

    def __call__(self, x: mx.array, tembs: Iterator[mx.array], context: mx.array) -> mx.array:
        x = self.resnets[0](x, next(tembs))
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x, context), next(tembs))
        return x


class UpBlock(nn.Module):
    """``UpBlock2D`` / ``CrossAttnUpBlock2D``: layers_per_block + 1 resnets, each on the running
    features concatenated with one skip (last in, first out), then an optional upsample."""

    def __init__(self, config: UNetConfig, i: int, prev_channels: int, temb_channels: int):
        super().__init__()
        reversed_channels = config.block_out_channels[::-1]
        out_channels = reversed_channels[i]
        skip_in = reversed_channels[min(i + 1, len(reversed_channels) - 1)]
        n = config.layers_per_block[::-1][i] + 1
        self.resnets = [
            ResnetBlock2D(
                (prev_channels if j == 0 else out_channels) + (skip_in if j == n - 1 else out_channels),
                out_channels,
                temb_channels,
                config.norm_num_groups,
                config.norm_eps,
            )
            for j in range(n)
        ]
        if config.up_block_types[i] == "CrossAttnUpBlock2D":
            depths = config.reverse_transformer_layers_per_block or config.transformer_layers_per_block[::-1]
            self.attentions = [
                Transformer2DModel(
                    config,
                    out_channels,
                    config.num_attention_heads[::-1][i],
                    depths[i],
                    config.cross_attention_dim[::-1][i],
                )
                for _ in range(n)
            ]
        if i < len(reversed_channels) - 1:
            self.upsamplers = [Upsample2D(out_channels)]

    def __call__(
        self, x: mx.array, skips: list[mx.array], tembs: Iterator[mx.array], context: mx.array, size: tuple[int, int] | None
    ) -> mx.array:
        for j, resnet in enumerate(self.resnets):
            x = resnet(mx.concatenate([x, skips.pop()], axis=-1), next(tembs))
            if "attentions" in self:
                x = self.attentions[j](x, context)
        if "upsamplers" in self:
            x = self.upsamplers[0](x, size)
        return x


def build_down_blocks(config: UNetConfig, temb_channels: int) -> list[DownBlock]:
    """The down blocks of a UNet (and of a ControlNet, which copies them)."""
    channels = config.block_out_channels
    return [DownBlock(config, i, channels[max(i - 1, 0)], temb_channels) for i in range(len(channels))]


def add_input_layers(model: nn.Module, config: UNetConfig) -> int:
    """Give ``model`` the UNet's ``conv_in``, time embedding and (SDXL) text_time embedding; the
    ControlNet starts with the same layers. Returns the time embedding's width."""
    channels = config.block_out_channels
    time_embed_dim = 4 * channels[0]
    model.conv_in = nn.Conv2d(config.in_channels, channels[0], config.conv_in_kernel, padding=(config.conv_in_kernel - 1) // 2)
    model.time_embedding = TimestepEmbedding(channels[0], time_embed_dim)
    if config.addition_embed_type == "text_time":
        model.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, time_embed_dim)
    return time_embed_dim


def embed_time(model: nn.Module, timestep, batch: int, text_time: tuple[mx.array, mx.array] | None) -> mx.array:
    """The (B, 4 * C0) embedding the resnets project: diffusers' time_proj + time_embedding, plus
    SDXL's add_embedding of text_time. ``model`` is a UNetModel or a ControlNetModel (same names)."""
    config = model.config
    dtype = model.conv_in.weight.dtype
    t = timestep if isinstance(timestep, mx.array) else mx.array(timestep)
    t = mx.broadcast_to(t.astype(mx.float32).reshape(-1), (batch,))
    t_emb = timestep_embedding(t, config.block_out_channels[0], config.flip_sin_to_cos, config.freq_shift)
    emb = model.time_embedding(t_emb.astype(dtype))
    if config.addition_embed_type == "text_time":
        if text_time is None:
            raise ValueError(f"this {type(model).__name__} (SDXL) needs text_time=(text_embeds, time_ids)")
        text_embeds, time_ids = text_time
        time_embeds = timestep_embedding(
            time_ids.reshape(-1), config.addition_time_embed_dim, config.flip_sin_to_cos, config.freq_shift
        ).reshape(batch, -1)  # (B, 6 * addition_time_embed_dim)
        add_embeds = mx.concatenate([text_embeds.astype(mx.float32), time_embeds], axis=-1).astype(dtype)
        emb = emb + model.add_embedding(add_embeds)
    return emb


def run_down_blocks(blocks: list[DownBlock], h: mx.array, tembs: Iterator[mx.array], context: mx.array) -> tuple[mx.array, list[mx.array]]:
    """The down blocks on conv_in's output: (the last block's output, every skip in diffusers' order,
    conv_in's output first)."""
    skips = [h]
    for block in blocks:
        h, block_skips = block(h, tembs, context)
        skips += block_skips
    return h, skips


class UNetModel(nn.Module):
    """diffusers ``UNet2DConditionModel`` for SD 1.x / 2.x / SDXL, NHWC in and out."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config  # UNetConfig.from_dict refused what is not implemented
        channels = config.block_out_channels
        time_embed_dim = add_input_layers(self, config)
        self.down_blocks = build_down_blocks(config, time_embed_dim)
        if config.mid_block_type == "UNetMidBlock2DCrossAttn":
            self.mid_block = UNetMidBlock2DCrossAttn(config, time_embed_dim)
        self.up_blocks = [
            UpBlock(config, i, channels[::-1][max(i - 1, 0)], time_embed_dim) for i in range(len(channels))
        ]

        self.conv_norm_out = GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(
            channels[0], config.out_channels, config.conv_out_kernel, padding=(config.conv_out_kernel - 1) // 2
        )
        blocks = [*self.down_blocks, *([self.mid_block] if "mid_block" in self else []), *self.up_blocks]
        self._time_projections = LinearGroup([(resnet, "time_emb_proj") for block in blocks for resnet in block.resnets])

    def fuse_projections(self) -> None:
        """Fewer, larger matmuls, same results: one for every resnet's ``time_emb_proj`` and one for the
        q/k/v (or k/v) projections of each attention (``LinearGroup``). Call it again after changing weights."""
        self._time_projections.fuse()
        for _, module in self.named_modules():
            if isinstance(module, Attention):
                module.fuse_projections()

    def __call__(
        self,
        x: mx.array,
        timestep: mx.array,
        encoder_x: mx.array,
        text_time: tuple[mx.array, mx.array] | None = None,
        down_block_additional_residuals: list[mx.array] | None = None,
        mid_block_additional_residual: mx.array | None = None,
    ) -> mx.array:
        """x (B, H, W, C_in); timestep scalar or (B,); encoder_x (B, L, D); SDXL's text_time =
        (pooled text embeds (B, P), time ids (B, 6)). Returns (B, H, W, C_out).

        A ControlNet's residuals (``ControlNetModel``'s outputs), given together as diffusers takes
        them: one per skip, added to the skips once the down blocks have run, and one added to the
        mid block's output.
        """
        dtype = self.conv_in.weight.dtype
        x = x.astype(dtype)
        encoder_x = encoder_x.astype(dtype)
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError("give both down_block_additional_residuals and mid_block_additional_residual (a ControlNet's outputs), or neither")

        emb = embed_time(self, timestep, x.shape[0], text_time)
        tembs = iter(self._time_projections(nn.silu(emb)))  # each resnet's time_emb_proj, in call order

        h, skips = run_down_blocks(self.down_blocks, self.conv_in(x), tembs, encoder_x)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals: {len(down_block_additional_residuals)} arrays for this UNet's {len(skips)} skips")
            skips = [s + r.astype(dtype) for s, r in zip(skips, down_block_additional_residuals)]

        if "mid_block" in self:
            h = self.mid_block(h, tembs, encoder_x)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual.astype(dtype)

        for block in self.up_blocks:
            block_skips = skips[-len(block.resnets) :]
            skips = skips[: -len(block.resnets)]
            # Upsample to the next skip's size: 2x, or diffusers' forwarded size for odd inputs.
            size = tuple(skips[-1].shape[1:3]) if skips else None
            h = block(h, block_skips, tembs, encoder_x, size)

        h = self.conv_norm_out(h, silu=True)
        return self.conv_out(h)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        # PyTorch convs are (out, in, kh, kw); MLX wants (out, kh, kw, in). This includes the 1x1
        # conv proj_in/proj_out of SD 1.x transformers.
        return {k: v.transpose(0, 2, 3, 1) if v.ndim == 4 else v for k, v in weights.items()}

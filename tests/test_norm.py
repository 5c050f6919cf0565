"""GroupNorm(+SiLU): the portable path against torch.nn.GroupNorm, the CUDA kernels against the portable path."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from stable_diffusion import norm
from stable_diffusion.norm import GroupNorm

# (batch, height, width, channels, groups): UNet and VAE layouts, a group wider than a warp,
# a spatial size that is not a multiple of anything, and VAE-like 4-channel groups.
SHAPES = [(2, 8, 8, 64, 32), (1, 5, 7, 96, 32), (3, 4, 4, 2560, 32), (1, 16, 16, 128, 32), (2, 3, 3, 48, 4)]


def _module(channels, groups, eps, seed=0):
    rng = np.random.default_rng(seed)
    gn = GroupNorm(groups, channels, eps=eps)
    gn.weight = mx.array(rng.standard_normal(channels).astype(np.float32))
    gn.bias = mx.array(rng.standard_normal(channels).astype(np.float32))
    return gn


def _input(shape, seed=1):
    B, H, W, C = shape
    rng = np.random.default_rng(seed)
    # An offset mean makes a naive E[x^2] - E[x]^2 lose digits.
    return (3.0 + 2.0 * rng.standard_normal((B, H, W, C))).astype(np.float32)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("B,H,W,C,G", SHAPES)
def test_group_norm_matches_torch_group_norm_then_silu(B, H, W, C, G, silu):
    gn, x = _module(C, G, 1e-6), _input((B, H, W, C))
    with mx.stream(mx.cpu):
        ours = np.array(gn(mx.array(x), silu=silu))
    ref = torch.nn.GroupNorm(G, C, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(np.array(gn.weight)))
        ref.bias.copy_(torch.from_numpy(np.array(gn.bias)))
        y = ref(torch.from_numpy(x).permute(0, 3, 1, 2))
        if silu:
            y = torch.nn.functional.silu(y)
    np.testing.assert_allclose(ours, y.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)


def test_shipped_ptx_was_built_from_the_current_cuda_source():
    first_line = norm.PTX_PATH.read_text().splitlines()[0]
    assert first_line.split()[-1] == norm.source_digest(), "run `python -m stable_diffusion.norm` (needs nvcc)"


cuda = pytest.mark.cuda  # collected only where MLX has a CUDA GPU (conftest.py)


@cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("B,H,W,C,G", SHAPES + [(2, 64, 64, 320, 32), (1, 128, 128, 256, 32)])
def test_cuda_kernels_match_float64_group_norm(B, H, W, C, G, silu, dtype):
    gn = _module(C, G, 1e-5)
    gn.set_dtype(dtype)
    x = mx.array(_input((B, H, W, C))).astype(dtype)
    assert norm.use_cuda_kernels(x, G)
    with mx.stream(mx.gpu):
        ours = np.array(gn(x, silu=silu).astype(mx.float32))
    # The reference: the same (rounded) inputs and parameters, in float64.
    xs, w, b = (np.array(a.astype(mx.float32)).astype(np.float64) for a in (x, gn.weight, gn.bias))
    xg = xs.reshape(B, H * W, G, C // G)
    mean, var = xg.mean(axis=(1, 3), keepdims=True), xg.var(axis=(1, 3), keepdims=True)
    ref = ((xg - mean) / np.sqrt(var + 1e-5)).reshape(B, H, W, C) * w + b
    ref = ref / (1 + np.exp(-ref)) if silu else ref
    tol = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 1.6e-2}[dtype]  # float32 math; fp16/bf16 output rounding
    np.testing.assert_allclose(ours, ref, rtol=tol, atol=tol * np.abs(ref).max())

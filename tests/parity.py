"""Helpers shared by the parity tests: layout conversion and the relative error they are held to."""

import mlx.core as mx
import numpy as np
import torch


def relative_error(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ours = np.asarray(ours.astype(mx.float32) if isinstance(ours, mx.array) else ours, dtype=np.float64)
    ref = np.asarray(ref.float().numpy() if isinstance(ref, torch.Tensor) else ref, dtype=np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def nhwc(x: torch.Tensor) -> mx.array:
    return mx.array(x.permute(0, 2, 3, 1).float().numpy())


def torch_step_noise(seed: int, skip: int = 0):
    """A ``step_noise`` argument giving what diffusers draws from torch.Generator(seed), after `skip` earlier draws."""
    generator = torch.Generator().manual_seed(seed)
    drawn = {"n": 0}

    def step_noise(step, shape):
        while True:
            noise = torch.randn((shape[0], shape[3], shape[1], shape[2]), generator=generator)
            drawn["n"] += 1
            if drawn["n"] > skip:
                return nhwc(noise)

    return step_noise

"""Parity of stable_diffusion.vae with diffusers' AutoencoderKL on the tiny random VAE."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
import tiny_models
from diffusers import AutoencoderKL
from safetensors.numpy import load_file, save_file

from stable_diffusion import model_io
from stable_diffusion.config import AutoencoderConfig
from stable_diffusion.vae import Autoencoder
from parity import nhwc, relative_error

# Non-square, batch 2; the tiny VAE has 3 blocks, so latents are 4x smaller.
IMAGE_SHAPE = (2, 3, 24, 40)
LATENT_SHAPE = (2, 4, 6, 10)


def inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, IMAGE_SHAPE).astype(np.float32)
    latents = rng.standard_normal(LATENT_SHAPE).astype(np.float32)
    return image, latents


def reference(root, image: np.ndarray, latents: np.ndarray):
    vae = AutoencoderKL.from_pretrained(root / "vae").eval()
    with torch.no_grad():
        posterior = vae.encode(torch.from_numpy(image)).latent_dist
        decoded = vae.decode(torch.from_numpy(latents)).sample
    return posterior.mean, posterior.logvar, decoded


def assert_matches(root, ref_root=None, dtype=mx.float32, tol=1e-5):
    image, latents = inputs()
    ref_mean, ref_logvar, ref_image = reference(ref_root or root, image, latents)
    vae = model_io.load_component(root, "vae", Autoencoder, AutoencoderConfig, dtype)

    mean, logvar = vae.encode(nhwc(image))
    decoded = vae.decode(nhwc(latents))

    assert mean.shape == logvar.shape == (2, 6, 10, 4)
    assert decoded.shape == (2, 24, 40, 3)
    for ours in (mean, logvar, decoded):
        assert ours.dtype == dtype
        assert bool(mx.all(mx.isfinite(ours)))
    errors = relative_error(mean, ref_mean.permute(0, 2, 3, 1)), relative_error(logvar, ref_logvar.permute(0, 2, 3, 1)), relative_error(decoded, ref_image.permute(0, 2, 3, 1))
    assert max(errors) <= tol, f"relative errors (mean, logvar, decoded): {errors}"


def test_vae_encode_and_decode_match_diffusers(tiny_sd1):
    assert_matches(tiny_sd1)


def test_vae_in_float16_stays_finite_and_close_to_diffusers_float32(tiny_sd1):
    assert_matches(tiny_sd1, dtype=mx.float16, tol=1e-2)


@pytest.mark.parametrize("as_conv", [False, True], ids=["linear", "conv1x1"])
def test_vae_loads_legacy_attention_key_names(tiny_sd1, tmp_path, as_conv):
    """Older Hub checkpoints name the mid-block attention query/key/value/proj_attn, sometimes as 1x1 convs."""
    folder = tmp_path / "legacy"
    shutil.copytree(tiny_sd1 / "vae", folder / "vae")
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    weights = {}
    for key, value in load_file(path).items():
        for new, old in legacy.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if as_conv and value.ndim == 2:
                    value = value[:, :, None, None]
        weights[key] = value
    assert any(".proj_attn." in k for k in weights) and not any(".to_q." in k for k in weights)
    save_file(weights, path)

    assert_matches(folder, ref_root=tiny_sd1)


def test_vae_without_mid_attention_or_quant_convs_matches_diffusers(tmp_path):
    torch.manual_seed(1)
    vae = AutoencoderKL(
        **tiny_models.VAE, mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False
    )
    tiny_models._randomize(vae)
    vae.save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["mid_block_add_attention"] is False

    assert_matches(tmp_path)

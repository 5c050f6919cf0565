"""Which dtype the facades run the VAE in with float16=True, against what diffusers' pipelines do.

diffusers' SD 1/2 pipelines decode and img2img-encode in the VAE's own dtype (float16 under
torch_dtype=float16) and never read ``force_upcast``; its SDXL pipelines decode (and img2img-encode)
in float32 when the VAE is float16 and its config sets ``force_upcast``.
"""

import json
import shutil
import warnings

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

import ldm_layout
from parity import nhwc, relative_error
from stable_diffusion import StableDiffusion, StableDiffusionXL

SIZE = 32  # pixels; the tiny VAE downsamples 4x
FP16_TOL = 1e-2  # float16 against float16: different kernels round differently


def with_force_upcast(folder, tmp_path, value):
    """A copy of a tiny model folder whose vae/config.json sets force_upcast to ``value`` (None: no such key)."""
    folder = shutil.copytree(folder, tmp_path / "model")
    path = folder / "vae" / "config.json"
    config = json.loads(path.read_text())
    config.pop("force_upcast", None)
    if value is not None:
        config["force_upcast"] = value
    path.write_text(json.dumps(config))
    return folder


def diffusers_vae(folder, dtype):
    return AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype).eval()


def diffusers_decode(vae, latents: torch.Tensor) -> np.ndarray:
    """Scaled latents (NCHW) -> images (NHWC) in [0, 1], as the pipelines' decode and postprocess do."""
    with torch.no_grad():
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.float()
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def latents(seed=0):
    return torch.randn((2, 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("force_upcast", [True, None], ids=["force_upcast", "no_key"])
def test_sd_float16_decodes_in_float16_whatever_force_upcast_says(tiny_sd1, tmp_path, force_upcast):
    folder = with_force_upcast(tiny_sd1, tmp_path, force_upcast)
    sd = StableDiffusion(str(folder), float16=True)
    assert sd.vae_dtype == mx.float16
    assert sd.autoencoder.decoder.conv_in.weight.dtype == mx.float16

    z = latents()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no float32 fallback on a finite decode
        images = sd.decode(nhwc(z))
    ref = diffusers_decode(diffusers_vae(folder, torch.float16), z)
    assert np.isfinite(np.array(images)).all()
    assert relative_error(images, ref) <= FP16_TOL


def test_sd_float16_img2img_encodes_with_the_float16_vae(tiny_sd1, monkeypatch):
    sd = StableDiffusion(str(tiny_sd1), float16=True)
    seen = []
    encode = sd.autoencoder.encode

    def recording_encode(x, tile_size=None):
        seen.append((x.dtype, encode(x, tile_size)[0]))
        return seen[-1][1], None

    monkeypatch.setattr(sd.autoencoder, "encode", recording_encode)
    image = np.random.default_rng(0).uniform(-1, 1, (SIZE, SIZE, 3)).astype(np.float32)
    next(sd.generate_latents_from_image(image, "a horse", strength=0.5, num_steps=4, seed=0))

    vae = diffusers_vae(tiny_sd1, torch.float16)
    with torch.no_grad():
        ref = vae.encode(torch.from_numpy(image).permute(2, 0, 1)[None].half()).latent_dist.mean.float()
    [(dtype, mean)] = seen
    assert dtype == mx.float16 and mean.dtype == mx.float16
    assert relative_error(mean, ref.permute(0, 2, 3, 1)) <= FP16_TOL


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_file_sd_float16_decodes_in_float16(request, tmp_path, family):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = request.getfixturevalue(f"tiny_{family}")
    state = ldm_layout.pipeline_to_ldm(
        family,
        UNet2DConditionModel.from_pretrained(folder / "unet"),
        diffusers_vae(folder, torch.float32),
        CLIPTextModel.from_pretrained(folder / "text_encoder"),
    )
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    assert json.loads((folder / "vae" / "config.json").read_text())["force_upcast"] is True
    sd = StableDiffusion(str(path), float16=True, config_dir=folder)
    assert sd.vae_dtype == mx.float16
    assert sd.autoencoder.decoder.conv_in.weight.dtype == mx.float16

    z = latents(1)
    ref = diffusers_decode(diffusers_vae(folder, torch.float16), z)
    assert relative_error(sd.decode(nhwc(z)), ref) <= FP16_TOL


def test_sdxl_float16_decodes_in_float32_when_force_upcast(tiny_sdxl):
    assert json.loads((tiny_sdxl / "vae" / "config.json").read_text())["force_upcast"] is True
    sd = StableDiffusionXL(str(tiny_sdxl), float16=True)
    assert sd.vae_dtype == mx.float32
    assert sd.autoencoder.decoder.conv_in.weight.dtype == mx.float32
    z = latents(2)
    ref = diffusers_decode(diffusers_vae(tiny_sdxl, torch.float32), z)
    assert relative_error(sd.decode(nhwc(z)), ref) <= 1e-5


def test_sdxl_float16_decodes_in_float16_when_the_config_allows(tiny_sdxl, tmp_path):
    folder = with_force_upcast(tiny_sdxl, tmp_path, False)
    sd = StableDiffusionXL(str(folder), float16=True)
    assert sd.vae_dtype == mx.float16
    assert sd.autoencoder.decoder.conv_in.weight.dtype == mx.float16
    z = latents(3)
    ref = diffusers_decode(diffusers_vae(folder, torch.float16), z)
    assert relative_error(sd.decode(nhwc(z)), ref) <= FP16_TOL


def test_sd_float16_vae_with_an_overflowing_weight_warns_once_and_decodes_in_float32(tiny_sd1, tmp_path):
    """A weight too big for float16 activations: the fallback decodes again from the float32 weights."""
    folder = shutil.copytree(tiny_sd1, tmp_path / "model")
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights = load_file(path)
    weights["decoder.conv_in.weight"] = weights["decoder.conv_in.weight"] * 1e4
    save_file(weights, path)

    sd = StableDiffusion(str(folder), float16=True)
    assert sd.vae_dtype == mx.float16
    z = latents(4)
    with pytest.warns(UserWarning, match="decoding again in float32") as caught:
        first = sd.decode(nhwc(z), batch_size=1)  # two chunks: the second must not warn again
    assert len([w for w in caught if "float16 VAE" in str(w.message)]) == 1
    assert sd.vae_dtype == mx.float32
    assert sd.autoencoder.decoder.conv_in.weight.dtype == mx.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = sd.decode(nhwc(z))

    ref = diffusers_decode(diffusers_vae(folder, torch.float32), z)
    assert np.isfinite(np.array(first)).all()
    assert relative_error(first, ref) <= 1e-5
    assert relative_error(again, ref) <= 1e-5
    assert np.isnan(diffusers_decode(diffusers_vae(folder, torch.float16), z)).any()  # it overflows diffusers' float16 VAE too

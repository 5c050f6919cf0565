"""Large sizes in bounded memory: attention in query slices, and the VAE tiled as diffusers tiles it.

Slicing is forced on tiny sizes by lowering ``unet.ATTENTION_SCORES_LIMIT``; each sliced result is
held to the unsliced one and to diffusers' own sliced attention (``set_attention_slice``).
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import SlicedAttnProcessor

from stable_diffusion import unet as unet_module
from stable_diffusion.config import AutoencoderConfig, UNetConfig
from stable_diffusion.model_io import load_component
from stable_diffusion.unet import UNetModel, attention_scores_bytes, scaled_dot_product_attention
from stable_diffusion.vae import Autoencoder
from parity import nhwc, relative_error

EPS32 = float(np.finfo(np.float32).eps)


def _qkv(batch, heads, queries, keys, head_dim, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(batch, heads, queries, head_dim), (batch, heads, keys, head_dim), (batch, heads, keys, head_dim)]
    return [mx.array(rng.standard_normal(shape).astype(np.float32)) for shape in shapes]


def _count_calls(monkeypatch) -> list:
    calls = []
    fast_sdpa = mx.fast.scaled_dot_product_attention

    def counted(q, *args, **kwargs):
        calls.append(q.shape[2])
        return fast_sdpa(q, *args, **kwargs)

    monkeypatch.setattr(unet_module.mx.fast, "scaled_dot_product_attention", counted)
    return calls


def test_sliced_attention_equals_the_unsliced_call(monkeypatch):
    q, k, v = _qkv(2, 3, 1000, 900, 16)
    whole = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25)
    # 7 queries' scores: 1000 = 142 slices of 7 and one of 6.
    monkeypatch.setattr(unet_module, "ATTENTION_SCORES_LIMIT", 2 * 3 * 7 * 900 * 4)
    calls = _count_calls(monkeypatch)
    sliced = scaled_dot_product_attention(q, k, v, 0.25)
    assert calls == [7] * 142 + [6]
    # Same rows through the same op; only a matmul's summation order may differ. A score (head_dim
    # terms) moves by <= 16 eps max|q| max|k| scale, a weight by twice that plus the softmax's sum
    # over the keys (900 eps), and the weighted sum of v adds 900 eps: all times max|v|.
    score_error = 16 * EPS32 * float(mx.abs(q).max() * mx.abs(k).max()) * 0.25
    tol = (2 * score_error + 2 * 900 * EPS32) * float(mx.abs(v).max())
    assert float(mx.abs(sliced - whole).max()) <= tol


def test_sliced_attention_holds_one_slice_of_scores_at_a_time(monkeypatch):
    batch, heads, n, head_dim = 1, 2, 2048, 32
    q, k, v = _qkv(batch, heads, n, n, head_dim)
    mx.eval(q, k, v)
    full_scores = batch * heads * n * n * 4  # 32 MiB
    monkeypatch.setattr(unet_module, "ATTENTION_SCORES_LIMIT", full_scores // 16)
    assert attention_scores_bytes(batch, heads, n, n, 4) == full_scores // 16
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    out = scaled_dot_product_attention(q, k, v, head_dim**-0.5)
    mx.eval(out)
    peak = mx.get_peak_memory() - base
    # One slice's scores (the softmax runs in place), plus the output slices and their concatenation.
    bound = 1.5 * attention_scores_bytes(batch, heads, n, n, 4) + 3 * out.nbytes
    assert peak <= bound, f"peak {peak / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB"


def test_attention_scores_bytes_is_the_whole_matrix_when_it_fits():
    # SD 1.5 at 512² with guidance, float32: exactly the limit, one call.
    assert attention_scores_bytes(2, 8, 4096, 4096, 4) == 2 * 8 * 4096 * 4096 * 4
    # SD 1.5 at 2048²: 64x that, sliced to fit.
    sliced = attention_scores_bytes(2, 8, 65536, 65536, 4)
    assert unet_module.ATTENTION_SCORES_LIMIT - 2 * 8 * 65536 * 4 < sliced <= unet_module.ATTENTION_SCORES_LIMIT


def _diffusers_sliced_unet(root):
    model = UNet2DConditionModel.from_pretrained(root / "unet").eval()
    model.set_attention_slice(1)  # SlicedAttnProcessor, one (batch x head) at a time
    assert all(isinstance(p, SlicedAttnProcessor) for p in model.attn_processors.values())
    return model


@pytest.mark.parametrize("flavour", ["tiny_sd1", "tiny_sd2"])
def test_unet_with_sliced_attention_matches_diffusers_sliced_attention(flavour, request, monkeypatch):
    root = request.getfixturevalue(flavour)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 24, 4)).astype(np.float32)  # 384 queries at the top level
    context = rng.standard_normal((2, 7, 32)).astype(np.float32)
    with torch.no_grad():
        ref = _diffusers_sliced_unet(root)(
            torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.tensor(517.3), encoder_hidden_states=torch.from_numpy(context)
        ).sample.numpy().transpose(0, 2, 3, 1)

    model = load_component(root, "unet", UNetModel, UNetConfig, dtype=mx.float32)
    monkeypatch.setattr(unet_module, "ATTENTION_SCORES_LIMIT", 40_000)  # every attention in several slices
    calls = _count_calls(monkeypatch)
    out = model(mx.array(x), mx.array(517.3), mx.array(context))
    assert max(calls) < 384 and len(calls) > 50  # self- and cross-attention both sliced
    assert relative_error(out, ref) <= 1e-5  # as the unsliced UNet parity (test_unet.py)


def test_vae_with_sliced_mid_attention_matches_diffusers(tiny_sd1, monkeypatch):
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((1, 4, 12, 10)).astype(np.float32)  # 120 pixels attend to each other
    ref_vae = AutoencoderKL.from_pretrained(tiny_sd1 / "vae").eval()
    ref_vae.set_attn_processor(SlicedAttnProcessor(slice_size=1))
    with torch.no_grad():
        ref = ref_vae.decode(torch.from_numpy(latents)).sample

    vae = load_component(tiny_sd1, "vae", Autoencoder, AutoencoderConfig, mx.float32)
    monkeypatch.setattr(unet_module, "ATTENTION_SCORES_LIMIT", 120 * 4 * 9)  # slices of 9 queries
    calls = _count_calls(monkeypatch)
    out = vae.decode(nhwc(latents))
    assert calls == [9] * 13 + [3]
    assert relative_error(out, ref.permute(0, 2, 3, 1)) <= 1e-5  # as test_vae.py's parity


def _diffusers_tiled_vae(root):
    vae = AutoencoderKL.from_pretrained(root / "vae").eval()
    vae.enable_tiling()
    return vae


def test_tiled_decode_matches_diffusers_tiled_decode(tiny_sd1):
    ref_vae = _diffusers_tiled_vae(tiny_sd1)
    tile = ref_vae.config.sample_size  # 32 pixels, 8 latents: 20 x 14 latents make 4 x 3 tiles
    rng = np.random.default_rng(2)
    latents = rng.standard_normal((2, 4, 20, 14)).astype(np.float32)
    with torch.no_grad():
        ref = ref_vae.decode(torch.from_numpy(latents)).sample
        untiled = AutoencoderKL.from_pretrained(tiny_sd1 / "vae").eval().decode(torch.from_numpy(latents)).sample

    vae = load_component(tiny_sd1, "vae", Autoencoder, AutoencoderConfig, mx.float32)
    out = vae.decode(nhwc(latents), tile_size=tile)
    assert out.shape == (2, 80, 56, 3)
    assert relative_error(out, ref.permute(0, 2, 3, 1)) <= 1e-5  # as test_vae.py's untiled parity
    assert relative_error(ref, untiled) > 1e-3  # tiling does change the picture: the test can tell


def test_tiled_encode_matches_diffusers_tiled_encode(tiny_sd1):
    ref_vae = _diffusers_tiled_vae(tiny_sd1)
    tile = ref_vae.config.sample_size  # 72 x 52 pixels make 3 x 2 tiles
    rng = np.random.default_rng(3)
    image = rng.uniform(-1, 1, (2, 3, 72, 52)).astype(np.float32)
    with torch.no_grad():
        posterior = ref_vae.encode(torch.from_numpy(image)).latent_dist

    vae = load_component(tiny_sd1, "vae", Autoencoder, AutoencoderConfig, mx.float32)
    mean, logvar = vae.encode(nhwc(image), tile_size=tile)
    assert mean.shape == (2, 18, 13, 4)
    assert relative_error(mean, posterior.mean.permute(0, 2, 3, 1)) <= 1e-5
    assert relative_error(logvar, posterior.logvar.permute(0, 2, 3, 1)) <= 1e-5


def test_vae_is_not_tiled_up_to_the_tile_size(tiny_sd1):
    # diffusers tiles only what exceeds the tile: 8 x 8 latents / 32 x 32 pixels run whole.
    vae = load_component(tiny_sd1, "vae", Autoencoder, AutoencoderConfig, mx.float32)
    rng = np.random.default_rng(4)
    latents, image = rng.standard_normal((1, 4, 8, 8)).astype(np.float32), rng.uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    assert mx.array_equal(vae.decode(nhwc(latents), tile_size=32), vae.decode(nhwc(latents)))
    assert all(mx.array_equal(a, b) for a, b in zip(vae.encode(nhwc(image), tile_size=32), vae.encode(nhwc(image))))


def _reference_images(root, latents: np.ndarray, tiling: bool) -> np.ndarray:
    """diffusers' pipeline decode (StableDiffusionPipeline.__call__ with output_type="np")."""
    vae = AutoencoderKL.from_pretrained(root / "vae").eval()
    if tiling:
        vae.enable_tiling()
    with torch.no_grad():
        image = vae.decode(torch.from_numpy(latents) / vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_pipeline_decode_tiles_when_asked_or_when_the_untiled_decode_would_not_fit(tiny_sd1, monkeypatch):
    from stable_diffusion import StableDiffusion

    sd = StableDiffusion(str(tiny_sd1))
    rng = np.random.default_rng(5)
    latents = rng.standard_normal((3, 4, 14, 20)).astype(np.float32)  # 56 x 80 pixels: past the 32-pixel tile
    tiled_ref, whole_ref = _reference_images(tiny_sd1, latents, True), _reference_images(tiny_sd1, latents, False)
    ours = {tiled: sd.decode(nhwc(latents), batch_size=2, tiled=tiled) for tiled in (True, False, None)}
    # The images lie in [0, 1]: errors relative to 1, as the decode parity.
    assert float(np.abs(np.array(ours[True]) - tiled_ref).max()) <= 1e-5
    assert float(np.abs(np.array(ours[False]) - whole_ref).max()) <= 1e-5
    assert mx.array_equal(ours[None], ours[False])  # a few MB fit
    # Where MLX may allocate less than the untiled decode needs, the default tiles.
    monkeypatch.setattr(mx, "get_memory_limit", lambda: mx.get_active_memory() + 2**20)
    assert mx.array_equal(sd.decode(nhwc(latents), batch_size=2), ours[True])
    with pytest.raises(ValueError, match="tiled must be True, False or None"):
        sd.decode(nhwc(latents), tiled="yes")

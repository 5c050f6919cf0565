"""UNet parity with diffusers' UNet2DConditionModel on tiny random models (NCHW there, NHWC here)."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

import tiny_models
from parity import relative_error
from stable_diffusion.config import UNetConfig
from stable_diffusion.errors import ModelLoadError
from stable_diffusion.model_io import load_component
from stable_diffusion.unet import Attention, UNetModel

POOLED_DIM = 32
TIME_EMBED_DIM = 8
SDXL_UNET = dict(  # the fixture's SDXL layout, plus an explicit reverse transformer depth
    tiny_models.SDXL_UNET,
    reverse_transformer_layers_per_block=(3, 1, 1),
    attention_head_dim=(2, 4, 8),
    cross_attention_dim=64,
    addition_time_embed_dim=TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=POOLED_DIM + 6 * TIME_EMBED_DIM,
)


@pytest.fixture(scope="module")
def tiny_sdxl_unet(tmp_path_factory):
    """A model folder holding only an SDXL-shaped unet/."""
    torch.manual_seed(1)
    unet = UNet2DConditionModel(**SDXL_UNET)
    tiny_models._randomize(unet)
    root = tmp_path_factory.mktemp("tiny_sdxl_unet")
    unet.save_pretrained(root / "unet")
    return root


def _inputs(batch=2, size=(16, 16), context_dim=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *size, 4)).astype(np.float32)
    context = rng.standard_normal((batch, 7, context_dim)).astype(np.float32)
    return x, context


def _sdxl_conditioning(batch=2, seed=1):
    rng = np.random.default_rng(seed)
    text_embeds = rng.standard_normal((batch, POOLED_DIM)).astype(np.float32)
    time_ids = np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 32, 16, 1024, 1024]], np.float32)[:batch]
    return text_embeds, time_ids


def _reference(root, x, t, context, text_time=None):
    unet = UNet2DConditionModel.from_pretrained(root / "unet").eval()
    added = None
    if text_time is not None:
        added = {"text_embeds": torch.from_numpy(text_time[0]), "time_ids": torch.from_numpy(text_time[1])}
    with torch.no_grad():
        out = unet(
            torch.from_numpy(x.transpose(0, 3, 1, 2)),
            torch.tensor(t),
            encoder_hidden_states=torch.from_numpy(context),
            added_cond_kwargs=added,
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)


def _ours(model, x, t, context, text_time=None):
    if text_time is not None:
        text_time = (mx.array(text_time[0]), mx.array(text_time[1]))
    out = model(mx.array(x), mx.array(t), mx.array(context), text_time)
    assert out.dtype == model.conv_in.weight.dtype
    return np.array(out.astype(mx.float32))


TIMESTEPS = [517.3, np.array([517.3, 20.7], np.float32)]


def _load(root, fused: bool, dtype=mx.float32) -> UNetModel:
    model = load_component(root, "unet", UNetModel, UNetConfig, dtype=dtype)
    if fused:
        model.fuse_projections()
    return model


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("flavour", ["tiny_sd1", "tiny_sd2"])
def test_unet_matches_diffusers_for_float_and_per_sample_timesteps(flavour, fused, request):
    root = request.getfixturevalue(flavour)
    model = _load(root, fused)
    x, context = _inputs()
    for t in TIMESTEPS:
        ref = _reference(root, x, t, context)
        assert relative_error(_ours(model, x, t, context), ref) <= 1e-5


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_sdxl_shaped_unet_matches_diffusers_with_text_time(tiny_sdxl_unet, fused):
    model = _load(tiny_sdxl_unet, fused)
    x, context = _inputs(context_dim=64)
    text_time = _sdxl_conditioning()
    for t in TIMESTEPS:
        ref = _reference(tiny_sdxl_unet, x, t, context, text_time)
        assert relative_error(_ours(model, x, t, context, text_time), ref) <= 1e-5


def test_sdxl_shaped_unet_requires_text_time(tiny_sdxl_unet):
    model = load_component(tiny_sdxl_unet, "unet", UNetModel, UNetConfig)
    x, context = _inputs(context_dim=64)
    with pytest.raises(ValueError, match="text_time"):
        model(mx.array(x), mx.array(10.0), mx.array(context))


def test_fusing_runs_the_grouped_projections_as_one_matmul_each(tiny_sd2, monkeypatch):
    calls = []
    linear_call = nn.Linear.__call__
    monkeypatch.setattr(nn.Linear, "__call__", lambda self, x: calls.append(self) or linear_call(self, x))
    model = _load(tiny_sd2, fused=False)
    x, context = _inputs()
    mx.eval(model(mx.array(x), mx.array(517.3), mx.array(context)))
    separate = len(calls)
    calls.clear()
    model.fuse_projections()
    mx.eval(model(mx.array(x), mx.array(517.3), mx.array(context)))
    attentions = [m for _, m in model.named_modules() if isinstance(m, Attention)]
    resnets = [m for _, m in model.named_modules() if "time_emb_proj" in m]
    # self-attention: q, k, v -> one; cross-attention: k, v -> one; every time_emb_proj -> one
    saved = sum(1 if a.is_cross_attention else 2 for a in attentions) + len(resnets)
    assert separate - len(calls) == saved + len(attentions)  # the grouped matmuls are not nn.Linear calls


def test_fused_unet_follows_weights_changed_after_fusing(tiny_sd2, tmp_path):
    """A LoRA merge or load_weights after fuse_projections() replaces weights the fused matmuls
    were built from; the model must compute with the new weights, as diffusers does with them."""
    model = _load(tiny_sd2, fused=True)
    reference = UNet2DConditionModel.from_pretrained(tiny_sd2 / "unet")
    state = reference.state_dict()
    changed = [k for k in state if k.endswith(("attn1.to_k.weight", "attn2.to_v.weight", "time_emb_proj.weight", "time_emb_proj.bias"))]
    assert len(changed) >= 4
    torch.manual_seed(5)
    for key in changed:
        state[key] = state[key] + 0.5 * torch.randn_like(state[key])
    reference.load_state_dict(state)
    reference.save_pretrained(tmp_path / "unet")
    model.load_weights(list(model.sanitize({k: mx.array(state[k].numpy()) for k in changed}).items()), strict=False)
    x, context = _inputs()
    expected = _reference(tmp_path, x, 517.3, context)
    assert relative_error(_ours(model, x, 517.3, context), expected) <= 1e-5
    model.fuse_projections()  # fusing again uses the new weights too
    assert relative_error(_ours(model, x, 517.3, context), expected) <= 1e-5


def test_unet_upsamples_to_the_skip_size_for_latents_not_a_multiple_of_four(tiny_sd1):
    # 10x14 latents: 10 -> 5 -> 3 and 14 -> 7 -> 4 going down; diffusers forwards the skip sizes up.
    model = load_component(tiny_sd1, "unet", UNetModel, UNetConfig)
    x, context = _inputs(size=(10, 14))
    ref = _reference(tiny_sd1, x, 517.3, context)
    out = _ours(model, x, 517.3, context)
    assert out.shape == x.shape
    assert relative_error(out, ref) <= 1e-5


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
@pytest.mark.parametrize("flavour", ["tiny_sd2", "tiny_sdxl_unet"])
def test_float16_unet_is_finite_and_close_to_the_float32_reference(flavour, fused, request):
    root = request.getfixturevalue(flavour)
    model = _load(root, fused, dtype=mx.float16)
    sdxl = flavour == "tiny_sdxl_unet"
    x, context = _inputs(context_dim=64 if sdxl else 32)
    text_time = _sdxl_conditioning() if sdxl else None
    t = np.array([517.3, 20.7], np.float32)
    out = _ours(model, x, t, context, text_time)
    assert np.isfinite(out).all()
    assert relative_error(out, _reference(root, x, t, context, text_time)) <= 1e-2


def test_unet_with_an_unsupported_config_value_is_refused(tiny_sd1, tmp_path):
    shutil.copytree(tiny_sd1 / "unet", tmp_path / "unet")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    config["resnet_time_scale_shift"] = "scale_shift"
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="resnet_time_scale_shift"):
        load_component(tmp_path, "unet", UNetModel, UNetConfig)


def test_upcast_attention_in_float16_survives_scores_beyond_the_float16_range():
    # Identity q/k projections and inputs of scale 100: the scaled self-scores reach ~1e5 > 65504.
    from diffusers.models.attention_processor import Attention as DiffusersAttention

    torch.manual_seed(0)
    ref = DiffusersAttention(query_dim=64, heads=2, dim_head=32, upcast_attention=True).eval()
    with torch.no_grad():
        ref.to_q.weight.copy_(torch.eye(64))
        ref.to_k.weight.copy_(torch.eye(64))
    x = np.random.default_rng(0).standard_normal((1, 16, 64)).astype(np.float32) * 100
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()

    ours = Attention(64, heads=2, head_dim=32, upcast=True)
    ours.load_weights([(k, mx.array(v.numpy())) for k, v in ref.state_dict().items()], strict=True)
    ours.set_dtype(mx.float16)
    out = np.array(ours(mx.array(x).astype(mx.float16)).astype(mx.float32))
    assert np.isfinite(out).all()
    assert relative_error(out, expected) <= 1e-2

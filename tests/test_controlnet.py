"""ControlNet parity with diffusers' ControlNetModel, and the UNet's residual inputs against
diffusers' UNet2DConditionModel, on tiny random models (NCHW there, NHWC here).

Tolerance: float32 components are held to 1e-5 relative (max error over max |reference|), as
tests/test_unet.py holds the UNet: each residual is the UNet's own down/mid computation (the same
blocks, the same op order) plus a few convs, so float32 rounding (2^-24 per op) over a few hundred
ops stays two orders of magnitude below it; a wrong scale, channel order or pooling is an O(1) error.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel as DiffusersControlNet
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from safetensors.torch import save_file

import ldm_layout
import tiny_models
from parity import relative_error
from stable_diffusion.config import UNetConfig
from stable_diffusion.controlnet import ControlNetConfig, derived_config, load_controlnet, to_diffusers_names
from stable_diffusion.errors import ModelLoadError
from stable_diffusion.hub_configs import FAMILY_FOLDERS, HubModel
from stable_diffusion.model_io import load_component
from stable_diffusion.unet import UNetModel

ROOT = str(Path(__file__).resolve().parents[1])
POOLED_DIM = 24  # tiny_models.SDXL_UNET's projection_class_embeddings_input_dim = 24 + 6 * 8
FLAVOURS = {
    "sd1": (tiny_models.SD1_UNET, {}),
    "sd1_bgr": (tiny_models.SD1_UNET, {"controlnet_conditioning_channel_order": "bgr"}),
    "sd1_pool": (tiny_models.SD1_UNET, {"global_pool_conditions": True}),
    "sd2": (tiny_models.SD2_UNET, {}),
    "sdxl": (tiny_models.SDXL_UNET, {}),
    # diffusers/controlnet-canny-sdxl-1.0-mid's layout: transformers without blocks at the upper levels
    "sdxl_mid": (dict(tiny_models.SDXL_UNET, transformer_layers_per_block=(0, 0, 1)), {}),
}


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory):
    """flavour -> (folder, diffusers model): tiny ControlNets with every parameter random."""
    root = tmp_path_factory.mktemp("controlnets")
    return {
        name: (root / name, tiny_models.build_controlnet(root / name, unet, seed=i, **options))
        for i, (name, (unet, options)) in enumerate(FLAVOURS.items())
    }


@pytest.fixture(scope="module")
def unets(tmp_path_factory):
    """family -> (folder holding unet/, diffusers model), random weights."""
    root = tmp_path_factory.mktemp("unets")
    out = {}
    for name in ("sd1", "sdxl"):
        torch.manual_seed(7)
        unet = UNet2DConditionModel(**FLAVOURS[name][0])
        tiny_models._randomize(unet)
        unet.save_pretrained(root / name / "unet")
        out[name] = (root / name, unet.eval())
    return out


def _inputs(flavour: str, batch=2, latent=(8, 8), seed=0):
    """latents (NHWC), text, control image (NHWC, 8x the latents, in [0, 1]) and SDXL's text_time, as numpy."""
    rng = np.random.default_rng(seed)
    context_dim = FLAVOURS[flavour][0]["cross_attention_dim"]
    x = rng.standard_normal((batch, *latent, 4)).astype(np.float32)
    context = rng.standard_normal((batch, 7, context_dim)).astype(np.float32)
    image = rng.random((batch, 8 * latent[0], 8 * latent[1], 3)).astype(np.float32)
    text_time = None
    if flavour.startswith("sdxl"):
        text_time = (
            rng.standard_normal((batch, POOLED_DIM)).astype(np.float32),
            np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 32, 16, 1024, 1024]], np.float32)[:batch],
        )
    return x, context, image, text_time


def _nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def _added(text_time):
    return None if text_time is None else {"text_embeds": torch.from_numpy(text_time[0]), "time_ids": torch.from_numpy(text_time[1])}


def _reference(controlnet, x, t, context, image, text_time, scale=1.0, guess_mode=False):
    with torch.no_grad():
        down, mid = controlnet(
            _nchw(x), torch.tensor(t), torch.from_numpy(context), _nchw(image), scale,
            added_cond_kwargs=_added(text_time), guess_mode=guess_mode, return_dict=False,
        )  # fmt: skip
    return [d.numpy().transpose(0, 2, 3, 1) for d in down], mid.numpy().transpose(0, 2, 3, 1)


def _ours(model, x, t, context, image, text_time, scale=1.0, guess_mode=False):
    if text_time is not None:
        text_time = tuple(mx.array(a) for a in text_time)
    down, mid = model(mx.array(x), mx.array(t), mx.array(context), mx.array(image), scale, text_time, guess_mode)
    assert all(r.dtype == model.conv_in.weight.dtype for r in [*down, mid])
    return [np.array(d.astype(mx.float32)) for d in down], np.array(mid.astype(mx.float32))


def _assert_residuals_match(ours, ref, tolerance=1e-5):
    (down, mid), (ref_down, ref_mid) = ours, ref
    assert len(down) == len(ref_down)
    for i, (a, b) in enumerate(zip([*down, mid], [*ref_down, ref_mid])):
        assert a.shape == b.shape, f"residual {i}"
        assert relative_error(a, b) <= tolerance, f"residual {i}: {relative_error(a, b)}"


TIMESTEPS = [517.3, np.array([517.3, 20.7], np.float32)]


@pytest.mark.parametrize(
    "flavour, scale, guess_mode",
    [
        ("sd1", 1.0, False),
        ("sd1", 0.7, False),
        ("sd1", 0.7, True),
        ("sd1_bgr", 1.0, False),
        ("sd1_pool", 0.7, False),
        ("sd1_pool", 0.7, True),  # diffusers: pooled conditions take no guess-mode scales
        ("sd2", 0.7, True),
        ("sdxl", 1.0, False),
        ("sdxl", 0.7, True),
        ("sdxl_mid", 0.7, False),
    ],
)
def test_controlnet_residuals_match_diffusers(controlnets, flavour, scale, guess_mode):
    folder, reference = controlnets[flavour]
    model = load_controlnet(str(folder))
    x, context, image, text_time = _inputs(flavour)
    for t in TIMESTEPS:
        ref = _reference(reference, x, t, context, image, text_time, scale, guess_mode)
        _assert_residuals_match(_ours(model, x, t, context, image, text_time, scale, guess_mode), ref)


def test_fused_controlnet_matches_diffusers(controlnets):
    folder, reference = controlnets["sdxl"]
    model = load_controlnet(str(folder))
    model.fuse_projections()
    x, context, image, text_time = _inputs("sdxl")
    _assert_residuals_match(_ours(model, x, 517.3, context, image, text_time, 0.7), _reference(reference, x, 517.3, context, image, text_time, 0.7))


def test_float16_controlnet_is_close_to_the_float32_reference(controlnets):
    folder, reference = controlnets["sdxl"]
    model = load_controlnet(str(folder), float16=True)
    assert model.conv_in.weight.dtype == mx.float16
    x, context, image, text_time = _inputs("sdxl")
    ours = _ours(model, x, 517.3, context, image, text_time)
    assert all(np.isfinite(r).all() for r in [*ours[0], ours[1]])
    _assert_residuals_match(ours, _reference(reference, x, 517.3, context, image, text_time), tolerance=1e-2)


def test_one_control_image_is_broadcast_over_the_batch(controlnets):
    folder, reference = controlnets["sd1"]
    model = load_controlnet(str(folder))
    x, context, image, _ = _inputs("sd1")
    _assert_residuals_match(_ours(model, x, 517.3, context, image[:1], None), _reference(reference, x, 517.3, context, image[:1], None))


def test_control_image_of_the_wrong_size_is_refused(controlnets):
    model = load_controlnet(str(controlnets["sd1"][0]))
    x, context, image, _ = _inputs("sd1")
    args = (mx.array(x), mx.array(517.3), mx.array(context))
    with pytest.raises(ValueError, match="does not match latents"):
        model(*args, mx.array(image[:, :32, :32]))
    with pytest.raises(ValueError, match=r"expected \(1 or 2, height, width, 3\)"):
        model(*args, mx.array(np.concatenate([image] * 2)))
    with pytest.raises(ValueError, match=r"expected \(1 or 2, height, width, 3\)"):
        model(*args, mx.array(image[..., :1]))


# ---- the UNet's residual inputs ------------------------------------------------------------------


def _residuals(controlnet_flavour, controlnets, seed=3):
    """Random residuals of the shapes a ControlNet of this flavour hands the UNet (pooled ones broadcast)."""
    model = load_controlnet(str(controlnets[controlnet_flavour][0]))
    x, context, image, text_time = _inputs(controlnet_flavour)
    down, mid = _ours(model, x, 517.3, context, image, text_time)
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(d.shape).astype(np.float32) for d in down], rng.standard_normal(mid.shape).astype(np.float32)


@pytest.mark.parametrize("family, controlnet_flavour", [("sd1", "sd1"), ("sd1", "sd1_pool"), ("sdxl", "sdxl")])
def test_unet_adds_residuals_as_diffusers(unets, controlnets, family, controlnet_flavour):
    folder, reference = unets[family]
    down, mid = _residuals(controlnet_flavour, controlnets)
    x, context, _, text_time = _inputs(family)
    with torch.no_grad():
        expected = reference(
            _nchw(x), torch.tensor(517.3), torch.from_numpy(context), added_cond_kwargs=_added(text_time),
            down_block_additional_residuals=[_nchw(d) for d in down], mid_block_additional_residual=_nchw(mid),
        ).sample.numpy().transpose(0, 2, 3, 1)  # fmt: skip
    model = load_component(folder, "unet", UNetModel, UNetConfig)
    tt = None if text_time is None else tuple(mx.array(a) for a in text_time)
    out = model(mx.array(x), mx.array(517.3), mx.array(context), tt, [mx.array(d) for d in down], mx.array(mid))
    assert relative_error(out, expected) <= 1e-5
    # The residuals change the output by O(1): the test cannot pass with them ignored.
    assert relative_error(model(mx.array(x), mx.array(517.3), mx.array(context), tt), expected) > 1e-2


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_zero_residuals_leave_the_unet_output_bit_identical(unets, controlnets, dtype):
    """Float32 zeros on a float16 UNet too: the residuals are taken in the UNet's dtype."""
    folder, _ = unets["sd1"]
    model = load_component(folder, "unet", UNetModel, UNetConfig, dtype=dtype)
    down, mid = _residuals("sd1", controlnets)
    x, context, _, _ = _inputs("sd1")
    plain = model(mx.array(x), mx.array(517.3), mx.array(context))
    zeros = model(mx.array(x), mx.array(517.3), mx.array(context), None, [mx.zeros(d.shape) for d in down], mx.zeros(mid.shape))
    assert plain.dtype == zeros.dtype == dtype
    assert mx.array_equal(plain, zeros)


def test_unet_refuses_half_or_miscounted_residuals(unets, controlnets):
    model = load_component(unets["sd1"][0], "unet", UNetModel, UNetConfig)
    down, mid = _residuals("sd1", controlnets)
    x, context, _, _ = _inputs("sd1")
    args = (mx.array(x), mx.array(517.3), mx.array(context), None)
    with pytest.raises(ValueError, match="give both"):
        model(*args, [mx.array(d) for d in down])
    with pytest.raises(ValueError, match="give both"):
        model(*args, None, mx.array(mid))
    with pytest.raises(ValueError, match=f"{len(down) - 1} arrays for this UNet's {len(down)} skips"):
        model(*args, [mx.array(d) for d in down[:-1]], mx.array(mid))


# ---- files ---------------------------------------------------------------------------------------

_CONTROL = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")


def controlnet_to_ldm(state: dict, layers_per_block: int) -> dict:
    """diffusers ControlNetModel state dict -> the original ``control_model.*`` layout: the UNet
    parts as tests/ldm_layout writes them, the hint convs at input_hint_block.{0, 2, ..., 14}
    (SiLUs between), zero_convs.i.0 and middle_block_out.0."""
    unet = {k: v for k, v in state.items() if not k.startswith(_CONTROL)}
    out = {k.removeprefix(ldm_layout.UNET_PREFIX): v for k, v in ldm_layout.unet_to_ldm(unet, layers_per_block).items()}
    blocks = {int(k.split(".")[2]) for k in state if k.startswith("controlnet_cond_embedding.blocks.")}
    for key, value in state.items():
        module, param = key.rsplit(".", 1)
        parts = module.split(".")
        if parts[0] == "controlnet_cond_embedding":
            index = {"conv_in": 0, "conv_out": 2 * len(blocks) + 2}.get(parts[1])
            out[f"input_hint_block.{index if index is not None else 2 * int(parts[2]) + 2}.{param}"] = value
        elif parts[0] == "controlnet_down_blocks":
            out[f"zero_convs.{parts[1]}.0.{param}"] = value
        elif parts[0] == "controlnet_mid_block":
            out[f"middle_block_out.0.{param}"] = value
    return {"control_model." + k: v for k, v in out.items()}


@pytest.mark.parametrize("flavour", ["sd1", "sdxl"])
def test_original_single_file_layout_loads_to_the_same_outputs(controlnets, flavour, tmp_path):
    folder, reference = controlnets[flavour]
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    lpb = reference.config.layers_per_block
    ldm = controlnet_to_ldm(state, lpb)
    # The writer is the inverse of diffusers' own reader (which leaves SDXL's label_emb to the caller).
    back = convert_controlnet_checkpoint(dict(ldm), dict(reference.config))
    assert set(back) == {k for k in state if not k.startswith("add_embedding.")}
    assert all(torch.equal(back[k], state[k]) for k in back)
    # v1.0 files also hold the SD model they were trained with: not read.
    ldm["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)
    save_file(ldm, tmp_path / "control_tiny.safetensors")

    model = load_controlnet(str(tmp_path / "control_tiny.safetensors"), config_dir=str(folder))
    x, context, image, text_time = _inputs(flavour)
    _assert_residuals_match(_ours(model, x, 517.3, context, image, text_time, 0.7), _reference(reference, x, 517.3, context, image, text_time, 0.7))


def test_single_file_in_diffusers_names_loads(controlnets, tmp_path):
    folder, reference = controlnets["sd1_bgr"]
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "cn.safetensors")
    model = load_controlnet(str(tmp_path / "cn.safetensors"), config_dir=str(folder))
    assert model.config.controlnet_conditioning_channel_order == "bgr"
    x, context, image, _ = _inputs("sd1")
    _assert_residuals_match(_ours(model, x, 517.3, context, image, None), _reference(reference, x, 517.3, context, image, None))


def _shaping(config: ControlNetConfig) -> ControlNetConfig:
    """The config with the transformer depth of levels that have no attention (unused) set to 0."""
    depths = tuple(d if t == "CrossAttnDownBlock2D" else 0 for d, t in zip(config.transformer_layers_per_block, config.down_block_types))
    return dataclasses.replace(config, transformer_layers_per_block=depths)


@pytest.mark.parametrize(
    "family, depths",
    [("sd1", None), ("sd2", None), ("sdxl", None), ("sdxl", [0, 0, 1]), ("sdxl", [0, 0, 0])],
    ids=["sd1", "sd2", "sdxl", "sdxl-mid", "sdxl-small"],
)
def test_single_file_config_is_the_families_controlnet_config(family, depths):
    """Without config_dir, a full-size file's config is that of the ControlNet diffusers'
    ``from_unet`` builds from the family's reference UNet (shapes only: built on the meta device),
    also with the fewer transformer blocks of SDXL's mid and small ControlNets."""
    unet_config = HubModel(FAMILY_FOLDERS[family]).config("unet")
    if depths is not None:
        unet_config["transformer_layers_per_block"] = depths
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        reference = DiffusersControlNet.from_unet(unet, load_weights_from_unet=False)
    ldm = controlnet_to_ldm(reference.state_dict(), reference.config.layers_per_block)
    shapes = {k: tuple(v.shape) for k, v in to_diffusers_names(ldm, "test").items()}
    assert shapes == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert _shaping(ControlNetConfig.from_dict(derived_config(shapes))) == _shaping(ControlNetConfig.from_dict(dict(reference.config)))


def test_fp16_variant_is_read_when_float16(controlnets, tmp_path):
    import shutil

    from safetensors.numpy import load_file
    from safetensors.numpy import save_file as save_numpy

    folder = tmp_path / "cn"
    shutil.copytree(controlnets["sd1"][0], folder)
    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    save_numpy({k: (v + 1.0).astype(np.float16) for k, v in weights.items()}, folder / "diffusion_pytorch_model.fp16.safetensors")
    ref = weights["controlnet_mid_block.bias"]
    np.testing.assert_array_equal(np.array(load_controlnet(str(folder)).controlnet_mid_block.bias), ref)
    half = load_controlnet(str(folder), float16=True).controlnet_mid_block.bias
    np.testing.assert_array_equal(np.array(half), (ref + 1.0).astype(np.float16))


def test_hub_id_loads_from_the_hf_cache_offline(controlnets, tmp_path):
    import shutil

    snapshot = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-controlnet" / "snapshots" / ("a" * 40)
    shutil.copytree(controlnets["sd1"][0], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    code = (
        "from stable_diffusion.controlnet import load_controlnet\n"
        "print(load_controlnet('tiny-org/tiny-controlnet').controlnet_mid_block.bias.tolist())\n"
        "load_controlnet('tiny-org/not-cached')\n"
    )
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    expected = controlnets["sd1"][1].controlnet_mid_block.bias.tolist()
    assert out.stdout.strip() and json.loads(out.stdout.strip()) == expected, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert "controlnet 'tiny-org/not-cached' is not in the Hugging Face cache" in last and "(HF_HUB_OFFLINE is set)" in last


def test_bad_files_give_one_clear_error(controlnets, tmp_path):
    (tmp_path / "control.pth").write_bytes(b"not read")
    with pytest.raises(ModelLoadError, match="only .safetensors"):
        load_controlnet(str(tmp_path / "control.pth"))
    save_file({"first_stage_model.decoder.conv_in.weight": torch.zeros(2)}, tmp_path / "vae.safetensors")
    with pytest.raises(ModelLoadError, match="not a ControlNet"):
        load_controlnet(str(tmp_path / "vae.safetensors"))
    state = {k: v.contiguous() for k, v in controlnets["sd1"][1].state_dict().items()}
    ldm = controlnet_to_ldm(state, 1)
    ldm["control_model.input_blocks.1.0.unknown.weight"] = torch.zeros(1)
    save_file(ldm, tmp_path / "odd.safetensors")
    with pytest.raises(ModelLoadError, match=r"unknown keys \['input_blocks.1.0.unknown.weight'\]"):
        load_controlnet(str(tmp_path / "odd.safetensors"), config_dir=str(controlnets["sd1"][0]))
    config = json.loads((controlnets["sd1"][0] / "config.json").read_text())
    (tmp_path / "cn").mkdir()
    (tmp_path / "cn" / "config.json").write_text(json.dumps(dict(config, controlnet_conditioning_channel_order="rgba")))
    with pytest.raises(ModelLoadError, match="controlnet_conditioning_channel_order='rgba' is not supported"):
        load_controlnet(str(tmp_path / "cn"))
    with pytest.raises(ModelLoadError, match="config_dir applies to single"):
        load_controlnet(str(controlnets["sd1"][0]), config_dir=str(controlnets["sd1"][0]))


# ---- several ControlNets in one step -------------------------------------------------------------


def _multi_reference(nets, x, t, context, images, scales, keeps, uncond_rows, guess_mode):
    """What diffusers' StableDiffusionControlNetPipeline's loop hands its UNet: MultiControlNetModel
    at scale * keep, in guess mode on the conditional rows only, with zeros for the others."""
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    first = uncond_rows if guess_mode else 0
    cond = [_nchw(np.concatenate([im] * ((x.shape[0] - first) // im.shape[0]))) for im in images]
    with torch.no_grad():
        down, mid = MultiControlNetModel(nets)(
            _nchw(x[first:]), torch.tensor(t), torch.from_numpy(context[first:]), cond,
            [s * k for s, k in zip(scales, keeps)], guess_mode=guess_mode, return_dict=False,
        )  # fmt: skip
    if first:
        down = [torch.cat([torch.zeros_like(d[:first]), d]) for d in down]
        mid = torch.cat([torch.zeros_like(mid[:first]), mid])
    return [d.numpy().transpose(0, 2, 3, 1) for d in down], mid.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize(
    "first, step, guess_mode, n_images",
    [
        ("sd1", 0, False, 1),
        ("sd1", 0, True, 1),
        ("sd1", 4, False, 1),  # the last step inside the second ControlNet's span
        ("sd1", 5, False, 1),  # its span (to 0.5) is over
        ("sd1", 5, True, 2),
        ("sd1", 0, False, 2),
        ("sd1_pool", 0, False, 1),  # pooled conditions: diffusers' pipelines switch guess mode on
    ],
)
def test_control_residuals_sum_controlnets_as_diffusers_pipelines(controlnets, first, step, guess_mode, n_images):
    from stable_diffusion.controlnet import Control, control_residuals

    # diffusers' MultiControlNetModel cannot add a pooled mid residual to a full one: pooled with pooled
    names = (first, "sd1_pool" if first == "sd1_pool" else "sd1_bgr")
    scales, spans = (0.8, 0.6), ((0.0, 1.0), (0.0, 0.5))
    num_steps = 10
    x, context, image, _ = _inputs("sd1", batch=2 * n_images)  # [unconditional rows; conditional rows]
    images = [image[:n_images], image[::-1][:n_images].copy()]
    controls = [
        Control(load_controlnet(str(controlnets[n][0])), mx.array(im), s, *span)
        for n, im, s, span in zip(names, images, scales, spans)
    ]
    keeps = [1.0 - float(step / num_steps < a or (step + 1) / num_steps > b) for a, b in spans]
    assert keeps[1] == (0.0 if step == 5 else 1.0)
    down, mid = control_residuals(controls, mx.array(x), 517.3, mx.array(context), None, step, num_steps, n_images, guess_mode)
    ours = [np.array(d) for d in down], np.array(mid)
    guess_mode = guess_mode or first == "sd1_pool"
    ref = _multi_reference([controlnets[n][1] for n in names], x, 517.3, context, images, scales, keeps, n_images, guess_mode)
    _assert_residuals_match(ours, ref)


def test_control_residuals_are_none_when_no_controlnet_acts(controlnets):
    from stable_diffusion.controlnet import Control, control_residuals

    x, context, image, _ = _inputs("sd1")
    control = Control(load_controlnet(str(controlnets["sd1"][0])), mx.array(image[:1]), 1.0, 0.2, 0.8)
    args = (mx.array(x), 517.3, mx.array(context), None)
    assert control_residuals([control], *args, step=1, num_steps=10) is None  # 0.1 < start
    assert control_residuals([control], *args, step=8, num_steps=10) is None  # 0.9 > end
    assert control_residuals([control], *args, step=2, num_steps=10) is not None
    # guess mode on a batch of unconditional rows only (guidance run as two UNet batches): nothing to add
    assert control_residuals([control], *args, step=2, num_steps=10, uncond_rows=2, guess_mode=True) is None

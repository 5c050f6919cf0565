"""Single-file (LDM / A1111) checkpoints: stable_diffusion.checkpoint vs diffusers' from_single_file.

The tiny SD1-, SD2- and SDXL-shaped models are written out in the LDM layout (tests/ldm_layout.py)
and loaded by both; the real key names are checked on the full-size key lists of each family,
built on the meta device from the shipped configs.
"""

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

import ldm_layout
from parity import nhwc, relative_error
from stable_diffusion import ModelLoadError, StableDiffusion, StableDiffusionXL, checkpoint, file_hash, ldm_keys, model_io
from stable_diffusion.checkpoint import SingleFileSource
from stable_diffusion.clip import CLIPTextModel
from stable_diffusion.config import AutoencoderConfig, CLIPTextModelConfig, UNetConfig
from stable_diffusion.hub_configs import CONFIGS_DIR, FAMILY_FOLDERS
from stable_diffusion.unet import UNetModel
from stable_diffusion.vae import Autoencoder

SIZE = 32  # pixels; the tiny VAE downsamples 4x
PROMPT = "A photo of an astronaut riding a horse on Mars."
MODELS = {"unet": (UNetModel, UNetConfig), "vae": (Autoencoder, AutoencoderConfig)}


def text_encoders(family):
    return ("text_encoder", "text_encoder_2") if family == "sdxl" else ("text_encoder",)


def reference_components(folder, family):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel as HFCLIPTextModel
    from transformers import CLIPTextModelWithProjection

    models = {"unet": UNet2DConditionModel.from_pretrained(folder / "unet"), "vae": AutoencoderKL.from_pretrained(folder / "vae")}
    models["text_encoder"] = HFCLIPTextModel.from_pretrained(folder / "text_encoder")
    if family == "sdxl":
        models["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")
    return models


def write_ldm(folder, family, path, dtype=torch.float32, attention_as_conv=True):
    models = reference_components(folder, family)
    state = ldm_layout.pipeline_to_ldm(family, models["unet"], models["vae"], models["text_encoder"], models.get("text_encoder_2"))
    if not attention_as_conv:
        for key in [k for k in state if ".mid.attn_1." in k and state[k].ndim == 4]:
            state[key] = state[key][:, :, 0, 0]
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def ldm_files(request, tmp_path_factory):
    """family -> (tiny diffusers folder, the same model as one LDM-layout .safetensors file)."""
    files = {}

    def get(family):
        if family not in files:
            folder = request.getfixturevalue(f"tiny_{family}")
            path = tmp_path_factory.mktemp(f"ldm_{family}") / f"tiny_{family}.safetensors"
            files[family] = (folder, write_ldm(folder, family, path))
        return files[family]

    return get


def reference_pipeline(folder, path, family):
    import diffusers

    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    pipe = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def state_of(model) -> dict:
    """A torch module's parameters under the Hub checkpoints' names (transformers 5 drops CLIPTextModel's ``text_model.``)."""
    names = dict(model.named_parameters())
    if type(model).__name__ == "CLIPTextModel" and not any(k.startswith("text_model.") for k in names):
        return {"text_model." + k: v for k, v in names.items()}
    return names


def export_folder(src: SingleFileSource, out: Path) -> Path:
    """What the facade will do with a source, done by hand: a diffusers folder of our converted weights."""
    files = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors"}
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if not src.has(component):
            continue
        (out / component).mkdir(parents=True)
        weights, _ = src.weights(component)
        mx.save_safetensors(str(out / component / files.get(component, "model.safetensors")), weights)
        (out / component / "config.json").write_text(json.dumps(src.config(component)))
    for component in ("tokenizer", "tokenizer_2"):
        if src.has(component):
            shutil.copytree(src.configs.root / component, out / component)
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(src.config("scheduler")))
    (out / "model_index.json").write_text(json.dumps(src.model_index()))
    return out


# ---------------------------------------------------------------------------------------------
# Tiny models: ours vs diffusers' from_single_file on the same file


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_converted_tensors_equal_diffusers_from_single_file(ldm_files, family):
    folder, path = ldm_files(family)
    pipe = reference_pipeline(folder, path, family)
    original = reference_components(folder, family)
    src = SingleFileSource(path, configs=model_io.FolderSource(folder))
    assert src.family == family

    for component in ("unet", "vae") + text_encoders(family):
        ours, where = src.weights(component)
        assert where == str(path)
        theirs = state_of(getattr(pipe, component))
        assert sorted(ours) == sorted(theirs), component
        for key, value in theirs.items():
            np.testing.assert_array_equal(np.array(ours[key]), value.detach().numpy(), err_msg=key)
        # ... and diffusers' converter got back the weights we wrote: tests/ldm_layout.py is its inverse.
        for key, value in state_of(original[component]).items():
            assert torch.equal(theirs[key], value), key


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_components_load_strictly_into_our_models(ldm_files, family):
    folder, path = ldm_files(family)
    src = SingleFileSource(path, configs=model_io.FolderSource(folder))
    for component in ("unet", "vae") + text_encoders(family):
        model_cls, config_cls = MODELS.get(component, (CLIPTextModel, CLIPTextModelConfig))
        model = model_cls(config_cls.from_dict(src.config(component)))
        weights, where = src.weights(component)
        model_io.load_weights_strict(model, model.sanitize(weights), where)


@pytest.mark.parametrize("family, cfg", [("sd1", 7.5), ("sd2", 5.0), ("sdxl", 6.0)])
def test_single_file_pipeline_matches_diffusers_from_single_file(ldm_files, tmp_path, family, cfg):
    folder, path = ldm_files(family)
    steps, n = 3, 1
    init = torch.randn((n, 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(5))

    exported = export_folder(SingleFileSource(path, configs=model_io.FolderSource(folder)), tmp_path / "exported")
    cls = StableDiffusionXL if family == "sdxl" else StableDiffusion
    sd = cls(str(exported), sampler="euler")
    latents = list(sd.generate_latents(PROMPT, n_images=n, num_steps=steps, cfg_weight=cfg, latent_size=(SIZE // 4, SIZE // 4), latents=nhwc(init)))
    images = sd.decode(latents[-1])
    mx.eval(images)

    pipe = reference_pipeline(folder, path, family)
    common = dict(prompt=PROMPT, num_inference_steps=steps, guidance_scale=cfg, height=SIZE, width=SIZE, latents=init.clone())
    ref_latents = pipe(**common, output_type="latent").images
    ref_images = pipe(**common, output_type="np").images

    err_latents, err_images = relative_error(latents[-1], nhwc(ref_latents)), relative_error(images, ref_images)
    print(f"{family}: relative error latents {err_latents:.2e}, images {err_images:.2e}")
    assert err_latents <= 1e-4
    assert err_images <= 1e-4


@pytest.mark.parametrize("family, cfg", [("sd1", 7.5), ("sdxl", 6.0)])
def test_load_model_on_a_single_file_matches_diffusers_from_single_file(ldm_files, monkeypatch, family, cfg):
    """The facade itself, reading the file through SingleFileSource (given the tiny configs, as diffusers' config=)."""
    from stable_diffusion import load_model

    folder, path = ldm_files(family)
    steps, n = 3, 1
    init = torch.randn((n, 4, SIZE // 4, SIZE // 4), generator=torch.Generator().manual_seed(7))
    sd = load_model(str(path), sampler="euler", config_dir=folder)
    assert isinstance(sd.source, SingleFileSource)
    assert isinstance(sd, StableDiffusionXL if family == "sdxl" else StableDiffusion)
    latents = list(sd.generate_latents(PROMPT, n_images=n, num_steps=steps, cfg_weight=cfg, latent_size=(SIZE // 4, SIZE // 4), latents=nhwc(init)))
    images = sd.decode(latents[-1])
    mx.eval(images)

    pipe = reference_pipeline(folder, path, family)
    common = dict(prompt=PROMPT, num_inference_steps=steps, guidance_scale=cfg, height=SIZE, width=SIZE, latents=init.clone())
    ref_images = pipe(**common, output_type="np").images
    err = relative_error(images, ref_images)
    print(f"{family} via load_model: relative error images {err:.2e}")
    assert err <= 1e-4


def test_vae_attention_stored_as_linears_converts_the_same(tiny_sd1, tmp_path):
    conv = SingleFileSource(write_ldm(tiny_sd1, "sd1", tmp_path / "conv.safetensors"), configs=model_io.FolderSource(tiny_sd1))
    linear = SingleFileSource(write_ldm(tiny_sd1, "sd1", tmp_path / "linear.safetensors", attention_as_conv=False), configs=model_io.FolderSource(tiny_sd1))
    a, b = conv.weights("vae")[0], linear.weights("vae")[0]
    assert sorted(a) == sorted(b)
    assert a["encoder.mid_block.attentions.0.to_q.weight"].ndim == 2
    for key in a:
        np.testing.assert_array_equal(np.array(a[key]), np.array(b[key]))


def test_float16_checkpoint_stays_float16(tiny_sd2, tmp_path):
    src = SingleFileSource(write_ldm(tiny_sd2, "sd2", tmp_path / "fp16.safetensors", dtype=torch.float16), configs=model_io.FolderSource(tiny_sd2))
    for component in ("unet", "vae", "text_encoder"):
        weights, _ = src.weights(component)
        assert {v.dtype for v in weights.values()} == {mx.float16}, component


def test_a_component_asked_for_twice_is_read_again(ldm_files):
    folder, path = ldm_files("sd1")
    src = SingleFileSource(path, configs=model_io.FolderSource(folder))
    first, _ = src.weights("vae")
    mx.eval(first)
    again, _ = src.weights("vae")
    assert sorted(first) == sorted(again)
    np.testing.assert_array_equal(np.array(first["decoder.conv_out.weight"]), np.array(again["decoder.conv_out.weight"]))


# ---------------------------------------------------------------------------------------------
# Full-size key lists (no file written: meta tensors in, lazy never-evaluated arrays out)


def shipped_configs(family) -> dict:
    """component -> the shipped Hub config.json of the family's reference repo."""
    folder = CONFIGS_DIR / FAMILY_FOLDERS[family]
    return {p.parent.name: json.loads(p.read_bytes()) for p in folder.glob("*/config.json")}


def full_size_ldm(family):
    """The LDM key list (names -> meta tensors) of a real checkpoint of ``family``, and its diffusers models."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModel as HFCLIPTextModel
    from transformers import CLIPTextModelWithProjection

    configs = shipped_configs(family)
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel.from_config(configs["unet"]), "vae": AutoencoderKL.from_config(configs["vae"])}
        models["text_encoder"] = HFCLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        if family == "sdxl":
            models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    state = ldm_layout.pipeline_to_ldm(family, models["unet"], models["vae"], models["text_encoder"], models.get("text_encoder_2"))
    return state, models


# Names every real checkpoint of the family holds (diffusers' CHECKPOINT_KEY_NAMES and friends).
KNOWN_REAL_KEYS = {
    "sd1": {
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    },
    "sd2": {
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
        "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.text_projection": (1024, 1024),
    },
    "sdxl": {
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
    },
}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_key_list_converts_strictly_into_our_models(family):
    from diffusers.loaders import single_file_utils as sfu

    state, models = full_size_ldm(family)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for key, shape in KNOWN_REAL_KEYS[family].items():
        assert shapes.get(key) == shape, key
    assert checkpoint.detect_family(shapes) == family

    # Our LDM key list is what diffusers' own converters read back into the diffusers models.
    configs = shipped_configs(family)
    theirs = {
        "unet": sfu.convert_ldm_unet_checkpoint(state, configs["unet"]),
        "vae": sfu.convert_ldm_vae_checkpoint(state, configs["vae"]),
    }
    if family == "sd1":
        theirs["text_encoder"] = sfu.convert_ldm_clip_checkpoint(state)
    elif family == "sd2":
        theirs["text_encoder"] = sfu.convert_open_clip_checkpoint(models["text_encoder"], state, "cond_stage_model.model.")
    else:
        theirs["text_encoder"] = sfu.convert_ldm_clip_checkpoint(state)
        theirs["text_encoder_2"] = sfu.convert_open_clip_checkpoint(models["text_encoder_2"], state, "conditioner.embedders.1.model.")
    for component, converted in theirs.items():
        expected = {k: tuple(v.shape) for k, v in state_of(models[component]).items()}
        got = {k: tuple(v.shape) for k, v in converted.items() if not k.endswith("position_ids")}
        if component.startswith("text_encoder"):
            got = {k: s for k, s in got.items() if k in expected or not k.startswith("text_model.encoder.layers.23")}
        assert got == expected, component

    # Ours: the same names and shapes, and strict loading into our models (nothing is evaluated).
    arrays = {k: mx.zeros(s, dtype=mx.float16) for k, s in shapes.items()}
    converted = ldm_keys.convert(arrays, family, configs)
    assert sorted(converted) == sorted(theirs)
    for component, weights in converted.items():
        assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in state_of(models[component]).items()}
        model_cls, config_cls = MODELS.get(component, (CLIPTextModel, CLIPTextModelConfig))
        model = model_cls(config_cls.from_dict(configs[component]))
        model_io.load_weights_strict(model, model.sanitize(weights), f"{family} {component}")


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_inpainting_unet_key_list_converts_strictly_into_our_unet(family):
    """The 9-channel UNet of each family's inpainting model, as its configs are derived here."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    config = checkpoint.InpaintingConfigs(family).config("unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    lpb = config["layers_per_block"]
    state = ldm_layout.unet_to_ldm(unet.state_dict(), lpb[0] if isinstance(lpb, list) else lpb)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["model.diffusion_model.input_blocks.0.0.weight"] == (320, 9, 3, 3)
    assert checkpoint.is_inpainting(shapes)
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in sfu.convert_ldm_unet_checkpoint(state, config).items()} == expected

    arrays = {k[len(ldm_keys.UNET_PREFIX) :]: mx.zeros(s, dtype=mx.float16) for k, s in shapes.items()}
    weights, unknown = ldm_keys.convert_unet(arrays, config)
    assert not unknown and {k: tuple(v.shape) for k, v in weights.items()} == expected
    model = UNetModel(UNetConfig.from_dict(config))
    model_io.load_weights_strict(model, model.sanitize(weights), f"{family} inpainting unet")


# ---------------------------------------------------------------------------------------------
# Families, configs and refusals, on small files holding only the telling keys


def small_file(path, shapes: dict) -> Path:
    save_numpy({k: np.zeros(s, dtype=np.float16) for k, s in shapes.items()}, str(path))
    return path


@pytest.mark.parametrize(
    "family, shapes",
    [
        ("sd1", {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (4, 768)}),
        ("sd2", {"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (4, 1024)}),
        ("sdxl", {"model.diffusion_model.time_embed.0.weight": (4, 4), "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (4,)}),
    ],
)
def test_family_and_shipped_configs_follow_the_keys(tmp_path, family, shapes):
    src = SingleFileSource(small_file(tmp_path / "m.safetensors", shapes))
    assert src.family == family
    index = src.model_index()
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline")
    assert index.get("force_zeros_for_empty_prompt", False) == (family == "sdxl")
    assert src.has("tokenizer_2") == (family == "sdxl")
    assert src.has("scheduler") and src.has("tokenizer")
    # diffusers reads a single file as its family's reference repo: SD 2.x as the 768 px v-prediction 2.1.
    repo = {"sd1": "stable-diffusion-v1-5", "sd2": "stable-diffusion-2-1", "sdxl": "stable-diffusion-xl-base-1.0"}[family]
    assert index == json.loads((CONFIGS_DIR / repo / "model_index.json").read_bytes())
    for component in ("unet", "vae") + text_encoders(family) + ("scheduler",):
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        assert src.config(component) == json.loads((CONFIGS_DIR / repo / component / name).read_bytes()), component


def test_shipped_configs_are_the_hub_files_byte_for_byte():
    """Every shipped file has the git blob id SOURCES.json records for its Hub repo at the named revision."""
    sources = json.loads((CONFIGS_DIR / "SOURCES.json").read_bytes())["repos"]
    shipped = {p.relative_to(CONFIGS_DIR).as_posix() for p in CONFIGS_DIR.rglob("*.json")} - {"SOURCES.json"}
    assert shipped == {f"{folder}/{name}" for folder, entry in sources.items() for name in entry["files"]}
    for folder, entry in sources.items():
        assert len(entry["revision"]) == 40 and entry["repo"].count("/") == 1, folder
        for name, blob in entry["files"].items():
            data = (CONFIGS_DIR / folder / name).read_bytes()
            assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == blob, f"{folder}/{name}"


def test_sd2_defaults_to_v_prediction_as_diffusers_and_prediction_type_overrides(tmp_path):
    path = small_file(tmp_path / "v2.safetensors", {"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (4, 1024)})
    assert SingleFileSource(path).config("scheduler")["prediction_type"] == "v_prediction"
    assert SingleFileSource(path, prediction_type="epsilon").config("scheduler")["prediction_type"] == "epsilon"
    with pytest.raises(ModelLoadError, match="prediction_type"):
        SingleFileSource(path, prediction_type="flow")


def test_the_known_sdxl_turbo_file_gets_sdxl_turbos_scheduler_and_size_and_its_name_alone_does_not(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    xl = {"model.diffusion_model.time_embed.0.weight": (4, 4), "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (4,)}
    named = SingleFileSource(small_file(tmp_path / "my_turbo_merge.safetensors", xl))
    assert not named.is_sdxl_turbo and named.config("scheduler")["timestep_spacing"] == "leading"
    path = small_file(tmp_path / "renamed.safetensors", xl)
    # Stand-in for the real file's (size, A1111 hash), which only a 6.9 GB download could give.
    monkeypatch.setattr(checkpoint, "SDXL_TURBO_FILES", {path.stat().st_size: checkpoint.model_hash(path)})
    src = SingleFileSource(path)
    assert src.is_sdxl_turbo
    turbo = CONFIGS_DIR / "sdxl-turbo"
    assert src.config("scheduler") == json.loads((turbo / "scheduler" / "scheduler_config.json").read_bytes())
    assert src.config("scheduler")["timestep_spacing"] == "trailing"
    assert src.config("unet") == json.loads((turbo / "unet" / "config.json").read_bytes())
    assert src.config("unet")["sample_size"] == 64


def test_comfyui_v_pred_and_ztsnr_markers_set_the_scheduler(tmp_path):
    xl = {"model.diffusion_model.time_embed.0.weight": (4, 4), "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (4,)}
    path = small_file(tmp_path / "vpred.safetensors", {**xl, "v_pred": (0,), "ztsnr": (0,)})
    scheduler = SingleFileSource(path).config("scheduler")
    assert scheduler["prediction_type"] == "v_prediction"
    assert scheduler["rescale_betas_zero_snr"] is True
    assert SingleFileSource(path, prediction_type="epsilon").config("scheduler")["prediction_type"] == "epsilon"
    plain = SingleFileSource(small_file(tmp_path / "plain.safetensors", xl)).config("scheduler")
    assert plain["prediction_type"] == "epsilon" and "rescale_betas_zero_snr" not in plain


@pytest.mark.parametrize(
    "shapes, message",
    [
        ({"model.diffusion_model.input_blocks.0.0.weight": (8, 8, 3, 3)}, "InstructPix2Pix UNet"),
        ({"model.diffusion_model.time_embed.0.weight": (4, 4), "conditioner.embedders.0.model.text_projection": (4, 4)}, "SDXL refiner"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 4)}, "LoRA file"),
        ({"down_blocks.0.resnets.0.conv1.weight": (4, 4, 3, 3)}, "diffusers layout"),
        ({"model.diffusion_model.time_embed.0.weight": (4, 4), "model.diffusion_model.not_a_layer.weight": (4,)}, "model.diffusion_model.not_a_layer.weight"),
        ({"model.diffusion_model.time_embed.0.weight": (4, 4), "something_else": (4,)}, "something_else"),
    ],
)
def test_what_we_cannot_load_is_refused_with_a_clear_line(tmp_path, shapes, message):
    with pytest.raises(ModelLoadError, match=message) as e:
        SingleFileSource(small_file(tmp_path / "m.safetensors", shapes))
    assert "\n" not in str(e.value)


def test_unknown_key_in_a_real_layout_is_named(ldm_files, tmp_path):
    folder, path = ldm_files("sd1")
    from safetensors.torch import load_file

    state = load_file(str(path))
    state["cond_stage_model.transformer.text_model.extra.weight"] = torch.zeros(2)
    state["first_stage_model.decoder.mid.attn_2.q.weight"] = torch.zeros(2)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(ModelLoadError, match="first_stage_model.decoder.mid.attn_2.q.weight"):
        SingleFileSource(bad, configs=model_io.FolderSource(folder))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickled_checkpoints_are_refused_without_unpickling(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(ModelLoadError, match="never loads"):
        SingleFileSource(path)
    assert not checkpoint.is_single_file(str(path))


def test_is_single_file(tmp_path):
    path = small_file(tmp_path / "m.safetensors", {"model.diffusion_model.time_embed.0.weight": (4, 4)})
    assert checkpoint.is_single_file(str(path))
    assert not checkpoint.is_single_file(str(tmp_path / "missing.safetensors"))
    assert not checkpoint.is_single_file(str(tmp_path))
    assert not checkpoint.is_single_file("stabilityai/sdxl-turbo")


# ---------------------------------------------------------------------------------------------
# Tokenizers from the reference repo's HF cache; the model hash


def fake_hf_cache(hf_home: Path, repo: str, subfolder: str, tokenizer_dir: Path):
    """The HF cache layout hf_hub_download(local_files_only=True) reads."""
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(tokenizer_dir, root / "snapshots" / commit / subfolder)


def run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def test_tokenizer_comes_from_the_reference_repo_cache_offline(tiny_sdxl, tmp_path):
    fake_hf_cache(tmp_path / "hf", "stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2", tiny_sdxl / "tokenizer_2")
    path = small_file(tmp_path / "xl.safetensors", {"model.diffusion_model.time_embed.0.weight": (4, 4), "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (4,)})
    code = (
        "from stable_diffusion.checkpoint import SingleFileSource\n"
        f"t = SingleFileSource({str(path)!r}).tokenizer('tokenizer_2')\n"
        "print(t.pad, t.pad_and_truncate(t.tokenize('a photo'))[0][:5])"
    )
    result = run_python(code, {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr

    from stable_diffusion.tokenizer import Tokenizer

    expected = Tokenizer.from_folder(tiny_sdxl / "tokenizer_2")
    assert result.stdout.split()[0] == str(expected.pad)
    assert str(expected.pad_and_truncate(expected.tokenize("a photo"))[0][:5]).replace(" ", "") in result.stdout.replace(" ", "")


def test_offline_without_the_tokenizer_says_which_repo_to_fetch(tmp_path):
    path = small_file(tmp_path / "v1.safetensors", {"model.diffusion_model.time_embed.0.weight": (4, 4)})
    code = f"from stable_diffusion.checkpoint import SingleFileSource\nSingleFileSource({str(path)!r}).tokenizer('tokenizer')"
    result = run_python(code, {"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "ModelLoadError" in last
    assert "huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --include 'tokenizer/*'" in last


def test_tokenizer_dirs_override(tiny_sd2, tmp_path):
    path = small_file(tmp_path / "v2.safetensors", {"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (4, 1024)})
    tokenizer = SingleFileSource(path, tokenizer_dirs={"tokenizer": tiny_sd2 / "tokenizer"}).tokenizer("tokenizer")
    assert tokenizer.pad == 0  # SD 2 pads with "!"


def test_model_hash_is_a1111s_cached_outside_the_models_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    models = tmp_path / "models"
    models.mkdir()
    path = small_file(models / "m.safetensors", {"model.diffusion_model.time_embed.0.weight": (64, 64)})
    expected = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert file_hash.model_hash(path) == expected
    assert sorted(p.name for p in models.iterdir()) == ["m.safetensors"]

    cache_file = tmp_path / "cache" / "stable_diffusion_mlx" / "sha256.json"
    cache = json.loads(cache_file.read_text())
    (key,) = cache
    cache[key] = "f" * 64  # a cached value is used without reading the file
    cache_file.write_text(json.dumps(cache))
    assert file_hash.model_hash(path) == "f" * 10

    os.utime(path, ns=(1, 1))  # a changed file (mtime) is hashed again
    assert file_hash.model_hash(path) == expected


# ---------------------------------------------------------------------------------------------
# Hostile inputs: the hash cache, a config_dir, a file's suffix and header

# What a cache file or a config.json can hold instead of a JSON object.
JUNK = {
    "list": b'["a", "b"]',
    "null": b"null",
    "binary": bytes(range(256)) * 4,
    "truncated": b'{"a": "',
    "nested": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("junk", list(JUNK) + ["not_digests", "fifo"])
def test_a_malformed_hash_cache_counts_as_empty_and_is_replaced(tmp_path, monkeypatch, junk):
    import threading

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = small_file(tmp_path / "m.safetensors", {"model.diffusion_model.time_embed.0.weight": (8, 8)})
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    cache_file = tmp_path / "cache" / "stable_diffusion_mlx" / "sha256.json"
    cache_file.parent.mkdir(parents=True)
    if junk == "fifo":
        os.mkfifo(cache_file)  # reading it would block forever
    elif junk == "not_digests":
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"  # this very file's entry, holding junk
        cache_file.write_text(json.dumps({key: "0123", "other": 5}))
    else:
        cache_file.write_bytes(JUNK[junk])

    result = []
    worker = threading.Thread(target=lambda: result.append(file_hash.model_hash(path)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert result == [expected[:10]]
    if junk != "fifo":  # the cache is written anew, whole: only well-formed entries
        assert list(json.loads(cache_file.read_text()).values()) == [expected]
        assert sorted(p.name for p in cache_file.parent.iterdir()) == ["sha256.json"]


@pytest.fixture()
def config_dir(tiny_sd1, tmp_path):
    return shutil.copytree(tiny_sd1, tmp_path / "configs", ignore=shutil.ignore_patterns("*.safetensors"))


SD1_KEYS = {"model.diffusion_model.time_embed.0.weight": (4, 4)}


@pytest.mark.parametrize("junk", list(JUNK) + ["directory"])
@pytest.mark.parametrize("name", ["model_index.json", "unet/config.json", "vae/config.json"])
def test_a_config_dir_with_junk_json_is_one_error_naming_the_file(config_dir, tmp_path, name, junk):
    target = config_dir / name
    if junk == "directory":
        target.unlink()
        target.mkdir()
    else:
        target.write_bytes(JUNK[junk])
    path = small_file(tmp_path / "m.safetensors", SD1_KEYS)
    with pytest.raises(ModelLoadError) as e:
        model_io.open_model(str(path), config_dir=config_dir)
    assert str(e.value).startswith(f"{target}: ") and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("unet/config.json", {"layers_per_block": "2"}, "layers_per_block must be a whole number >= 1, got '2'"),
        ("unet/config.json", {"layers_per_block": [[1], [2]]}, "per-block layers_per_block"),
        ("vae/config.json", {"block_out_channels": None}, "block_out_channels must be a non-empty list, got None"),
        ("text_encoder/config.json", {"num_hidden_layers": 0}, "num_hidden_layers must be a whole number >= 1, got 0"),
    ],
)
def test_config_values_the_key_names_need_are_checked_naming_the_file(tiny_sd2, tmp_path, name, change, message):
    folder = shutil.copytree(tiny_sd2, tmp_path / "configs", ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / name).write_text(json.dumps({**json.loads((folder / name).read_text()), **change}))
    # A UNet, a VAE and SD 2's OpenCLIP text encoder: each conversion reads its config.
    keys = {**SD1_KEYS, "first_stage_model.decoder.conv_in.bias": (4,), "cond_stage_model.model.transformer.resblocks.0.ln_1.weight": (4,)}
    with pytest.raises(ModelLoadError, match=re.escape(f"{folder / name}: {message}")):
        model_io.open_model(str(small_file(tmp_path / "m.safetensors", keys)), config_dir=folder)


def test_a_config_dir_without_model_index_is_refused(tmp_path):
    path = small_file(tmp_path / "m.safetensors", SD1_KEYS)
    with pytest.raises(ModelLoadError, match="not a diffusers model folder"):
        model_io.open_model(str(path), config_dir=tmp_path / "nowhere")


def test_an_upper_case_suffix_is_a_safetensors_file_and_a_pickle_is_refused_in_any_case(tmp_path):
    path = small_file(tmp_path / "M.SAFETENSORS", SD1_KEYS)
    assert checkpoint.is_single_file(str(path))
    src = model_io.open_model(str(path))
    assert isinstance(src, SingleFileSource) and src.family == "sd1"
    pickle = tmp_path / "M.CKPT"
    pickle.write_bytes(b"\x80\x04not read")
    with pytest.raises(ModelLoadError, match="pickles, which this library never loads"):
        model_io.open_model(str(pickle))


def test_a_single_file_the_safetensors_library_refuses_is_refused(tmp_path):
    """A header-length field one byte short: the header still parses (its padding space is cut) and
    mx.load alone would read every tensor one byte off; the safetensors library refuses the file."""
    import safetensors

    path = small_file(tmp_path / "m.safetensors", {**SD1_KEYS, "model.diffusion_model.out.0.weight": (3,)})
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert data[8 + n - 1 : 8 + n] == b" "
    path.write_bytes(struct.pack("<Q", n - 1) + data[8:])
    with pytest.raises(safetensors.SafetensorError):
        safetensors.safe_open(str(path), "numpy")
    with pytest.raises(ModelLoadError, match="not a valid safetensors file") as e:
        SingleFileSource(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)

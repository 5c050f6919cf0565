"""Community models in the scripts: --lora and single-file --model, as the library loads them (held to diffusers in
test_lora.py and test_checkpoint.py), and A1111's infotext for both."""

import hashlib
import struct

import mlx.core as mx
import numpy as np

import lora_files
from stable_diffusion import images, load_model
from test_checkpoint import write_ldm
from test_cli import ok, params, pixels, run
from test_lora import reference_pipe, torch_models


def a1111_short_hash(path) -> str:
    """A1111's LoRA hash (modules/hashes.py addnet_hash_safetensors): sha256 of what follows the header, 12 hex."""
    data = path.read_bytes()
    (header_size,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + header_size :]).hexdigest()[:12]


def test_txt2image_lora_flag_merges_at_its_scale_and_records_it_as_a1111_does(tiny_sd1, tmp_path):
    lora = lora_files.random_lora(torch_models(reference_pipe(tiny_sd1, xl=False)), seed=5)
    path = lora_files.write_kohya(tmp_path / "ink_style.safetensors", lora)
    out = tmp_path / "out.png"
    common = ["--steps", 2, "--seed", 3, "--width", 32, "--height", 32, "--no-float16", "--sampler", "euler", "--cfg", 4]
    ok(run("txt2image.py", "a cat", "--model", tiny_sd1, "--lora", f"{path}:0.7", *common, "-o", out))

    sd = load_model(str(tiny_sd1), sampler="euler")
    sd.load_lora(path, 0.7)
    *_, x = sd.generate_latents("a cat", num_steps=2, cfg_weight=4, latent_size=(8, 8), seed=3)
    expected = images.to_uint8(sd.decode(x))[0]
    plain = images.to_uint8(sd.decode(list(load_model(str(tiny_sd1), sampler="euler").generate_latents("a cat", num_steps=2, cfg_weight=4, latent_size=(8, 8), seed=3))[-1]))[0]
    mx.eval(expected)
    assert np.array_equal(pixels(out), expected)
    assert not np.array_equal(expected, plain)  # the LoRA changed the picture

    p = params(out)
    assert p["Prompt"] == "a cat <lora:ink_style:0.7>"
    assert p["Lora hashes"] == f"ink_style: {a1111_short_hash(path)}"


def test_a_missing_lora_file_is_one_line_before_any_model_loads(tiny_sd1, tmp_path):
    result = run("txt2image.py", "a cat", "--model", tiny_sd1, "--lora", tmp_path / "none.safetensors:0.5", "-o", tmp_path / "o.png")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--lora" in result.stderr and "none.safetensors" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_lora_scale_that_is_not_a_number_is_named_as_such(tiny_sd1, tmp_path):
    lora = lora_files.random_lora(torch_models(reference_pipe(tiny_sd1, xl=False)), seed=5)
    path = lora_files.write_kohya(tmp_path / "style.safetensors", lora)
    result = run("txt2image.py", "a cat", "--model", tiny_sd1, "--lora", f"{path}:abc", "-o", tmp_path / "o.png")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "the scale 'abc' is not a number" in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["style.safetensors"]


def test_txt2image_on_a_single_file_checkpoint_makes_what_load_model_makes_and_records_its_a1111_hash(tiny_sd1, tmp_path):
    path = write_ldm(tiny_sd1, "sd1", tmp_path / "my_finetune.safetensors")
    out = tmp_path / "out.png"
    common = ["--steps", 2, "--seed", 4, "--width", 32, "--height", 32, "--no-float16", "--sampler", "euler", "--cfg", 3]
    ok(run("txt2image.py", "a boat", "--model", path, "--config", tiny_sd1, *common, "-o", out, env={"XDG_CACHE_HOME": str(tmp_path / "cache")}))

    sd = load_model(str(path), sampler="euler", config_dir=str(tiny_sd1))
    *_, x = sd.generate_latents("a boat", num_steps=2, cfg_weight=3, latent_size=(8, 8), seed=4)
    assert np.array_equal(pixels(out), images.to_uint8(sd.decode(x))[0])
    p = params(out)
    assert p["Model"] == "my_finetune"
    assert p["Model hash"] == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert not (tmp_path / "my_finetune.safetensors.sha256").exists() and sorted(q.name for q in tmp_path.iterdir()) == ["cache", "my_finetune.safetensors", "out.png"]


def test_a_pickled_checkpoint_is_refused_without_being_opened(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not even read")
    result = run("txt2image.py", "a boat", "--model", ckpt, "-o", tmp_path / "o.png")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "never opened" in result.stderr or "never loads" in result.stderr

"""--lora in the scripts: the LoRA the library merges (held to diffusers in test_lora.py), and A1111's infotext."""

import hashlib
import struct

import mlx.core as mx
import numpy as np

import lora_files
from stable_diffusion import images, load_model
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

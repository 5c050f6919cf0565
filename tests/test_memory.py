"""The memory check (stable_diffusion/memory.py): what it counts is held to what MLX allocates and
to diffusers' parameter counts, and the scripts refuse, in one line, the runs that do not fit under
a memory limit the test itself sets (RLIMIT_AS) instead of crashing (MLX segfaults on a failed
allocation), while a normal run still runs under that same limit.
"""

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from PIL import Image

from stable_diffusion import load_model, memory
from stable_diffusion import unet as unet_module
from stable_diffusion.config import AutoencoderConfig, CLIPTextModelConfig, UNetConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "stable_diffusion" / "configs"
T2I, I2I = "txt2image.py", "image2image.py"
LIMIT = 2**30  # the address space the CLI tests allow: a tiny-model run needs about 0.2 GB of it


def config(repo: str, component: str) -> dict:
    return json.loads((CONFIGS / repo / component / "config.json").read_text())


# ---------------------------------------------------------------------------------------------
# What is counted


@pytest.mark.parametrize("repo", ["stable-diffusion-v1-5", "stable-diffusion-xl-base-1.0"])
def test_weights_are_counted_as_diffusers_and_transformers_count_them(repo):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    encoders = [name for name in ("text_encoder", "text_encoder_2") if (CONFIGS / repo / name).is_dir()]
    with torch.device("meta"):  # shapes only: nothing is allocated
        expected = UNet2DConditionModel.from_config(config(repo, "unet")).num_parameters() * 2
        expected += AutoencoderKL.from_config(config(repo, "vae")).num_parameters() * 4
        for name in encoders:
            text_config = CLIPTextConfig.from_dict(config(repo, name))
            cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in text_config.architectures else CLIPTextModel
            expected += cls(text_config).num_parameters() * 2
    model = memory.Model(
        UNetConfig.from_dict(config(repo, "unet")),
        AutoencoderConfig.from_dict(config(repo, "vae")),
        tuple(CLIPTextModelConfig.from_dict(config(repo, name)) for name in encoders),
        itemsize=2,
        vae_itemsize=4,
    )
    assert memory.weights_bytes(model) == expected


def run_and_measure(folder: Path, width: int, height: int, n_images: int):
    """(estimate parts, the model's bytes, peak bytes of one denoising step, of decoding) of a float16 guided run."""
    sd = load_model(str(folder), float16=True)
    loaded = sum(v.nbytes for m in sd._models() for _, v in tree_flatten(m.parameters()))  # before the first step fuses
    sd.ensure_models_are_loaded()
    f = sd.latent_factor
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    *_, x = sd.generate_latents("a cat", n_images=n_images, num_steps=1, cfg_weight=7.5, latent_size=(height // f, width // f), seed=1)
    mx.eval(x)
    denoising = mx.get_peak_memory() - base
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(sd.decode(x, batch_size=1))
    decoding = mx.get_peak_memory() - base
    model = memory.Model(sd.unet.config, sd.autoencoder.config, tuple(e.config for e in sd._text_encoders()), 2, sd.vae_dtype.size)
    return memory.estimate(model, width, height, n_images, guided=True), loaded, denoising, decoding


@pytest.mark.parametrize("flavour", ["tiny_sd1", "tiny_sd2"])
def test_the_estimate_is_a_lower_bound_of_what_mlx_allocates_and_counts_the_attention_scores(flavour, request):
    folder = request.getfixturevalue(flavour)
    width = height = 256  # latents 64x64: 4096 queries against 4096 keys at the first level
    parts, loaded, denoising, decoding = run_and_measure(folder, width, height, n_images=2)
    assert parts["weights"] == loaded
    assert parts["denoising"] <= denoising
    assert parts["VAE"] <= decoding
    # The first level's self-attention scores, from the config alone: 2 images x 2 (guidance) rows,
    # its heads, 4096 x 4096, in float16, or float32 where upcast_attention computes them so.
    unet = json.loads((folder / "unet" / "config.json").read_text())
    heads = unet["attention_head_dim"] if isinstance(unet["attention_head_dim"], int) else unet["attention_head_dim"][0]
    scores = 4 * heads * 4096 * 4096 * (4 if unet.get("upcast_attention") else 2)
    assert scores <= unet_module.ATTENTION_SCORES_LIMIT  # not sliced: materialised whole
    assert scores <= parts["denoising"]


def test_the_limit_is_the_smallest_of_ram_and_the_address_space_limit():
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    code = (
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (2**31, 2**31));"
        "from stable_diffusion import memory; print(*memory.memory_limit(), sep='|')"
    )
    limited = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    have, what = limited.stdout.strip().split("|")
    assert 0 < int(have) < 2**31 and "ulimit -v" in what, limited.stderr
    assert memory.available_memory() <= ram


# ---------------------------------------------------------------------------------------------
# The scripts under a memory limit


def run_limited(script, *args, limit=LIMIT, cwd=None):
    def limit_address_space():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=cwd or ROOT,
        timeout=600,
        preexec_fn=limit_address_space,
    )


def assert_refused(result, prog):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert re.match(rf"{prog}: error: .* need at least [0-9.]+ [KMGTP]?B of memory \(weights .*, denoising .*, VAE .*, pictures .*\) but the address-space limit \(ulimit -v\) leaves", lines[0]), lines[0]


@pytest.mark.parametrize(
    "args",
    [
        ["--width", 1024, "--height", 1024],  # issue 23: a segfault without any limit before
        ["--width", 65536],
        ["--seeds", "1-20000", "--batch_size", 20000],  # --seeds jobs counted a batch of 1 before
        ["--n_images", 100000],  # its grid alone, 100000 x 64 x 64 x 3 bytes, is over the limit
    ],
    ids=["1024^2", "65536_wide", "20000_at_once", "100000_images"],
)
def test_a_run_that_cannot_fit_is_refused_with_the_estimate_before_any_weight(tiny_sd1, tmp_path, args):
    result = run_limited(T2I, "p", "--model", tiny_sd1, *args, "-o", tmp_path / "out.png")
    assert_refused(result, T2I)
    assert list(tmp_path.iterdir()) == []


def test_a_huge_input_image_is_refused_with_the_estimate(tiny_sd1, tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (8000, 8000), (40, 80, 120)).save(big)
    result = run_limited(I2I, big, "p", "--model", tiny_sd1, "-o", tmp_path / "out.png")
    assert_refused(result, I2I)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.png"]


def test_a_normal_run_runs_under_the_same_limit(tiny_sd1, tmp_path):
    result = run_limited(T2I, "p", "--model", tiny_sd1, "--steps", 2, "--seed", 1, "--n_images", 2, "-o", tmp_path / "out.png")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out.png").is_file()


# ---------------------------------------------------------------------------------------------
# Bounded batches


def test_many_images_run_in_batches_of_8_each_image_as_the_library_makes_it_alone(tiny_sd1, tmp_path):
    from stable_diffusion import images

    out = tmp_path / "grid.png"
    common = ["p", "--model", tiny_sd1, "--steps", 2, "--seed", 3, "--width", 32, "--height", 32, "--no-float16", "--sampler", "euler_a"]
    result = subprocess.run(
        [sys.executable, str(ROOT / T2I), *map(str, [*common, "--n_images", 10, "--n_rows", 2, "-o", out])],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "images 1-8" in result.stderr and "images 9-10" in result.stderr  # two batches: 8, then 2
    grid = np.asarray(Image.open(out).convert("RGB"))
    sd = load_model(str(tiny_sd1), sampler="euler_a")
    for i in (0, 9):  # the first image of the first batch and the last of the second
        *_, x = sd.generate_latents("p", num_steps=2, latent_size=(8, 8), seed=3 + i)
        alone = images.to_uint8(sd.decode(x))[0]
        r, c = divmod(i, 5)
        tile = grid[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32]
        assert np.array_equal(tile, alone)

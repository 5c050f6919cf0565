"""Hostile input to the library (issue 23): each bad argument is one ValueError line at the call.

A server hands the facade whatever the network sends, so every argument is checked before any
compute: a bad model name, latents that are not finite floats of the right shape, a guidance
weight that overflows, sizes no machine holds. LoRAs merged before ``quantize()`` cannot be
removed from the quantized weights, and ``unload_loras`` says so instead of reporting success.
"""

import math
import time
import warnings

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import save_file

from stable_diffusion import ModelLoadError, StableDiffusion, load_model, memory
from stable_diffusion.pipeline import MAX_CFG_WEIGHT
from stable_diffusion.tokenizer import MAX_TEXT_CHARS

# One kohya LoRA pair on a 32-wide projection of the tiny SD 1 UNet (32 divides the quantization group).
LORA_MODULE = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def sd1(tiny_sd1):
    return StableDiffusion(str(tiny_sd1))


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    name = "lora_unet_" + LORA_MODULE.replace(".", "_")
    tensors = {
        f"{name}.lora_down.weight": rng.standard_normal((4, 32)).astype(np.float32),
        f"{name}.lora_up.weight": rng.standard_normal((32, 4)).astype(np.float32),
        f"{name}.alpha": np.array(4.0, dtype=np.float32),
    }
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_file(tensors, str(path))
    return path


def one_line_value_error(call, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        call()
    assert "\n" not in str(info.value)
    return info.value


def to_q(sd) -> np.ndarray:
    return np.array(dict(tree_flatten(sd.unet.parameters()))[LORA_MODULE + ".weight"])


# ---------------------------------------------------------------------------------------------
# LoRAs and quantize()


def test_unload_loras_after_quantize_refuses_instead_of_reporting_success(tiny_sd1, lora_file):
    sd = StableDiffusion(str(tiny_sd1))
    original = to_q(sd)
    sd.load_lora(lora_file, 1.0)
    assert not np.array_equal(to_q(sd), original)  # merged
    sd.quantize(group_size=32)
    one_line_value_error(sd.unload_loras, r"style\.safetensors were merged before quantize\(\) and cannot be removed")
    assert sd.loras == [(str(lora_file), 1.0)]  # still listed: still merged


def test_load_lora_after_quantize_is_refused(tiny_sd1, lora_file):
    sd = StableDiffusion(str(tiny_sd1))
    sd.quantize(group_size=32)
    one_line_value_error(lambda: sd.load_lora(lora_file), r"load LoRAs before quantize\(\)")
    sd.unload_loras()  # nothing was merged: nothing to refuse
    assert sd.loras == []


# ---------------------------------------------------------------------------------------------
# Bad arguments: one ValueError line when the call is made, before any step


@pytest.mark.parametrize("model", [None, 5, "", "  ", b"a/b"], ids=["None", "int", "empty", "blank", "bytes"])
def test_a_model_that_is_not_a_name_or_path_is_refused(model):
    for load in (load_model, StableDiffusion):
        one_line_value_error(lambda: load(model), r"model must be a preset name, a Hub repo id \(owner/name\), a diffusers folder or a \.safetensors file, got")


@pytest.mark.parametrize("name", ["a/b c", "a/-b", "a/b..c", "a/" + "b" * 100])
def test_a_malformed_repo_id_is_one_model_load_error(name, monkeypatch):
    # Offline or not, the name is refused before the Hub or the cache is asked.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"no such folder, and not a valid Hugging Face repo id \(") as info:
        load_model(name)
    assert "\n" not in str(info.value)


LATENT_SHAPE = (1, 4, 3, 4)


@pytest.mark.parametrize(
    "latents, message",
    [
        (np.zeros(LATENT_SHAPE, np.int32), r"latents has dtype int32; expected floats"),
        (np.zeros(LATENT_SHAPE, np.bool_), r"latents has dtype bool; expected floats"),
        (np.zeros(LATENT_SHAPE, np.complex64), r"latents has dtype complex64; expected floats"),
        (np.full(LATENT_SHAPE, np.nan, np.float32), r"latents holds NaN or infinite values"),
        (np.full(LATENT_SHAPE, -np.inf, np.float32), r"latents holds NaN or infinite values"),
        (np.full(LATENT_SHAPE, 1e300), r"latents holds NaN or infinite values"),  # float64 that float32 cannot hold
        (np.zeros((1, 0, 0, 4), np.float32), r"latents has shape \(1, 0, 0, 4\); expected \(1, h, w, 4\), h and w >= 1"),
        (np.zeros((0, 4, 3, 4), np.float32), r"latents has shape \(0, 4, 3, 4\); expected \(1, h, w, 4\)"),
        (np.zeros((0,), np.float32), r"latents has shape \(0,\); expected"),
        ("noise", r"latents must be an array \(mx.array or numpy\), got str"),
        ([[1.0], [1.0, 2.0]], r"latents must be an array \(mx.array or numpy\), got list"),
    ],
    ids=["int", "bool", "complex", "nan", "inf", "float64_overflow", "empty_hw", "empty_batch", "empty_1d", "str", "ragged"],
)
def test_bad_latents_are_refused_at_the_call(sd1, latents, message):
    one_line_value_error(lambda: sd1.generate_latents("p", num_steps=1, latents=latents), message)


def test_bad_img2img_noise_is_refused_at_the_call(sd1):
    image = np.zeros((16, 12, 3), np.float32)
    call = lambda noise: sd1.generate_latents_from_image(image, "p", num_steps=2, strength=1.0, noise=noise)  # noqa: E731
    one_line_value_error(lambda: call(np.zeros((1, 4, 3, 4), np.int64)), r"noise has dtype int64; expected floats")
    one_line_value_error(lambda: call(np.full((1, 4, 3, 4), np.nan, np.float32)), r"noise holds NaN")
    one_line_value_error(lambda: call(np.zeros((1, 3, 4, 4), np.float32)), r"noise has shape \(1, 3, 4, 4\), expected \(1, 4, 3, 4\)")
    one_line_value_error(lambda: call([1.0, "a"]), r"noise must be an array")


def test_step_noise_that_is_not_a_function_is_refused_at_the_call(sd1):
    one_line_value_error(lambda: sd1.generate_latents("p", num_steps=1, sampler="euler_a", step_noise=np.zeros(3)), r"step_noise must be a function \(i, shape\) -> noise, got ndarray")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda shape: np.zeros(shape[1:], np.float32), r"step_noise\(0, \(1, 4, 3, 4\)\) has shape \(4, 3, 4\), expected \(1, 4, 3, 4\)"),
        (lambda shape: np.zeros((1, 1, 1, 1), np.float32), r"has shape \(1, 1, 1, 1\), expected \(1, 4, 3, 4\)"),  # would broadcast silently
        (lambda shape: np.zeros(shape, np.int32), r"step_noise\(0, \(1, 4, 3, 4\)\) has dtype int32; expected floats"),
        (lambda shape: np.full(shape, np.inf, np.float32), r"step_noise\(0, \(1, 4, 3, 4\)\) holds NaN or infinite values"),
        (lambda shape: None, r"step_noise\(0, \(1, 4, 3, 4\)\) must be an array \(mx.array or numpy\), got NoneType"),
    ],
    ids=["batch_dropped", "broadcastable", "int", "inf", "None"],
)
def test_step_noise_of_the_wrong_shape_or_dtype_is_refused_when_drawn(sd1, make, message):
    steps = sd1.generate_latents("p", num_steps=2, cfg_weight=0, latent_size=(4, 3), sampler="euler_a", step_noise=lambda i, shape: make(shape))
    one_line_value_error(lambda: next(steps), message)


def test_guidance_above_the_maximum_is_refused_and_the_maximum_is_accepted(sd1):
    one_line_value_error(lambda: sd1.generate_latents("p", cfg_weight=1e308), r"cfg_weight 1e\+308 is above 1000")
    one_line_value_error(lambda: sd1.generate_latents("p", cfg_weight=MAX_CFG_WEIGHT * (1 + 1e-12)), r"is above 1000")
    steps = sd1.generate_latents("p", num_steps=1, cfg_weight=MAX_CFG_WEIGHT, latent_size=(4, 3), seed=0)
    assert mx.isfinite(next(steps)).all().item()


def test_a_long_prompt_is_read_whole_in_chunks_or_cut_when_literal(sd1):
    prompt = "cat " * 20_000  # 20,000 tokens, no commas: A1111 fills ceil(20000 / 75) chunks of 75
    info, _ = sd1.prompt_info(prompt)
    assert (info.tokens, info.chunks) == (20_000, math.ceil(20_000 / 75))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is dropped, so nothing is said
        next(sd1.generate_latents(prompt, num_steps=1, cfg_weight=0))
    # Read literally (diffusers): one row of 77, the rest cut, and said.
    with pytest.warns(UserWarning, match=r"the last 19925 of 20000 tokens \(CLIP takes 75\) were dropped"):
        sd1.generate_latents(prompt, num_steps=1, cfg_weight=0, prompt_syntax="none")


def test_a_prompt_over_the_character_limit_is_refused_at_the_call(sd1):
    one_line_value_error(lambda: sd1.generate_latents("x" * (MAX_TEXT_CHARS + 1)), rf"the prompt is {MAX_TEXT_CHARS + 1} characters long; at most")
    one_line_value_error(lambda: sd1.generate_latents("p", negative_text="x" * (MAX_TEXT_CHARS + 1), cfg_weight=7.5), r"characters long")


# ---------------------------------------------------------------------------------------------
# Sizes no machine holds: refused at the call with the estimate (MLX on the CPU segfaults when an
# allocation fails). The machine is said to have 8 GB, so the cases hold on any machine.


@pytest.fixture
def eight_gb(monkeypatch):
    monkeypatch.setattr(memory, "memory_limit", lambda: (8 * 10**9, "this machine has"))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda sd: sd.generate_latents("p", latent_size=(4096, 4096)), r"1 image\(s\) of 16384x16384 need at least .* of memory \(weights .*, denoising .*\) but this machine has 8 GB"),
        (lambda sd: sd.generate_latents("p", n_images=10**9, latent_size=(8, 8)), r"1000000000 image\(s\) of 32x32 need at least"),
        (lambda sd: sd.generate_latents("p", n_images=2**62), r"4611686018427387904 image\(s\) of 64x64 need at least"),
        (lambda sd: sd.generate_latents_from_image(np.zeros((16, 12, 3), np.float32), "p", n_images=10**9), r"1000000000 image\(s\) of 12x16 need at least"),
    ],
    ids=["latent_4096^2", "1e9_images", "2^62_images", "img2img_1e9_images"],
)
def test_runs_that_cannot_fit_are_refused_at_the_call_with_the_estimate(sd1, eight_gb, call, message):
    start = time.perf_counter()
    one_line_value_error(lambda: call(sd1), message)
    assert time.perf_counter() - start < 10  # refused from the configs, nothing drawn or run


def test_the_estimate_counts_the_weights_as_loaded(sd1, eight_gb):
    # A run the machine holds is not refused (the tiny model at its default size).
    steps = sd1.generate_latents("p", num_steps=1, n_images=2, seed=0)
    assert next(steps).shape == (2, *sd1.defaults.latent_size, 4)

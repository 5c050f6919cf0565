"""Hostile input to the library (issue 23): each bad argument is one ValueError line at the call.

A server hands the facade whatever the network sends, so every argument is checked before any
compute: a bad model name, latents that are not finite floats of the right shape, a guidance
weight that overflows, sizes no machine holds. LoRAs merged before ``quantize()`` cannot be
removed from the quantized weights, and ``unload_loras`` says so instead of reporting success.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import save_file

from stable_diffusion import StableDiffusion, load_model
from stable_diffusion.pipeline import MAX_CFG_WEIGHT

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

"""Full-size inpainting UNets and ControlNets from their real configs, with random weights: one call
of each against diffusers on the same weights, and the peak memory of our load.

The configs:
- SD 1.5 inpainting and SDXL inpainting 0.1 UNets: the Hub's ``unet/config.json`` shipped in
  ``stable_diffusion/configs/`` (SOURCES.json says where each was read; SDXL inpainting's carries EMA
  training keys such as ``decay`` and ``optimization_step``, which both sides ignore).
- The ControlNets: no copy of ``lllyasviel/control_v11p_sd15_canny``'s or
  ``diffusers/controlnet-canny-sdxl-1.0``'s ``config.json`` could be read, so each config is the one
  diffusers' ``ControlNetModel.from_unet`` derives from the family's shipped UNet config (how those
  ControlNets were made), saved by diffusers' own ``save_config``; the SDXL "mid" and "small" ones
  with the transformer depths (0, 0, 1) and (0, 0, 0) of test_controlnet.py's single-file test
  (273 M and 168 M parameters: the "about 0.2B, 7x smaller" of the small one's card).

Each folder gets random weights of its real shapes (tests/real_models.py: streamed to a safetensors
file tensor by tensor), then diffusers and this package each load it and make one call in their own
process, one after the other (SDXL's UNet is 10.3 GB in float32, the machine has 24 GB): an 8x16
latent (a 64x128 control image), float32. Select these tests with ``-m fullsize``.
"""

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import real_models
import torch
from parity import relative_error

from stable_diffusion.config import UNetConfig

pytestmark = pytest.mark.fullsize

BUILDER = str(Path(real_models.__file__))
TIMEOUT = 1200  # seconds for one process
INPAINTING = {"sd15-inpainting": "stable-diffusion-inpainting", "sdxl-inpainting": "stable-diffusion-xl-1.0-inpainting-0.1"}
# ControlNet -> (the shipped UNet config it is derived from, its transformer depths when not the UNet's)
CONTROLNETS = {
    "sd15-canny": ("stable-diffusion-v1-5", None),
    "sdxl-canny": ("stable-diffusion-xl-base-1.0", None),
    "sdxl-canny-mid": ("stable-diffusion-xl-base-1.0", [0, 0, 1]),
    "sdxl-canny-small": ("stable-diffusion-xl-base-1.0", [0, 0, 0]),
}
CASES = [*INPAINTING, *CONTROLNETS]
EMA_KEYS = ("decay", "inv_gamma", "min_decay", "optimization_step", "power", "update_after_step", "use_ema_warmup")
LATENT = (8, 16)  # three halvings down to 1x2: non-square, so a swapped height and width shows
U = 2.0**-24  # float32's unit roundoff


def _unet_config(case: str) -> dict:
    """The UNet config a case is built from: the inpainting UNet's own, or the ControlNet's family's."""
    folder = INPAINTING[case] if case in INPAINTING else CONTROLNETS[case][0]
    config = json.loads((real_models.CONFIGS_DIR / folder / "unet" / "config.json").read_bytes())
    if case in CONTROLNETS and CONTROLNETS[case][1] is not None:
        config["transformer_layers_per_block"] = CONTROLNETS[case][1]
    return config


def _write_config(case: str, folder: Path) -> dict:
    """The case's folder with its config (a UNet in unet/, a ControlNet at the top); returns the config."""
    if case in INPAINTING:
        (folder / "unet").mkdir(parents=True)
        shutil.copyfile(real_models.CONFIGS_DIR / INPAINTING[case] / "unet" / "config.json", folder / "unet" / "config.json")
        return json.loads((folder / "unet" / "config.json").read_bytes())
    from diffusers import ControlNetModel, UNet2DConditionModel

    with torch.device("meta"):
        controlnet = ControlNetModel.from_unet(UNet2DConditionModel.from_config(_unet_config(case)), load_weights_from_unet=False)
    controlnet.save_config(folder)
    return json.loads((folder / "config.json").read_bytes())


def _float32_tolerance(config: dict, kind: str) -> float:
    """How far two float32 implementations may drift apart: each layer's dot products of length K
    round with a relative error of about sqrt(K) u (random-sign rounding, u = 2^-24), and the errors
    of the L layers one after another add up as a random walk (normalisations keep each relative),
    so sqrt(2 L K_max) u, the 2 for the two implementations. L counts the convs, attention matmuls
    (q/k/v, scores, values, out, for self- and cross-attention) and feed-forward matmuls on the
    longest path; K_max is the widest 3x3 conv's 9 x channels (the UNet's up path reads the skip
    concatenated: twice the channels). A wrong weight, scale, order or layout is an O(1) error."""
    channels, layers = config["block_out_channels"], config["layers_per_block"]
    n = len(channels)
    depths = config.get("transformer_layers_per_block", 1)
    depths = depths if isinstance(depths, list) else [depths] * n
    attention = [t.startswith("CrossAttn") for t in config["down_block_types"]]

    def level(i: int, resnets: int) -> int:  # each resnet: 2 convs; each transformer: proj_in/out and 10 matmuls per block
        return resnets * (2 + (2 + 10 * depths[i] if attention[i] else 0))

    ops = 1 + sum(level(i, layers) + (i < n - 1) for i in range(n))  # conv_in, down blocks and downsamplers
    ops += 2 * 2 + 2 + 10 * depths[-1] + 1  # mid block; the ControlNet's 1x1 conv, or the UNet's conv_out
    k = 9 * channels[-1]
    if kind == "unet":
        ops += sum(level(i, layers + 1) + (i > 0) for i in range(n))  # up blocks and upsamplers
        k *= 2
    return math.sqrt(2 * ops * k) * U


def _inputs(config: dict, kind: str, path: Path) -> Path:
    rng = np.random.default_rng(0)
    channels = config["in_channels"]
    arrays = {
        "x": rng.standard_normal((1, *LATENT, channels)).astype(np.float32),
        "t": np.array([517.3], np.float32),
        "context": rng.standard_normal((1, 77, config["cross_attention_dim"])).astype(np.float32),
    }
    if kind == "controlnet":
        arrays["image"] = rng.random((1, 8 * LATENT[0], 8 * LATENT[1], 3)).astype(np.float32)
        arrays["scale"] = np.array(0.8, np.float32)
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        arrays["text_embeds"] = rng.standard_normal((1, pooled)).astype(np.float32)
        arrays["time_ids"] = np.array([[1024, 1024, 0, 0, 1024, 1024]], np.float32)
    np.savez(path, **arrays)
    return path


def _run(args: list, log: Path):
    with log.open("w") as f:
        process = subprocess.Popen([sys.executable, BUILDER, *map(str, args)], stdout=f, stderr=subprocess.STDOUT)
        try:
            code = process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert code == 0, f"{' '.join(map(str, args))} failed:\n{log.read_text()[-3000:]}"


@pytest.mark.parametrize("case", INPAINTING)
def test_inpainting_unet_config_is_read_as_diffusers_reads_it(case):
    """9 input channels; SDXL inpainting's EMA training keys change nothing (diffusers ignores them)."""
    config = _unet_config(case)
    assert config["in_channels"] == 9 and config["out_channels"] == 4
    stripped = {k: v for k, v in config.items() if k not in EMA_KEYS}
    assert (len(stripped) < len(config)) == (case == "sdxl-inpainting")
    assert UNetConfig.from_dict(config) == UNetConfig.from_dict(stripped)


@pytest.mark.parametrize("case", CASES)
def test_full_size_call_matches_diffusers(case, tmp_path):
    kind = "unet" if case in INPAINTING else "controlnet"
    folder = tmp_path / case
    start = time.perf_counter()
    try:
        config = _write_config(case, folder)
        weights_dir = folder / "unet" if kind == "unet" else folder
        real_models.write_safetensors([(weights_dir / "diffusion_pytorch_model.safetensors", "F32")], real_models.parameter_shapes(kind, config), seed=0)
        written = time.perf_counter() - start
        inputs = _inputs(config, kind, tmp_path / "inputs.npz")
        _run(["component-reference", kind, folder, inputs, tmp_path / "reference.npz"], tmp_path / "reference.log")
        _run(["component-ours", kind, folder, inputs, tmp_path / "ours.npz"], tmp_path / "ours.log")
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # up to 10.3 GB, and pytest keeps the last three sessions' folders
    ours, reference = np.load(tmp_path / "ours.npz"), np.load(tmp_path / "reference.npz")

    outputs = sorted((k for k in reference.files if k.startswith("out")), key=lambda k: int(k[3:]))
    assert sorted(k for k in ours.files if k.startswith("out")) == sorted(outputs)
    assert int(ours["parameters"]) == int(reference["parameters"])
    tolerance = _float32_tolerance(config, kind)
    errors = []
    for key in outputs:
        assert ours[key].shape == reference[key].shape, key
        assert np.isfinite(reference[key]).all() and reference[key].std() > 0, key
        errors.append(relative_error(ours[key], reference[key]))
    peak, weights, largest = (int(ours[k]) for k in ("peak", "weights", "largest"))
    load_s, call_s = ours["seconds"].tolist()
    print(
        f"{case}: {int(ours['parameters']) / 1e6:.1f} M parameters, {weights / 1e9:.2f} GB; load peak {peak / 1e9:.2f} GB "
        f"({peak / weights:.3f} x, bound {1 + largest / weights:.3f} x); worst relative error {max(errors):.2e} of {len(errors)} outputs (tolerance {tolerance:.1e}); "
        f"weights written in {written:.0f} s, our load {load_s:.1f} s, our call {call_s:.1f} s, test {time.perf_counter() - start:.0f} s"
    )
    assert max(errors) <= tolerance, errors
    # Loading reads each tensor once into its parameter (PyTorch's conv layout is a transposed view,
    # float32 needs no cast): at most one tensor in flight besides them, a factor 1 + largest/weights.
    assert peak <= weights + largest, (peak, weights, largest)

"""A real user's first hour: no network, bad input, sizes the machine cannot hold, data loss (issue 10).

Every bad input is one line on stderr, exit status 2, no traceback and nothing written (scripts), or
an exception with a clear message (API). Flags checked against the model's config files run
before any weight is read: the CLI cases use model folders whose weights were removed, so a check
that came after loading would fail on the missing weights instead.
"""

import errno
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from stable_diffusion import ModelLoadError, StableDiffusion, StableDiffusionXL, cli, images, model_io
from stable_diffusion.config import AutoencoderConfig, SchedulerConfig, UNetConfig
from stable_diffusion.tokenizer import Tokenizer
from stable_diffusion.unet import UNetModel
import tiny_models

ROOT = Path(__file__).resolve().parents[1]
T2I, I2I, TRI = "txt2image.py", "image2image.py", "TriangularArray.py"


def run(script, *args, env=None, offline=True, timeout=600):
    environment = {**os.environ, **(env or {})}
    if offline:
        environment["HF_HUB_OFFLINE"] = "1"
    else:
        environment.pop("HF_HUB_OFFLINE", None)
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True, env=environment, cwd=ROOT, timeout=timeout
    )


def assert_usage_error(result, prog, message):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert re.search(message, lines[0]), lines[0]


def ok(result):
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def no_weights(src: Path, dst: Path) -> Path:
    """A copy of a model folder without its weights: whatever needs them fails."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


# The real SD 1.5 configs (no weights): the checks see real sizes.
SD15_UNET = dict(
    _class_name="UNet2DConditionModel",
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-05,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
SD15_VAE = dict(
    _class_name="AutoencoderKL",
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    out_channels=3,
    sample_size=512,
    up_block_types=["UpDecoderBlock2D"] * 4,
)


@pytest.fixture(scope="module")
def sd15_configs(tmp_path_factory) -> Path:
    """SD 1.5's model_index and unet/vae/scheduler configs, and no weights at all."""
    folder = tmp_path_factory.mktemp("sd15") / "sd15"
    for component, name, config in [
        ("unet", "config.json", SD15_UNET),
        ("vae", "config.json", SD15_VAE),
        ("scheduler", "scheduler_config.json", tiny_models.SD1_SCHEDULER),
    ]:
        (folder / component).mkdir(parents=True)
        (folder / component / name).write_text(json.dumps(config))
    (folder / "text_encoder").mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


@pytest.fixture(scope="module")
def bare_sd1(tiny_sd1, tmp_path_factory) -> Path:
    return no_weights(tiny_sd1, tmp_path_factory.mktemp("bare") / "sd1")


# ---------------------------------------------------------------------------------------------
# Checked against the configs before any weight is read or downloaded


@pytest.mark.parametrize(
    "args, message",
    [
        (["--width", 100], "--width 100 is not a multiple of 8 .*VAE factor"),
        (["--height", 520 + 4], "--height 524 is not a multiple of 8"),
        (["--steps", 1001], "--steps 1001 is more than the model's 1000 training timesteps"),
        (["--sampler", "dpm++2m", "--steps", 5000], "--steps 5000 is more than"),
    ],
)
def test_flags_are_checked_against_the_configs_before_any_weight(sd15_configs, tmp_path, args, message):
    result = run(T2I, "p", "--model", sd15_configs, *args, "-o", tmp_path / "out.png")
    assert_usage_error(result, T2I, message)
    assert list(tmp_path.iterdir()) == []


def test_available_memory_is_the_machines():
    assert 2**28 < cli.available_memory() < 2**50


# ---------------------------------------------------------------------------------------------
# Malformed configs: a ModelLoadError naming the file and the key


def _edit(folder: Path, component: str, change, name="config.json"):
    path = folder / component / name
    config = json.loads(path.read_text())
    path.write_text(json.dumps(change(config)))
    return path


MALFORMED = {
    "list": ("unet", lambda c: [c], r"unet/config.json: expected a JSON object, got a list"),
    "sample_size_0": ("unet", lambda c: {**c, "sample_size": 0}, r"unet/config.json: unet: sample_size=0 must be"),
    "sample_size_null": ("unet", lambda c: {**c, "sample_size": None}, r"unet/config.json: unet: sample_size=None must be"),
    "sample_size_str": ("unet", lambda c: {**c, "sample_size": "64"}, r"unet/config.json: unet: sample_size='64' must be"),
    "vae_no_channels": ("vae", lambda c: {k: v for k, v in c.items() if k != "block_out_channels"}, r"vae/config.json: vae: missing key 'block_out_channels'"),
    "beta_end_str": ("scheduler", lambda c: {**c, "beta_end": "0.012"}, r"scheduler_config.json: scheduler: beta_end='0.012' must be a float"),
    "heads": ("unet", lambda c: {**c, "attention_head_dim": 7}, r"unet/config.json: unet: attention_head_dim=7 does not divide block_out_channels"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_config_is_one_line_naming_file_and_key(bare_sd1, tmp_path, case):
    component, change, message = MALFORMED[case]
    folder = shutil.copytree(bare_sd1, tmp_path / "model")
    _edit(folder, component, change, "scheduler_config.json" if component == "scheduler" else "config.json")
    out = tmp_path / "out"
    out.mkdir()
    result = run(T2I, "p", "--model", folder, "--steps", 1, "-o", out / "x.png")
    assert_usage_error(result, T2I, message)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("case", [c for c in MALFORMED if MALFORMED[c][0] != "scheduler"])
def test_malformed_config_raises_model_load_error_in_python(bare_sd1, tmp_path, case):
    component, change, message = MALFORMED[case]
    folder = shutil.copytree(bare_sd1, tmp_path / "model")
    _edit(folder, component, change)
    config_cls = UNetConfig if component == "unet" else AutoencoderConfig
    with pytest.raises(ModelLoadError, match=message):
        model_io.read_component_config(model_io.FolderSource(folder), component, config_cls)


def test_malformed_configs_raise_value_errors_naming_the_key():
    with pytest.raises(ValueError, match="scheduler: expected a JSON object"):
        SchedulerConfig.from_dict([1])
    with pytest.raises(ValueError, match="text encoder: num_attention_heads=5 does not divide hidden_size=32"):
        from stable_diffusion.config import CLIPTextModelConfig

        CLIPTextModelConfig.from_dict(dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=5, vocab_size=10, intermediate_size=8))


def test_a_shard_index_without_weight_map_is_refused(tiny_sd1, tmp_path):
    folder = shutil.copytree(tiny_sd1, tmp_path / "model")
    unet_dir = folder / "unet"
    (unet_dir / "diffusion_pytorch_model.safetensors").rename(unet_dir / "diffusion_pytorch_model-00001-of-00001.safetensors")
    (unet_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ModelLoadError, match=r"index.json: not a safetensors index: missing key 'weight_map'"):
        model_io.load_component(folder, "unet", UNetModel, UNetConfig)


@pytest.mark.parametrize("dtype", [np.int32, np.bool_])
def test_integer_or_bool_weights_are_refused_naming_the_key(tiny_sd1, tmp_path, dtype):
    folder = shutil.copytree(tiny_sd1, tmp_path / "model")
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(path)
    weights["conv_in.bias"] = weights["conv_in.bias"].astype(dtype)
    save_file(weights, path)
    with pytest.raises(ModelLoadError, match=r"key 'conv_in.bias' holds (int32|bool) values; model weights must be floating point"):
        model_io.load_component(folder, "unet", UNetModel, UNetConfig)


def test_tokenizer_very_large_model_max_length_means_77(tiny_sd1, tmp_path):
    folder = shutil.copytree(tiny_sd1 / "tokenizer", tmp_path / "tokenizer")
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**config, "model_max_length": 1000000000000000019884624838656}))
    tokenizer = Tokenizer.from_folder(folder)
    assert tokenizer.max_length == 77
    ids, _ = tokenizer.pad_and_truncate(tokenizer.tokenize("a photo"))
    assert len(ids) == 77


# ---------------------------------------------------------------------------------------------
# Loading: family mismatch at once, configs before weights, defaults never from a path


def test_sd_facade_on_an_sdxl_model_fails_at_once_naming_the_right_class(tiny_sdxl, tmp_path):
    bare = no_weights(tiny_sdxl, tmp_path / "sdxl")  # no weight is read before the check
    with pytest.raises(ModelLoadError, match=r"is an SDXL model: load it with StableDiffusionXL\(...\) or load_model"):
        StableDiffusion(str(bare))


def test_sdxl_facade_on_an_sd_model_fails_at_once(bare_sd1):
    with pytest.raises(ModelLoadError, match=r"is an SD 1.x/2.x model: load it with StableDiffusion\(...\) or load_model"):
        StableDiffusionXL(str(bare_sd1))


def test_hub_source_reads_configs_first_and_downloads_weights_at_first_use(tiny_sd1, monkeypatch):
    import huggingface_hub

    listing = [str(p.relative_to(tiny_sd1)) for p in tiny_sd1.rglob("*") if p.is_file()]
    calls = []

    class Info:
        siblings = [type("S", (), {"rfilename": name}) for name in listing]

    def snapshot_download(repo, allow_patterns=None, **kwargs):
        calls.append(sorted(allow_patterns))
        return str(tiny_sd1)

    monkeypatch.setattr(huggingface_hub, "model_info", lambda repo, **kw: Info())
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(model_io, "offline", lambda: False)
    source = model_io.resolve("tiny-org/tiny-sd")
    assert len(calls) == 1 and not [p for p in calls[0] if p.endswith(".safetensors")]
    source.config("unet"), source.config("scheduler")
    assert len(calls) == 1
    source.weights("unet", False)
    assert len(calls) == 2 and "unet/diffusion_pytorch_model.safetensors" in calls[1]


def test_defaults_never_come_from_a_folder_name(tiny_sd1, tmp_path):
    folder = shutil.copytree(tiny_sd1, tmp_path / "turbo_dir" / "sdxl-turbo")
    sd = StableDiffusion(str(folder))
    assert (sd.defaults.num_steps, sd.defaults.cfg_weight) == (50, 7.5)


def test_img2img_sizes_follow_diffusers_vae_factor():
    assert images.size_to_multiple((64, 48), 8) == (64, 48)  # kept, not distorted to 64x32
    assert images.size_to_multiple((700, 525), 8) == (696, 520)
    with pytest.raises(ValueError, match="--no-resize"):
        images.size_to_multiple((700, 525), 8, allow_resize=False)


# ---------------------------------------------------------------------------------------------
# The Python API: the same checks as the scripts, as exceptions


@pytest.fixture(scope="module")
def sd1(tiny_sd1):
    return StableDiffusion(str(tiny_sd1))


IMAGE = np.zeros((16, 12, 3), np.float32)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda sd: sd.generate_latents_from_image(IMAGE, "p", n_images=0), r"n_images must be a whole number >= 1, got 0"),
        (lambda sd: sd.generate_latents("p", n_images=0), r"n_images must be a whole number >= 1, got 0"),
        (lambda sd: sd.decode(mx.zeros((1, 4, 3, 4)), batch_size=0), r"batch_size must be a whole number >= 1, got 0"),
        (lambda sd: sd.decode(mx.zeros((1, 4, 3, 4)), batch_size=-1), r"batch_size must be a whole number >= 1, got -1"),
        (lambda sd: sd.generate_latents_from_image(IMAGE[None], "p"), r"image has shape \(1, 16, 12, 3\); expected \(H, W, 3\)"),
        (lambda sd: sd.generate_latents_from_image(IMAGE[..., 0], "p"), r"image has shape \(16, 12\); expected \(H, W, 3\)"),
        (lambda sd: sd.generate_latents_from_image(IMAGE.transpose(2, 0, 1), "p"), r"image has shape \(3, 16, 12\); expected \(H, W, 3\)"),
        (lambda sd: sd.generate_latents_from_image((IMAGE * 0).astype(np.uint8), "p"), r"dtype (mlx.core.)?uint8; expected floats in \[-1, 1\]"),
        (lambda sd: sd.generate_latents_from_image(np.full_like(IMAGE, np.nan), "p"), r"NaN"),
        (lambda sd: sd.generate_latents(None), r"text must be a string, got NoneType"),
        (lambda sd: sd.generate_latents_from_image(IMAGE, None), r"text must be a string"),
        (lambda sd: sd.generate_latents("p", cfg_weight=float("nan")), r"cfg_weight must be a finite number"),
        (lambda sd: sd.generate_latents("p", cfg_weight=float("inf")), r"cfg_weight must be a finite number"),
        (lambda sd: sd.generate_latents("p", seed=2**64), r"seed must be an integer in \[0, 2\*\*64\)"),
        (lambda sd: sd.generate_latents("p", seed=-1), r"seed must be an integer in \[0, 2\*\*64\)"),
    ],
    ids=[
        "img2img_n_images_0",
        "n_images_0",
        "decode_batch_0",
        "decode_batch_-1",
        "image_batched",
        "image_2d",
        "image_channels_first",
        "image_uint8",
        "image_nan",
        "text_none",
        "img2img_text_none",
        "cfg_nan",
        "cfg_inf",
        "seed_2**64",
        "seed_-1",
    ],
)
def test_api_bad_arguments_raise_clear_value_errors(sd1, call, message):
    with pytest.raises(ValueError, match=message):
        call(sd1)


def test_api_accepts_numpy_inputs(sd1):
    latents = np.random.default_rng(0).standard_normal((1, 4, 3, 4)).astype(np.float32)
    x = list(sd1.generate_latents("p", num_steps=1, cfg_weight=0, latents=latents))[-1]
    y = list(sd1.generate_latents_from_image(IMAGE, "p", num_steps=1, strength=1.0, cfg_weight=0, seed=1))[-1]
    pictures = sd1.decode(np.array(x))
    assert x.shape == (1, 4, 3, 4) and y.shape == (1, 4, 3, 4) and pictures.shape == (1, 16, 12, 3)


# ---------------------------------------------------------------------------------------------
# Seeds and guidance


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seed", 2**64], r"--seed must be in \[0, 2\*\*64\) or -1"),
        (["--seed", -2], r"--seed must be in \[0, 2\*\*64\) or -1"),
        (["--cfg", "inf"], r"--cfg must be a finite number >= 0 \(got inf\)"),
        (["--cfg", "nan"], r"--cfg must be a finite number >= 0 \(got nan\)"),
    ],
)
def test_bad_seed_or_cfg_is_refused(bare_sd1, tmp_path, args, message):
    assert_usage_error(run(T2I, "p", "--model", bare_sd1, *args, "-o", tmp_path / "out.png"), T2I, message)
    assert list(tmp_path.iterdir()) == []


def test_seed_minus_1_draws_a_seed_and_records_it(tiny_sd1, tmp_path):
    out = tmp_path / "out.png"
    result = ok(run(T2I, "p", "--model", tiny_sd1, "--seed", -1, "--steps", 1, "--width", 8, "--height", 8, "-o", out))
    seed = re.search(r"seed: (\d+)", result.stdout).group(1)
    assert images.parse_parameters(images.read_parameters(out))["Seed"] == seed


# ---------------------------------------------------------------------------------------------
# Output files: long names, full disks, directories in the way, the input never overwritten


def test_an_output_name_near_the_255_byte_limit_is_written(tiny_sd1, tmp_path):
    out = tmp_path / ("a" * 251 + ".png")  # 255 bytes: ".<name>.XXXXXXXX.part" would not fit
    ok(run(T2I, "p", "--model", tiny_sd1, "--seed", 1, "--steps", 1, "--width", 8, "--height", 8, "-o", out))
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_an_output_name_over_the_limit_is_refused_before_generating(bare_sd1, tmp_path):
    result = run(T2I, "p", "--model", bare_sd1, "-o", tmp_path / ("a" * 252 + ".png"))
    assert_usage_error(result, T2I, r"output name 'a+\.png' is 256 bytes; the file system allows 255")
    # an individual file's name (<base>_1.png) over the limit, while the grid's fits
    result = run(T2I, "p", "--model", bare_sd1, "--save_individual", "-o", tmp_path / ("a" * 250 + ".png"))
    assert_usage_error(result, T2I, r"output name 'a+_1\.png' is 256 bytes")
    assert list(tmp_path.iterdir()) == []


def test_temporary_names_fit_the_file_name_limit():
    assert len(images.temporary_prefix(Path("é" * 127 + ".png")).encode()) + len("XXXXXXXX.part") <= 255


def test_disk_full_leaves_no_file_and_says_so(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(images.os, "fsync", full)
    with pytest.raises(images.WriteError, match=r"cannot write '.*out.png': no space left on the device; nothing was written there"):
        images.save_image(np.zeros((8, 8, 3), np.uint8), tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []


def test_a_write_error_is_one_line_and_exit_2(capsys):
    def main():
        raise images.WriteError("cannot write 'out.png': no space left on the device; nothing was written there")

    with pytest.raises(SystemExit) as stop:
        cli.run_cli(main, "txt2image.py")
    assert stop.value.code == 2
    assert capsys.readouterr().err == "txt2image.py: error: cannot write 'out.png': no space left on the device; nothing was written there\n"


def test_a_directory_in_the_way_of_an_individual_file_is_refused_before_generating(bare_sd1, tmp_path):
    (tmp_path / "out_2.png").mkdir()
    result = run(T2I, "p", "--model", bare_sd1, "--n_images", 2, "--save_individual", "-o", tmp_path / "out.png")
    assert_usage_error(result, T2I, r"out_2.png' is a directory, in the way of an output file")
    assert [p.name for p in tmp_path.iterdir()] == ["out_2.png"]


def test_a_directory_in_the_way_of_an_interim_file_is_refused_before_generating(bare_sd1, tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "in.png")
    (tmp_path / "fire_2_1.png").mkdir()
    # Euler: 2 steps are 2 UNet calls, which number the interim files (the folder's own PNDM makes 3).
    result = run(I2I, tmp_path / "in.png", "p", "--model", bare_sd1, "--sampler", "euler", "--steps", 2, "--strength", 1, "-sd", 1, "-o", tmp_path / "fire.png")
    assert_usage_error(result, I2I, r"fire_2_1.png' is a directory, in the way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fire_2_1.png", "in.png"]


@pytest.mark.parametrize(
    "input_name, args",
    [("in.png", ["-o", "in.png"]), ("fire_0_0.png", ["-o", "fire.png", "-sd", 1]), ("fire_1.png", ["-o", "fire.png", "--n_images", 2, "--save_individual"])],
    ids=["same_name", "interim_input_tile", "individual"],
)
def test_image2image_never_overwrites_its_input(bare_sd1, tmp_path, input_name, args):
    source = tmp_path / input_name
    Image.new("RGB", (18, 18), (1, 2, 3)).save(source)
    before = source.read_bytes()
    args = [tmp_path / a if str(a).endswith(".png") else a for a in args]
    result = run(I2I, source, "p", "--model", bare_sd1, "--steps", 2, "--strength", 1, *args)
    assert_usage_error(result, I2I, rf"would overwrite the input '.*{input_name}'")
    assert source.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [input_name]


# ---------------------------------------------------------------------------------------------
# TriangularArray.py: bombs, absurd scales and step counts are bounded


def bomb_png(path: Path, width: int = 100000, height: int = 100000) -> Path:
    """A 60-byte PNG that claims to be width x height (PIL refuses it at open)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def tiles(tmp_path) -> Path:
    for name in ("fire_0_0.png", "fire_1_1.png", "fire_2_1.png", "fire_2_2.png"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / name)
    return tmp_path / "fire.png"


def test_triangular_array_small_run_works(tiles):
    ok(run(TRI, tiles))
    assert Image.open(tiles.with_name("fire_triangle.png")).size == (3 * 8, 2 * 8)


def test_triangular_array_refuses_a_decompression_bomb_tile(tiles):
    bomb_png(tiles.with_name("fire_2_1.png"))
    assert_usage_error(run(TRI, tiles), TRI, r"fire_2_1.png: too large to open safely")
    assert not tiles.with_name("fire_triangle.png").exists()


def test_triangular_array_refuses_a_decompression_bomb_seed_image(tiles, tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png")
    assert_usage_error(run(TRI, tiles, "--seed_image", bomb), TRI, r"bomb.png: too large to open safely")
    assert not tiles.with_name("fire_triangle.png").exists()


@pytest.mark.parametrize(
    "scale, message",
    [("inf", r"--scale must be a positive finite number \(got inf\)"), ("nan", r"--scale must be a positive finite number"), ("1000000", r"the picture would be 24000000x16000000")],
)
def test_triangular_array_bounds_the_scale(tiles, scale, message):
    assert_usage_error(run(TRI, tiles, "--scale", scale), TRI, message)
    assert not tiles.with_name("fire_triangle.png").exists()


def test_triangular_array_a_huge_step_count_in_a_name_is_refused_at_once(tiles):
    Image.new("RGB", (8, 8)).save(tiles.with_name("fire_100000000000_2.png"))
    start = time.time()
    result = run(TRI, tiles, timeout=60)
    assert_usage_error(result, TRI, r"fire_100000000000_2.png: a run of 100000000000 steps is longer than any image2image.py run")
    assert time.time() - start < 30


# ---------------------------------------------------------------------------------------------
# No network: the HF cache is used; an uncached repo is one clear line, at once. The Hub is a
# closed loopback port (nothing listens on the discard port 9), so these run the same on any machine.

NO_HUB = {"HF_ENDPOINT": "http://127.0.0.1:9"}


@pytest.fixture(scope="module")
def hf_cache(tiny_sd1, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / "models--tiny-org--tiny-sd"
    shutil.copytree(tiny_sd1, repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    return home


def test_without_network_a_cached_repo_loads(hf_cache, tmp_path):
    out = tmp_path / "out.png"
    env = {"HF_HOME": str(hf_cache), **NO_HUB}
    result = ok(run(T2I, "p", "--model", "tiny-org/tiny-sd", "--steps", 1, "--seed", 1, "--width", 8, "--height", 8, "-o", out, env=env, offline=False))
    assert out.exists(), result.stderr


def test_without_network_an_uncached_repo_is_one_line_at_once(hf_cache, tmp_path):
    start = time.time()
    env = {"HF_HOME": str(hf_cache), **NO_HUB}
    result = run(T2I, "p", "--model", "tiny-org/not-cached", "-o", tmp_path / "out.png", env=env, offline=False, timeout=120)
    assert_usage_error(result, T2I, r"'tiny-org/not-cached' is not in the Hugging Face cache and cannot be downloaded \(the Hugging Face Hub cannot be reached: .*Connect")
    assert "HF_HUB_OFFLINE" not in result.stderr  # it is not set: the message says what is true
    assert time.time() - start < 20
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_hub_is_named_as_such_in_the_library_error(tmp_path):
    code = "from stable_diffusion import StableDiffusion; StableDiffusion('tiny-org/not-cached')"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), **NO_HUB}
    env.pop("HF_HUB_OFFLINE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=120)
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("stable_diffusion.errors.ModelLoadError: model 'tiny-org/not-cached' is not in the Hugging Face cache"), out.stderr
    assert "the Hugging Face Hub cannot be reached" in last and "HF_HUB_OFFLINE" not in last
    assert "--model" not in last and "a local diffusers folder or a .safetensors file" in last  # no CLI flag in a library message

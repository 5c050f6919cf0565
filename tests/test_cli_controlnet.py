"""--control in txt2image.py and image2image.py, run as subprocesses on tiny models, against the library called directly.

The library's ControlNet generations are tied to diffusers' ControlNet pipelines by
test_controlnet_pipeline.py; here the scripts must make exactly (pixel for pixel) what the facade
makes from the same ControlNets, control images, scales and spans, and write A1111's ControlNet
extension's infotext (``ControlNet 0: "Module: canny, Model: ..., Weight: ..., Guidance Start: ...,
Guidance End: ..."``). The canny preprocessor's reference is OpenCV's ``cv2.Canny`` on the control
picture Lanczos-resized to the generation's size (diffusers' control_image_processor, done with PIL
here). Bad flags are one line, exit 2, nothing written, before any weight is read.

The tiny VAE downsamples 4x, so the tiny ControlNets' hint embedding has two stride-2 convs
(conditioning_embedding_out_channels of 3 entries), as in test_controlnet_pipeline.py.
"""

import shutil

import cv2
import numpy as np
import pytest
from PIL import Image

import tiny_models
from stable_diffusion import cli, images, load_model
from stable_diffusion.controlnet import Control, load_controlnet
from test_cli import assert_usage_error, ok, params, pixels, run

I2I, T2I = "image2image.py", "txt2image.py"
PROMPT = "a house by a lake"
HINT_CHANNELS = (16, 32, 32)
COMMON = ["--steps", 3, "--cfg", 3, "--sampler", "euler", "--no-float16"]
SIZE = ["--width", 32, "--height", 40]


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory):
    """name -> (folder, diffusers model): tiny ControlNets with every parameter random."""
    root = tmp_path_factory.mktemp("cli_controlnets")
    shapes = {"cn_sd1": tiny_models.SD1_UNET, "cn_sd1_b": tiny_models.SD1_UNET, "cn_sdxl": tiny_models.SDXL_UNET}
    return {
        name: (root / name, tiny_models.build_controlnet(root / name, unet, seed=20 + i, conditioning_embedding_out_channels=HINT_CHANNELS))
        for i, (name, unet) in enumerate(shapes.items())
    }


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("control_pictures")
    rng = np.random.default_rng(3)
    # Blocks of flat colour: canny finds their borders (a noise picture would be all edges).
    blocks = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8).repeat(9, axis=0).repeat(11, axis=1)  # 54x55
    Image.fromarray(blocks).save(folder / "blocks.png")
    Image.fromarray(rng.integers(0, 256, (40, 32, 3), dtype=np.uint8)).save(folder / "noise.png")
    Image.fromarray(rng.integers(0, 256, (40, 32, 3), dtype=np.uint8)).save(folder / "input.png")
    mask = np.zeros((40, 32), np.uint8)
    mask[8:28, 4:20] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return folder


def control_image(path, width, height) -> np.ndarray:
    """A control picture as diffusers' control_image_processor makes it: RGB, Lanczos to the size, / 255."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32) / 255


def canny_image(path, width, height, low=100, high=200) -> np.ndarray:
    """The canny preprocessor's output, by OpenCV: cv2.Canny on the resized picture, 3 equal channels in {0, 1}."""
    resized = np.rint(control_image(path, width, height) * 255).astype(np.uint8)
    edges = cv2.Canny(resized, low, high)
    return np.repeat(edges[..., None], 3, axis=-1).astype(np.float32) / 255


def txt2img(model, controls, seed, width=32, height=40, guess_mode=False) -> np.ndarray:
    sd = load_model(str(model), sampler="euler")
    f = sd.latent_factor
    *_, x = sd.generate_latents(PROMPT, num_steps=3, cfg_weight=3, latent_size=(height // f, width // f), seed=seed, controls=controls, guess_mode=guess_mode)
    return images.to_uint8(sd.decode(x))[0]


def test_txt2image_control_is_the_librarys_controlnet_generation(tiny_sd1, controlnets, pictures, tmp_path):
    folder, _ = controlnets["cn_sd1"]
    out = tmp_path / "out.png"
    args = ["--control", folder, pictures / "noise.png", "--control-scale", 0.7, "--control-start", 0.3]
    ok(run(T2I, PROMPT, "--model", tiny_sd1, *args, *COMMON, *SIZE, "--seed", 11, "-o", out))
    controlnet = load_controlnet(str(folder))
    expected = txt2img(tiny_sd1, [Control(controlnet, str(pictures / "noise.png"), 0.7, 0.3, 1.0)], 11)
    assert np.array_equal(pixels(out), expected)
    assert not np.array_equal(expected, txt2img(tiny_sd1, [], 11))  # the ControlNet took part
    value = params(out)["ControlNet 0"]
    assert value == "Module: none, Model: cn_sd1, Weight: 0.7, Guidance Start: 0.3, Guidance End: 1.0"


def test_canny_preprocess_is_opencvs_edges_of_the_resized_picture(tiny_sd1, controlnets, pictures, tmp_path):
    folder, _ = controlnets["cn_sd1"]
    out = tmp_path / "out.png"
    args = ["--control", folder, pictures / "blocks.png", "--control-preprocess", "canny", "--canny-low", 50, "--canny-high", 150]
    ok(run(T2I, PROMPT, "--model", tiny_sd1, *args, *COMMON, *SIZE, "--seed", 12, "-o", out))
    edges = canny_image(pictures / "blocks.png", 32, 40, 50, 150)
    assert 0 < edges.mean() < 0.5  # some edges, not all
    assert not np.array_equal(edges, canny_image(pictures / "blocks.png", 32, 40))  # the thresholds matter here
    expected = txt2img(tiny_sd1, [Control(load_controlnet(str(folder)), edges)], 12)
    assert np.array_equal(pixels(out), expected)
    assert not np.array_equal(expected, txt2img(tiny_sd1, [Control(load_controlnet(str(folder)), control_image(pictures / "blocks.png", 32, 40))], 12))
    value = params(out)["ControlNet 0"]
    assert value.startswith("Module: canny, Model: cn_sd1, Weight: 1.0, ") and value.endswith("Threshold A: 50, Threshold B: 150")


def test_two_controls_take_their_own_flags_in_order(tiny_sd1, controlnets, pictures, tmp_path):
    (a, _), (b, _) = controlnets["cn_sd1"], controlnets["cn_sd1_b"]
    out = tmp_path / "out.png"
    args = [
        "--control", a, pictures / "noise.png", "--control", b, pictures / "blocks.png",
        "--control-scale", 0.5, "--control-scale", 1.2, "--control-end", 0.7, "--control-preprocess", "none", "--control-preprocess", "canny",
    ]  # fmt: skip
    ok(run(T2I, PROMPT, "--model", tiny_sd1, *args, *COMMON, *SIZE, "--seed", 13, "-o", out))
    controls = [
        Control(load_controlnet(str(a)), control_image(pictures / "noise.png", 32, 40), 0.5, 0.0, 0.7),
        Control(load_controlnet(str(b)), canny_image(pictures / "blocks.png", 32, 40), 1.2, 0.0, 0.7),
    ]
    assert np.array_equal(pixels(out), txt2img(tiny_sd1, controls, 13))
    p = params(out)
    assert p["ControlNet 0"] == "Module: none, Model: cn_sd1, Weight: 0.5, Guidance Start: 0.0, Guidance End: 0.7"
    assert p["ControlNet 1"].startswith("Module: canny, Model: cn_sd1_b, Weight: 1.2, Guidance Start: 0.0, Guidance End: 0.7")


def test_sdxl_guess_mode_is_the_librarys(tiny_sdxl, controlnets, pictures, tmp_path):
    folder, _ = controlnets["cn_sdxl"]
    out = tmp_path / "out.png"
    ok(run(T2I, PROMPT, "--model", tiny_sdxl, "--control", folder, pictures / "noise.png", "--guess-mode", *COMMON, *SIZE, "--seed", 14, "-o", out))
    controls = [Control(load_controlnet(str(folder)), control_image(pictures / "noise.png", 32, 40))]
    expected = txt2img(tiny_sdxl, controls, 14, guess_mode=True)
    assert np.array_equal(pixels(out), expected)
    assert not np.array_equal(expected, txt2img(tiny_sdxl, controls, 14))
    assert params(out)["Guess mode"] == "True"


def test_image2image_inpainting_with_a_control_is_the_librarys(tiny_sd1_inpaint, controlnets, pictures, tmp_path):
    folder, _ = controlnets["cn_sd1"]
    out = tmp_path / "out.png"
    args = ["--mask", pictures / "mask.png", "--control", folder, pictures / "blocks.png", "--control-preprocess", "canny", "--strength", 0.8]
    ok(run(I2I, pictures / "input.png", PROMPT, "--model", tiny_sd1_inpaint, *args, *COMMON, "--seed", 15, "-o", out))
    sd = load_model(str(tiny_sd1_inpaint), sampler="euler")
    init = images.to_model_input(images.load_image(pictures / "input.png"))
    controls = [Control(load_controlnet(str(folder)), canny_image(pictures / "blocks.png", 32, 40))]
    *_, x = sd.generate_latents_from_image(init, PROMPT, mask=str(pictures / "mask.png"), strength=0.8, num_steps=3, cfg_weight=3, seed=15, controls=controls)
    assert np.array_equal(pixels(out), images.to_uint8(sd.decode(x))[0])
    p = params(out)
    assert p["ControlNet 0"].startswith("Module: canny, Model: cn_sd1,") and p["Mask blur"] == "0"


def test_verbose_names_the_controlnets_loaded(tiny_sd1, controlnets, pictures, tmp_path):
    folder, reference = controlnets["cn_sd1"]
    result = ok(run(T2I, PROMPT, "--model", tiny_sd1, "--control", folder, pictures / "noise.png", "-v", *COMMON, *SIZE, "--seed", 1, "-o", tmp_path / "o.png"))
    n = sum(p.numel() for p in reference.parameters())
    assert f"ControlNet 0: cn_sd1 ({folder}), {n / 1e6:.0f}M parameters" in result.stderr


# ---------------------------------------------------------------------------------------------
# The memory check counts each ControlNet's weights


def test_controlnet_values_are_diffusers_parameter_counts(tiny_sd1, controlnets, tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel
    from safetensors.torch import save_file

    folder, reference = controlnets["cn_sd1"]
    n = sum(p.numel() for p in reference.parameters())
    args = cli.argparse.Namespace(model=str(tiny_sd1), sampler=None, schedule=None, sampler_rules="diffusers", prediction_type=None, config_dir=None, float16=False)
    model = cli.read_model_configs(args)
    assert cli.controlnet_values(str(folder), model, False) == n
    single = tmp_path / "control.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(single))
    assert cli.controlnet_values(str(single), model, False) == n
    # A Hub repo not downloaded: the full-size ControlNet ControlNetModel.from_unet builds from the model's UNet.
    unet_config = {k: v for k, v in UNet2DConditionModel.load_config(tiny_sd1 / "unet").items() if not k.startswith("_")}
    full = ControlNetModel.from_unet(UNet2DConditionModel(**unet_config))
    assert cli.controlnet_values("nobody/not-downloaded", model, False) == sum(p.numel() for p in full.parameters())


def test_the_memory_check_adds_each_controlnets_weights_once(tiny_sd1, controlnets, pictures, monkeypatch):
    folder, reference = controlnets["cn_sd1"]
    seen = []
    monkeypatch.setattr(cli.memory, "check", lambda parts, *a: seen.append(parts["weights"]))
    base = ["p", "--model", str(tiny_sd1), "--no-float16", "-o", "/tmp/x.png"]
    for extra in ([], ["--control", str(folder), str(pictures / "noise.png")] * 2):
        args = cli.ArgumentParser()
        cli.add_common_arguments(args)
        args = args.parse_args(base + extra)
        cli.check_control_arguments(args)
        args.seed_list = None
        cli.check_before_loading(args, 32, 40)
    assert seen[1] - seen[0] == sum(p.numel() for p in reference.parameters()) * 4  # float32, the same ControlNet twice


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_sd1, controlnets):
    folder = tmp_path_factory.mktemp("bad_controls")
    Image.new("RGB", (32, 40), (90, 20, 200)).save(folder / "c.png")
    (folder / "text.png").write_text("not a picture")
    (folder / "control.pth").write_bytes(b"\x80\x02pickle")
    # The UNet's weights are garbage: a check that ran after loading would report them instead.
    shutil.copytree(tiny_sd1, folder / "broken")
    for weights in (folder / "broken" / "unet").glob("*.safetensors"):
        weights.write_bytes(b"garbage")
    shutil.copytree(controlnets["cn_sd1"][0], folder / "broken_cn")
    for weights in (folder / "broken_cn").glob("*.safetensors"):
        weights.write_bytes(b"garbage")
    return folder


CN = "{cn}"
C = ["--control", CN, "{f}/c.png"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--control-scale", 0.5], "--control-scale applies to ControlNets: add --control MODEL IMAGE"),
        (["--guess-mode"], "--guess-mode applies to ControlNets"),
        ([*C, *C, *C, "--control-scale", 1, "--control-scale", 2], "--control-scale is given 2 times for 3 --control"),
        ([*C, "--control-preprocess", "canny", "--control-preprocess", "none"], "--control-preprocess is given 2 times for 1 --control"),
        ([*C, "--control-start", 0.5, "--control-end", 0.5], "0 <= start < end <= 1"),
        ([*C, "--control-end", 1.5], "0 <= start < end <= 1"),
        ([*C, "--control-start", -0.1], "0 <= start < end <= 1"),
        ([*C, "--control-scale", "nan"], "--control-scale must be a finite number"),
        ([*C, "--control-scale", "inf"], "--control-scale must be a finite number"),
        ([*C, "--control-preprocess", "canny", "--canny-low", -1], "--canny-low must be a finite number >= 0"),
        ([*C, "--control-preprocess", "canny", "--canny-low", 300], "--canny-low 300 is above --canny-high 200"),
        ([*C, "--canny-low", 50], "--canny-low/--canny-high apply to the Canny preprocessor"),
        (["--canny-high", 150], "--canny-low/--canny-high apply to the Canny preprocessor"),
        ([*C, "--control-preprocess", "depth"], "argument --control-preprocess: invalid choice: 'depth'"),
        (["--control", CN, "{f}/missing.png"], "missing.png"),
        (["--control", CN, "{f}/text.png"], "not an image PIL can read"),
        (["--control", "{f}/control.pth", "{f}/c.png"], "only .safetensors ControlNet files .* never opened"),
        (["--control", "./no/such/folder", "{f}/c.png"], "no such folder or file, not a preset"),
        (["--control", "{cn}"], "argument --control: expected 2 arguments"),
    ],
)
@pytest.mark.parametrize("script", [T2I, I2I])
def test_bad_control_flags_are_one_line_exit_2_before_loading(bad, controlnets, tmp_path, script, args, message):
    args = [str(a).format(f=bad, cn=controlnets["cn_sd1"][0]) for a in args]
    first = [bad / "c.png"] if script == I2I else []
    result = run(script, *first, PROMPT, "--model", bad / "broken", *args, "--steps", 2, "-o", tmp_path / "out.png")
    assert_usage_error(result, script, message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "control, message",
    [("cn_sdxl", "for another model family"), ("{f}/broken_cn", "broken_cn")],
    ids=["other-family", "corrupt-weights"],
)
def test_a_controlnet_that_cannot_guide_this_model_is_one_line_exit_2(tiny_sd1, bad, controlnets, tmp_path, control, message):
    folder = controlnets[control][0] if control in controlnets else control.format(f=bad)
    out = tmp_path / "out" / "o.png"
    out.parent.mkdir()
    result = run(T2I, PROMPT, "--model", tiny_sd1, "--control", folder, bad / "c.png", *COMMON, *SIZE, "-o", out)
    assert_usage_error(result, T2I, message)
    assert list(out.parent.iterdir()) == []


def test_only_masked_crops_the_control_picture_as_the_input(tiny_sd1, controlnets, pictures, tmp_path):
    from stable_diffusion import inpaint

    folder, _ = controlnets["cn_sd1"]
    out = tmp_path / "out.png"
    args = ["--mask", pictures / "mask.png", "--inpaint-only-masked", 4, "--control", folder, pictures / "blocks.png", "--strength", 0.9]
    ok(run(I2I, pictures / "input.png", PROMPT, "--model", tiny_sd1, *args, *COMMON, "--seed", 16, "-o", out))
    crop = inpaint.crop_to_mask(pictures / "input.png", str(pictures / "mask.png"), 4, multiple=4)
    with Image.open(pictures / "blocks.png") as blocks:  # 55x54, the input 32x40: first to the input's size
        control = inpaint.crop_and_fill(blocks.convert("RGB").resize((32, 40), Image.Resampling.LANCZOS), crop.box, 32, 40)
    sd = load_model(str(tiny_sd1), sampler="euler")
    *_, x = sd.generate_latents_from_image(
        images.to_model_input(crop.image), PROMPT, mask=crop.mask, strength=0.9, num_steps=3, cfg_weight=3, seed=16, controls=[Control(load_controlnet(str(folder)), control)]
    )
    expected = np.asarray(crop.paste(np.asarray(sd.decode(x)))[0])
    assert np.array_equal(pixels(out), expected)

"""image2image.py --mask (inpainting), run as a subprocess on tiny models, against the library called directly.

The library's inpainting is tied to diffusers' inpainting pipelines by test_inpaint_pipeline.py; here
the script must make exactly (pixel for pixel) what the facade makes from the same image, mask,
seed and options, and write A1111's infotext fields (modules/img2img.py: "Mask blur" whenever a
mask is used; modules/processing.py: "Mask mode: Inpaint not masked" when inverted, "Inpaint area:
Only masked" and "Masked area padding" for only-masked). Bad masks are one line, exit 2, nothing
written, before any weight is read (shown with a model whose UNet weights are corrupt: the mask's
error comes first). The tiny VAE's factor is 4, so sizes are multiples of 4.
"""

import shutil
import sys

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps

from stable_diffusion import images, inpaint, load_model
from test_cli import ROOT, assert_usage_error, ok, params, pixels, run
from test_distributed import files, launch_command
from test_distributed import ok as launch_ok
from test_distributed import run as launch_run

I2I, T2I = "image2image.py", "txt2image.py"
PROMPT = "a cat on a sofa"
COMMON = ["--steps", 3, "--cfg", 3, "--sampler", "euler", "--no-float16"]


def picture(path, h, w, seed):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def box_mask(path, h, w, box):
    """A black picture with a white rectangle (x1, y1, x2, y2): the region to repaint."""
    m = np.zeros((h, w), np.uint8)
    x1, y1, x2, y2 = box
    m[y1:y2, x1:x2] = 255
    Image.fromarray(m).save(path)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inpaint_inputs")
    return {
        "image": picture(folder / "in.png", 32, 40, 0),
        "mask": box_mask(folder / "mask.png", 32, 40, (8, 4, 24, 20)),
        "odd": picture(folder / "odd.png", 70, 45, 1),  # not a multiple of 4: shrunk to 44x68
        "odd_mask": box_mask(folder / "odd_mask.png", 70, 45, (20, 30, 34, 50)),
    }


def library_pictures(model, image, mask, seed, n=1, sampler="euler", **options) -> np.ndarray:
    """What the facade makes from a picture and a mask: (n, H, W, 3) uint8, seeds seed .. seed + n - 1 as the script numbers them."""
    sd = load_model(str(model), sampler=sampler)
    init = images.to_model_input(image)
    out = []
    for j in range(n):
        *_, x = sd.generate_latents_from_image(init, PROMPT, mask=mask, num_steps=3, seed=seed + j, **options)
        out.append(images.to_uint8(sd.decode(x))[0])
    return np.stack(out)


@pytest.mark.parametrize("model", ["tiny_sd1", "tiny_sd1_inpaint"], ids=["4-channel", "9-channel"])
def test_a_mask_run_is_the_librarys_inpainting(request, inputs, tmp_path, model):
    folder = request.getfixturevalue(model)
    out = tmp_path / "out.png"
    ok(run(I2I, inputs["image"], PROMPT, "--model", folder, "--mask", inputs["mask"], "--mask-blur", 2, *COMMON, "--seed", 5, "--n_images", 2, "-o", out))
    expected = library_pictures(folder, images.load_image(inputs["image"]), str(inputs["mask"]), 5, n=2, mask_blur=2, cfg_weight=3)
    assert np.array_equal(pixels(out), images.grid(expected, 1))
    # The blur and the mask took part: without either the library makes other pictures (a 9-channel
    # model refuses to run without a mask).
    unblurred = library_pictures(folder, images.load_image(inputs["image"]), str(inputs["mask"]), 5, cfg_weight=3)
    assert not np.array_equal(expected[0], unblurred[0])
    if model == "tiny_sd1":
        assert not np.array_equal(expected[0], library_pictures(folder, images.load_image(inputs["image"]), None, 5, strength=1.0, cfg_weight=3)[0])
    p = params(out)
    # StableDiffusionInpaintPipeline's default strength is 1.0; A1111 writes "Mask blur" whenever a mask is used.
    assert (p["Denoising strength"], p["Mask blur"], p["Size"]) == ("1", "2", "40x32")
    assert "Mask mode" not in p and "Inpaint area" not in p and "Masked area padding" not in p


def test_invert_mask_repaints_the_black_region(tiny_sd1_inpaint, inputs, tmp_path):
    out = tmp_path / "out.png"
    ok(run(I2I, inputs["image"], PROMPT, "--model", tiny_sd1_inpaint, "--mask", inputs["mask"], "--invert-mask", *COMMON, "--seed", 2, "-o", out))
    with Image.open(inputs["mask"]) as m:
        inverted = ImageOps.invert(m.convert("L"))  # A1111's inpainting_mask_invert: ImageOps.invert of the mask
    expected = library_pictures(tiny_sd1_inpaint, images.load_image(inputs["image"]), inverted, 2, cfg_weight=3)
    assert np.array_equal(pixels(out), expected[0])
    p = params(out)
    assert (p["Mask mode"], p["Mask blur"]) == ("Inpaint not masked", "0")


def test_only_masked_generates_the_crop_and_pastes_it_into_the_original(tiny_sd1, inputs, tmp_path):
    out = tmp_path / "out.png"
    args = ["--mask", inputs["odd_mask"], "--mask-blur", 1.5, "--inpaint-only-masked", 6, "--strength", 0.7, *COMMON, "--seed", 4]
    ok(run(I2I, inputs["odd"], PROMPT, "--model", tiny_sd1, *args, "-o", out))
    # diffusers' padding_mask_crop through the library's helper: the crop generated at the input's
    # size shrunk to the VAE factor (44x68), pasted back into the 45x70 original.
    crop = inpaint.crop_to_mask(inputs["odd"], str(inputs["odd_mask"]), 6, blur=1.5, multiple=4)
    generated = library_pictures(tiny_sd1, crop.image, crop.mask, 4, strength=0.7, cfg_weight=3)
    expected = np.asarray(crop.paste(generated.astype(np.float32) / 255)[0])
    made = pixels(out)
    assert made.shape == (70, 45, 3)
    assert np.array_equal(made, expected)
    # apply_overlay keeps the original exactly where the blurred mask (PIL's GaussianBlur) is black.
    with Image.open(inputs["odd_mask"]) as m:
        kept = np.asarray(m.convert("L").filter(ImageFilter.GaussianBlur(1.5))) == 0
    assert np.array_equal(made[kept], pixels(inputs["odd"])[kept]) and not np.array_equal(made[~kept], pixels(inputs["odd"])[~kept])
    p = params(out)
    assert (p["Inpaint area"], p["Masked area padding"], p["Mask blur"], p["Denoising strength"], p["Size"]) == ("Only masked", "6", "1.5", "0.7", "45x70")


def test_only_masked_padding_defaults_to_a1111s_32(tiny_sd1, inputs, tmp_path):
    out = tmp_path / "out.png"
    ok(run(I2I, inputs["image"], PROMPT, "--model", tiny_sd1, "--mask", inputs["mask"], "--inpaint-only-masked", *COMMON, "--seed", 1, "-o", out))
    assert params(out)["Masked area padding"] == "32"


def test_sdxl_inpainting_defaults_are_its_pipelines(tiny_sdxl_inpaint, inputs, tmp_path):
    out = tmp_path / "out.png"
    ok(run(I2I, inputs["image"], PROMPT, "--model", tiny_sdxl_inpaint, "--mask", inputs["mask"], "--steps", 3, "--sampler", "euler", "--no-float16", "--seed", 8, "-o", out))
    # StableDiffusionXLInpaintPipeline: strength 0.9999, guidance_scale 7.5.
    p = params(out)
    assert (p["Denoising strength"], p["CFG scale"]) == ("0.9999", "7.5")
    expected = library_pictures(tiny_sdxl_inpaint, images.load_image(inputs["image"]), str(inputs["mask"]), 8, strength=0.9999, cfg_weight=7.5)
    assert np.array_equal(pixels(out), expected[0])


def test_lora_and_a_stochastic_sampler_inpaint_as_the_library(tiny_sd1_inpaint, inputs, tmp_path):
    import lora_files
    from test_lora import reference_pipe, torch_models

    lora = lora_files.random_lora(torch_models(reference_pipe(tiny_sd1_inpaint, xl=False)), seed=6)
    path = lora_files.write_kohya(tmp_path / "style.safetensors", lora)
    out = tmp_path / "out.png"
    args = ["--mask", inputs["mask"], "--lora", f"{path}:0.8", "--sampler", "Euler a", "--steps", 3, "--cfg", 3, "--no-float16", "--seed", 9]
    ok(run(I2I, inputs["image"], PROMPT, "--model", tiny_sd1_inpaint, *args, "-o", out))
    sd = load_model(str(tiny_sd1_inpaint), sampler="Euler a")
    sd.load_lora(path, 0.8)
    init = images.to_model_input(images.load_image(inputs["image"]))
    *_, x = sd.generate_latents_from_image(init, PROMPT, mask=str(inputs["mask"]), num_steps=3, cfg_weight=3, seed=9)
    expected = images.to_uint8(sd.decode(x))[0]
    assert np.array_equal(pixels(out), expected)
    plain = library_pictures(tiny_sd1_inpaint, images.load_image(inputs["image"]), str(inputs["mask"]), 9, sampler="Euler a", cfg_weight=3)
    assert not np.array_equal(expected, plain[0])  # the LoRA took part
    assert params(out)["Sampler"] == "Euler a"


def test_images_list_pairs_each_image_with_its_mask(tiny_sd1, inputs, tmp_path):
    other = picture(tmp_path / "b.png", 28, 36, 3)
    other_mask = box_mask(tmp_path / "b_mask.png", 28, 36, (0, 0, 12, 28))
    # Line 1 carries its own mask, line 2 takes the global --mask (of its size).
    (tmp_path / "list.txt").write_text(f"{other}\t{other_mask}\n{inputs['image']}\n")
    out = tmp_path / "out.png"
    ok(run(I2I, "--images", tmp_path / "list.txt", PROMPT, "--model", tiny_sd1, "--mask", inputs["mask"], "--seeds", "3-4", *COMMON, "--strength", 0.8, "-o", out))
    assert sorted(p.name for p in tmp_path.glob("out*")) == ["out_1.png", "out_2.png", "out_3.png", "out_4.png"]
    first = library_pictures(tiny_sd1, images.load_image(other), str(other_mask), 3, n=2, strength=0.8, cfg_weight=3)
    second = library_pictures(tiny_sd1, images.load_image(inputs["image"]), str(inputs["mask"]), 3, n=2, strength=0.8, cfg_weight=3)
    for k, expected in enumerate([*first, *second], start=1):
        assert np.array_equal(pixels(out.with_name(f"out_{k}.png")), expected), k
    assert params(out.with_name("out_2.png"))["Seed"] == "4" and params(out.with_name("out_3.png"))["Size"] == "40x32"


def test_show_denoising_with_a_mask_saves_pasted_interim_grids(tiny_sd1, inputs, tmp_path):
    out = tmp_path / "fire.png"
    ok(run(I2I, inputs["odd"], PROMPT, "--model", tiny_sd1, "--mask", inputs["odd_mask"], "--inpaint-only-masked", 4, "-sd", 1, *COMMON, "--seed", 2, "-o", out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fire.png", "fire_0_0.png", "fire_3_1.png", "fire_3_2.png", "fire_3_3.png"]
    for name in ("fire_0_0.png", "fire_3_1.png", "fire.png"):
        assert pixels(tmp_path / name).shape == (70, 45, 3)  # pasted back into the original
    assert np.array_equal(pixels(out), pixels(tmp_path / "fire_3_3.png"))
    crop = inpaint.crop_to_mask(inputs["odd"], str(inputs["odd_mask"]), 4, multiple=4)
    generated = library_pictures(tiny_sd1, crop.image, crop.mask, 2, cfg_weight=3)
    assert np.array_equal(pixels(out), np.asarray(crop.paste(generated.astype(np.float32) / 255)[0]))


def test_two_ranks_inpaint_the_files_of_one_process(tiny_sd1, inputs, tmp_path):
    other = picture(tmp_path / "b.png", 28, 36, 3)
    other_mask = box_mask(tmp_path / "b_mask.png", 28, 36, (0, 0, 12, 28))
    (tmp_path / "inputs.txt").write_text(f"{inputs['odd']}\t{inputs['odd_mask']}\n{other}\t{other_mask}\n")
    args = ["--images", "inputs.txt", PROMPT, "--model", tiny_sd1, "--inpaint-only-masked", 4, "--seeds", "1-2", "--batch_size", 1, *COMMON]
    i2i = str(ROOT / I2I)
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    launch_ok(launch_run([sys.executable, i2i, *args, "-o", "one/out.png"], tmp_path))
    launch_ok(launch_run(launch_command(2, i2i, *args, "-o", "two/out.png"), tmp_path))
    assert files(tmp_path / "one") == files(tmp_path / "two") == ["out_1.png", "out_2.png", "out_3.png", "out_4.png"]
    for name in files(tmp_path / "one"):
        assert np.array_equal(pixels(tmp_path / "one" / name), pixels(tmp_path / "two" / name)), name
    assert pixels(tmp_path / "two" / "out_2.png").shape == (70, 45, 3) and pixels(tmp_path / "two" / "out_3.png").shape == (28, 36, 3)


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written, before any weight is read


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_sd1):
    folder = tmp_path_factory.mktemp("bad_masks")
    picture(folder / "in.png", 32, 40, 0)
    box_mask(folder / "small.png", 16, 20, (2, 2, 8, 8))
    Image.new("L", (40, 32), 0).save(folder / "black.png")
    Image.new("L", (40, 32), 255).save(folder / "white.png")
    (folder / "text.png").write_text("not a picture")
    rgba = np.zeros((32, 40, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[4:20, 8:24] = (255, 255, 255, 0)  # A1111 reads transparent pixels as the mask; refused rather than guessed
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    box_mask(folder / "ok.png", 32, 40, (8, 4, 24, 20))
    # The UNet's weights are garbage: a check that ran after loading would report them instead.
    shutil.copytree(tiny_sd1, folder / "broken")
    for weights in (folder / "broken" / "unet").glob("*.safetensors"):
        weights.write_bytes(b"garbage")
    # An input whose sides are not multiples of the tiny VAE's 4 px, and a mask of one pixel just
    # above 50 % grey that shrinking the input to 40x32 (Lanczos: 140 -> 127) takes below: nothing left to repaint.
    picture(folder / "odd.png", 34, 42, 1)
    dot = np.zeros((34, 42), np.uint8)
    dot[17, 21] = 140
    Image.fromarray(dot, "L").save(folder / "dot.png")
    (folder / "three.txt").write_text(f"{folder / 'in.png'}\t{folder / 'ok.png'}\textra\n")
    (folder / "mixed.txt").write_text(f"{folder / 'in.png'}\t{folder / 'ok.png'}\n{folder / 'in.png'}\n")
    return folder


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mask", "{f}/small.png"], "the mask is 20x16 but the image is 40x32"),
        (["--mask", "{f}/black.png"], "all black: nothing to repaint"),
        (["--mask", "{f}/white.png"], "all white"),
        (["--mask", "{f}/white.png", "--invert-mask"], r"once inverted \(--invert-mask\): the mask is all black"),
        (["--mask", "{f}/black.png", "--invert-mask"], r"once inverted \(--invert-mask\): the mask is all white"),
        (["--mask", "{f}/text.png"], "not an image PIL can read"),
        (["--mask", "{f}/rgba.png"], "transparent pixels"),
        (["--mask", "{f}/missing.png"], "missing.png"),
        (["--mask", "{f}/ok.png", "--mask-blur", -1], "--mask-blur must be a finite number >= 0"),
        (["--mask", "{f}/ok.png", "--mask-blur", "nan"], "--mask-blur must be a finite number >= 0"),
        (["--mask", "{f}/ok.png", "--inpaint-only-masked", -4], "PADDING must be >= 0"),
        (["--mask-blur", 4], "--mask-blur applies to inpainting: add --mask"),
        (["--invert-mask"], "--invert-mask applies to inpainting"),
        (["--inpaint-only-masked"], "--inpaint-only-masked applies to inpainting"),
    ],
)
def test_a_bad_mask_is_one_line_exit_2_before_loading(bad, tmp_path, args, message):
    args = [str(a).format(f=bad) for a in args]
    result = run(I2I, bad / "in.png", PROMPT, "--model", bad / "broken", *args, "--steps", 2, "-o", tmp_path / "out.png")
    assert_usage_error(result, I2I, message)
    assert list(tmp_path.iterdir()) == []


def test_a_mask_the_resize_empties_is_one_line_exit_2_before_loading(bad, tmp_path):
    result = run(I2I, bad / "odd.png", PROMPT, "--model", bad / "broken", "--mask", bad / "dot.png", "-sd", 1, "--steps", 2, "-o", tmp_path / "out.png")
    assert_usage_error(result, I2I, "resized to 40x32: the mask is all black")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "listing, message",
    [("three.txt", r"line 1: .* is not IMAGE or IMAGE<TAB>MASK"), ("mixed.txt", "line 2 has no mask while others have one")],
)
def test_a_bad_images_list_is_one_line_exit_2(bad, tmp_path, listing, message):
    result = run(I2I, "--images", bad / listing, PROMPT, "--model", bad / "broken", "--steps", 2, "-o", tmp_path / "out.png")
    assert_usage_error(result, I2I, message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", [I2I, T2I])
def test_an_inpainting_model_without_a_mask_is_refused_before_loading(tiny_sd1_inpaint, bad, tmp_path, script):
    model = tmp_path / "model"
    shutil.copytree(tiny_sd1_inpaint, model)
    for weights in (model / "unet").glob("*.safetensors"):
        weights.write_bytes(b"garbage")
    out = tmp_path / "out" / "o.png"
    out.parent.mkdir()
    first = [bad / "in.png"] if script == I2I else []
    result = run(script, *first, PROMPT, "--model", model, "--steps", 2, "-o", out)
    assert_usage_error(result, script, "is an inpainting model .*(--mask|image2image.py)")
    assert list(out.parent.iterdir()) == []

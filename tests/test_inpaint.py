"""Inpainting's pure parts (stable_diffusion.inpaint) and 9-channel UNets, against diffusers 0.42.1.

The mask follows the inpainting pipelines' ``mask_processor`` (a VaeImageProcessor), the crop of
``padding_mask_crop`` its ``get_crop_region`` / ``apply_overlay``, the latent mask their
``prepare_mask_latents``, the 4-channel blend their denoising loop; a tiny 9-channel UNet loads from
a diffusers folder and from an LDM single file and matches diffusers' UNet2DConditionModel.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import load_image
from PIL import Image
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

import ldm_layout
import tiny_models
from parity import relative_error
from stable_diffusion import checkpoint, inpaint, model_io
from stable_diffusion.checkpoint import SingleFileSource
from stable_diffusion.config import SchedulerConfig, UNetConfig
from stable_diffusion.hub_configs import CONFIGS_DIR
from stable_diffusion.model_io import load_component
from stable_diffusion.sampler import DDIMSampler, EulerSampler
from stable_diffusion.unet import UNetModel

MASK_PROCESSOR = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
IMAGE_PROCESSOR = VaeImageProcessor(vae_scale_factor=8)
W0, H0 = 77, 53  # the mask's (and input image's) odd size
W, H = 64, 48  # the size generated at


def field(h, w, seed=0) -> np.ndarray:
    """A smooth random field in [0, 1] with much of it near 0.5, where binarising and resampling disagree most."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    f = sum(np.sin(x * rng.uniform(0.05, 0.4) + y * rng.uniform(0.05, 0.4) + rng.uniform(0, 6)) for _ in range(4))
    return (f - f.min()) / (f.max() - f.min())


def masks(h=H0, w=W0) -> dict:
    """The same kinds of mask diffusers' pipelines take: pictures (colour, greyscale) and float arrays.

    The arrays hold exact 0.5s (binarised to 1) in bands the nearest resize keeps.
    """
    a = field(h, w)
    a[::4] = 0.5
    rgb = np.stack([field(h, w, 1), a, field(h, w, 2)], axis=-1)
    return {
        "rgb picture": Image.fromarray(np.rint(rgb * 255).astype(np.uint8), "RGB"),
        "L picture": Image.fromarray(np.rint(a * 255).astype(np.uint8), "L"),
        "(H, W) float32": a.astype(np.float32),
        "(H, W, 1) float64": a[..., None],
    }


def as_picture(mask):
    """The 8-bit picture inpaint documents for an array that is blurred or cropped."""
    return mask if isinstance(mask, Image.Image) else Image.fromarray(np.rint(np.squeeze(mask) * 255).astype(np.uint8), "L")


def reference_mask(mask, height=H, width=W, blur=0, crop=None) -> np.ndarray:
    if blur or crop is not None:
        mask = as_picture(mask)
    if blur:
        mask = MASK_PROCESSOR.blur(mask, blur)
    options = dict(crops_coords=crop, resize_mode="fill") if crop is not None else {}
    out = MASK_PROCESSOR.preprocess(mask, height=height, width=width, **options)
    return out[0, 0].numpy()


# ---------------------------------------------------------------------------------------------
# Mask processing


@pytest.mark.parametrize("blur", [0, 3])
@pytest.mark.parametrize("kind", list(masks()))
def test_prepare_mask_matches_diffusers_mask_processor(kind, blur):
    mask = masks()[kind]
    ours = inpaint.prepare_mask(mask, H, W, blur=blur)
    theirs = reference_mask(mask, blur=blur)
    assert ours.shape == (H, W) and ours.dtype == np.float32
    assert set(np.unique(ours)) == {0.0, 1.0}
    np.testing.assert_array_equal(ours, theirs)
    # load_mask(blur=...) then prepare_mask is the same path.
    np.testing.assert_array_equal(inpaint.prepare_mask(inpaint.load_mask(mask, (W0, H0), blur=blur), H, W), theirs)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_mask_file_reads_as_diffusers_load_image_reads_it(tmp_path, mode):
    a = field(H0, W0, 3)
    values = {"RGB": np.stack([a, field(H0, W0, 4), a], -1), "L": a}
    path = tmp_path / "mask.png"
    Image.fromarray(np.rint(values[mode] * 255).astype(np.uint8), mode).save(path)
    theirs = MASK_PROCESSOR.preprocess(load_image(str(path)), height=H, width=W)[0, 0].numpy()
    np.testing.assert_array_equal(inpaint.prepare_mask(str(path), H, W), theirs)
    np.testing.assert_array_equal(inpaint.prepare_mask(path, H, W, blur=2), reference_mask(load_image(str(path)), blur=2))


def test_a_mask_file_with_exif_orientation_is_turned_as_load_image_turns_it(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the picture is stored W0 tall
    path = tmp_path / "rotated.png"
    Image.fromarray(np.rint(field(W0, H0, 5) * 255).astype(np.uint8), "L").save(path, exif=exif)
    assert load_image(str(path)).size == (W0, H0)
    assert inpaint.load_mask(str(path), (W0, H0)).size == (W0, H0)
    theirs = MASK_PROCESSOR.preprocess(load_image(str(path)), height=H, width=W)[0, 0].numpy()
    np.testing.assert_array_equal(inpaint.prepare_mask(str(path), H, W), theirs)


def test_nearest_resize_picks_the_pixels_torch_interpolate_picks():
    sizes = [(53, 48), (77, 64), (48, 6), (64, 8), (7, 3), (3, 7), (5, 10), (16, 16), (999, 1000), (1000, 999), (480, 60), (100, 33), (33, 100)]
    sizes += [(26, 22), (45, 39), (52, 46), (2, 82), (3, 123)]  # where a float64 scale picks other pixels than torch's float32 one
    rng = np.random.default_rng(0)
    for n_in, n_out in sizes:
        a = rng.random((n_in, n_in + 1)).astype(np.float32)
        theirs = torch.nn.functional.interpolate(torch.from_numpy(a)[None, None], size=(n_out, n_out + 2))[0, 0].numpy()
        np.testing.assert_array_equal(inpaint.nearest_resize(a, n_out, n_out + 2), theirs, err_msg=f"{n_in} -> {n_out}")


def test_latent_mask_and_masked_image_match_prepare_mask_latents():
    mask = inpaint.prepare_mask(masks()["rgb picture"], H, W)
    rng = np.random.default_rng(1)
    image = rng.uniform(-1, 1, (H, W, 3)).astype(np.float32)
    for factor in (8, 4):
        pipe = type("Pipe", (), {"vae_scale_factor": factor})()  # prepare_mask_latents reads only this
        masked_latents = torch.zeros(1, 4, H // factor, W // factor)  # 4 channels: taken as latents, not encoded
        theirs, _ = StableDiffusionInpaintPipeline.prepare_mask_latents(
            pipe, torch.from_numpy(mask)[None, None], masked_latents, 1, H, W, torch.float32, "cpu", None, False
        )
        ours = inpaint.latent_mask(mask, factor)
        assert ours.shape == (1, H // factor, W // factor, 1)
        np.testing.assert_array_equal(ours, theirs.numpy().transpose(0, 2, 3, 1))
    # The pipeline's masked image: init_image * (mask_condition < 0.5), NCHW there.
    init = torch.from_numpy(image.transpose(2, 0, 1))[None]
    theirs = (init * (torch.from_numpy(mask)[None, None] < 0.5))[0].numpy().transpose(1, 2, 0)
    np.testing.assert_array_equal(inpaint.masked_image(image, mask), theirs)


# ---------------------------------------------------------------------------------------------
# "Only masked": padding_mask_crop


def box_masks():
    """Rectangles anywhere (at the edges too), some with a faint speck the box must take in, and smooth blobs."""
    rng = np.random.default_rng(7)
    out = []
    for _ in range(40):
        a = np.zeros((H0, W0), np.uint8)
        x1, y1 = rng.integers(0, W0), rng.integers(0, H0)
        x2, y2 = rng.integers(x1 + 1, W0 + 1), rng.integers(y1 + 1, H0 + 1)
        a[y1:y2, x1:x2] = rng.integers(128, 256)
        black = np.argwhere(a == 0)
        if len(black) and rng.random() < 0.5:  # below 0.5 yet not black: get_crop_region counts every non-black pixel
            a[tuple(black[rng.integers(len(black))])] = rng.integers(1, 128)
        out.append(Image.fromarray(a, "L"))
    out.append(Image.fromarray((field(H0, W0, 5) > 0.8).astype(np.uint8) * 255, "L"))
    out.append(masks()["rgb picture"])
    return out


@pytest.mark.parametrize("size", [("64", 32), (64.0, 32), (-8, 32), (64, 30), (True, 32)])
def test_crop_to_mask_refuses_a_bad_generation_size_in_one_valueerror(size):
    mask = np.zeros((32, 48), np.float32)
    mask[8:16, 8:24] = 1
    with pytest.raises(ValueError, match="must be whole numbers > 0, multiples of 8"):
        inpaint.crop_to_mask(Image.new("RGB", (48, 32)), mask, 4, *size)


def test_crop_region_matches_get_crop_region():
    checked = 0
    for mask in box_masks():
        for width, height in ((W, H), (H, W), (64, 64), (512, 768), (1024, 576)):
            for pad in (0, 5, 32, 200):
                theirs = MASK_PROCESSOR.get_crop_region(mask, width, height, pad=pad)
                assert inpaint.crop_region(mask, width, height, pad) == tuple(theirs), (mask.getbbox(), width, height, pad)
                checked += 1
    assert checked > 500


@pytest.mark.parametrize("crop", ["region", (10, 5, 40, 50), (0, 20, 77, 30)])
def test_cropped_mask_and_image_match_preprocess_with_crops_coords_and_fill(crop):
    """get_crop_region's box, and boxes of other aspects that leave bands to fill (above/below, left/right)."""
    mask = masks()["rgb picture"]
    if crop == "region":
        crop = MASK_PROCESSOR.get_crop_region(mask, W, H, pad=4)
    np.testing.assert_array_equal(inpaint.prepare_mask(mask, H, W, crop=crop), reference_mask(mask, crop=crop))
    image = Image.fromarray((np.random.default_rng(2).random((H0, W0, 3)) * 255).astype(np.uint8), "RGB")
    theirs = IMAGE_PROCESSOR.preprocess(image, height=H, width=W, crops_coords=crop, resize_mode="fill")[0].numpy()
    ours = np.asarray(inpaint.crop_and_fill(image, crop, W, H))
    np.testing.assert_array_equal(ours, np.rint((theirs.transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8))


@pytest.mark.parametrize("blurred", [False, True])
def test_apply_overlay_matches_diffusers(blurred):
    rng = np.random.default_rng(3)
    original = Image.fromarray((rng.random((H0, W0, 3)) * 255).astype(np.uint8), "RGB")
    mask = box_masks()[0]
    mask = MASK_PROCESSOR.blur(mask, 2) if blurred else mask
    crop = MASK_PROCESSOR.get_crop_region(mask, W, H, pad=3)
    generated = Image.fromarray((rng.random((H, W, 3)) * 255).astype(np.uint8), "RGB")
    ours = inpaint.apply_overlay(mask, original, generated, crop)
    theirs = IMAGE_PROCESSOR.apply_overlay(mask, original, generated, crop)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    same_size = generated.resize(original.size)
    np.testing.assert_array_equal(
        np.asarray(inpaint.apply_overlay(mask, original, same_size)), np.asarray(IMAGE_PROCESSOR.apply_overlay(mask, original, same_size))
    )


# ---------------------------------------------------------------------------------------------
# The 4-channel blend


SCHEDULER = dict(tiny_models.SD1_SCHEDULER, timestep_spacing="leading")


@pytest.mark.parametrize("start_step", [0, 4], ids=["strength 1", "strength 0.6"])
@pytest.mark.parametrize("ours_cls, theirs_cls", [(EulerSampler, EulerDiscreteScheduler), (DDIMSampler, DDIMScheduler)], ids=["euler", "ddim"])
def test_blend_known_follows_the_inpainting_loop(ours_cls, theirs_cls, start_step):
    """A model stand-in (a fixed function of the input and t) through both loops: latents after every step."""
    n = 10
    rng = np.random.default_rng(4)
    shape = (1, 4, 6, 8)
    image_latents, noise, x0, bias = (rng.standard_normal(shape).astype(np.float32) for _ in range(4))
    mask = (rng.random((1, 1, 6, 8)) > 0.5).astype(np.float32)

    def model(x, t, bias):
        return 0.3 * x + bias * (float(t) / 1000)

    theirs_sched = theirs_cls.from_config({**SCHEDULER, "_class_name": theirs_cls.__name__})
    theirs_sched.set_timesteps(n)
    if hasattr(theirs_sched, "set_begin_index"):  # as the pipeline's get_timesteps does
        theirs_sched.set_begin_index(start_step)
    timesteps = theirs_sched.timesteps[start_step:]
    latents, mask_t, image_t, noise_t = (torch.from_numpy(a) for a in (x0, mask, image_latents, noise))
    theirs = []
    for i, t in enumerate(timesteps):
        eps = model(theirs_sched.scale_model_input(latents, t), t, torch.from_numpy(bias))
        latents = theirs_sched.step(eps, t, latents, return_dict=False)[0]
        proper = image_t
        if i < len(timesteps) - 1:
            proper = theirs_sched.add_noise(proper, noise_t, torch.tensor([timesteps[i + 1]]))
        latents = (1 - mask_t) * proper + mask_t * latents
        theirs.append(latents.numpy().transpose(0, 2, 3, 1))

    sampler = ours_cls(SchedulerConfig.from_dict({**SCHEDULER, "_class_name": theirs_cls.__name__}))
    sampler.set_timesteps(n)
    nhwc = lambda a: mx.array(a.transpose(0, 2, 3, 1))  # noqa: E731
    x, m, known, z, b = nhwc(x0), nhwc(mask), nhwc(image_latents), nhwc(noise), nhwc(bias)
    ours = []
    for i in range(start_step, len(sampler.timesteps)):
        eps = model(sampler.scale_model_input(x, i), sampler.timesteps[i].item(), b)
        x = inpaint.blend_known(sampler.step(eps, i, x), known, z, mask.transpose(0, 2, 3, 1), sampler, i)  # latent_mask's numpy
        assert isinstance(x, mx.array)
        ours.append(np.array(x))
    assert len(ours) == len(theirs) == n - start_step
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert relative_error(a, b) <= 1e-5, step
    # The known region ends as the clean image latents.
    kept = np.broadcast_to(np.array(m) == 0, ours[-1].shape)
    np.testing.assert_array_equal(ours[-1][kept], np.array(known)[kept])


# ---------------------------------------------------------------------------------------------
# Bad masks: one line each


def transparent(mode):
    """A white-and-grey picture with a transparent corner."""
    if mode == "P":
        index = np.ones((H0, W0), np.uint8)
        index[:10, :10] = 0
        index[20:, :] = 2
        picture = Image.fromarray(index, "P")
        picture.putpalette([0, 0, 0, 255, 255, 255, 90, 90, 90])
        picture.info["transparency"] = 0
        return picture
    a = np.full((H0, W0, 4), 255, np.uint8)
    a[20:, :, :3] = 90
    a[:10, :10, 3] = 0
    picture = Image.fromarray(a, "RGBA")
    return picture if mode == "RGBA" else picture.convert(mode)


BAD_MASKS = {
    "all black": (np.zeros((H0, W0), np.float32), "all black"),
    "all white": (np.ones((H0, W0), np.float32), "all white"),
    "all white picture": (Image.new("L", (W0, H0), 255), "all white"),
    "nothing >= 0.5": (np.full((H0, W0), 0.49, np.float32), "all black"),
    "NaN": (np.where(field(H0, W0) > 0.5, np.nan, 0.2).astype(np.float32), "NaN"),
    "uint8 array": ((field(H0, W0) * 255).astype(np.uint8), "uint8"),
    "bool array": (field(H0, W0) > 0.5, "bool"),
    "RGB array": (np.stack([field(H0, W0)] * 3, -1), r"\(H, W\)"),
    "above 1": (field(H0, W0) * 2, r"\[0, 1\]"),
    "below 0": (field(H0, W0) - 0.5, r"\[0, 1\]"),
    "a list": (field(H0, W0).tolist(), "must be a picture"),
    "RGBA with transparency": (transparent("RGBA"), "transparent"),
    "LA with transparency": (transparent("LA"), "transparent"),
    "P with a transparent colour": (transparent("P"), "transparent"),
    "size mismatch": (field(H0 + 1, W0).astype(np.float32), "the mask is 77x54 but the image is 77x53"),
    "picture size mismatch": (Image.new("L", (W0 - 1, H0), 128), "76x53"),
}


@pytest.mark.parametrize("name", list(BAD_MASKS))
def test_bad_masks_are_one_clear_line(name):
    mask, message = BAD_MASKS[name]
    with pytest.raises(ValueError, match=message) as e:
        inpaint.load_mask(mask, (W0, H0))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "name, write, message",
    [
        ("text", lambda p: p.write_text("not a picture"), "not an image"),
        ("truncated", lambda p: p.write_bytes(_png_bytes()[:200]), "corrupt or truncated"),
        ("rgba", lambda p: transparent("RGBA").save(p), "transparent"),
        ("missing", lambda p: None, "does not exist"),
        ("folder", lambda p: p.mkdir(), "is a directory"),
    ],
)
def test_bad_mask_files_are_one_clear_line_naming_the_file(tmp_path, name, write, message):
    path = tmp_path / f"{name}.png"
    write(path)
    with pytest.raises(ValueError, match=message) as e:
        inpaint.load_mask(str(path), (W0, H0))
    assert "\n" not in str(e.value) and "mask" in str(e.value) and name in str(e.value)


def _png_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray((field(H0, W0) * 255).astype(np.uint8), "L").save(buffer, format="PNG")
    return buffer.getvalue()


def test_opaque_alpha_and_blur_and_padding_arguments():
    opaque = Image.fromarray(np.dstack([np.rint(field(H0, W0) * 255).astype(np.uint8)] * 3 + [np.full((H0, W0), 255, np.uint8)]), "RGBA")
    np.testing.assert_array_equal(inpaint.prepare_mask(opaque, H, W), reference_mask(opaque))
    for blur in (-1, float("nan"), "3", True):
        with pytest.raises(ValueError, match="mask blur"):
            inpaint.load_mask(opaque, blur=blur)
    for padding in (-1, 2.5, None):
        with pytest.raises(ValueError, match="padding"):
            inpaint.crop_region(opaque, W, H, padding)
    # A blur that spreads a speck below 0.5 everywhere leaves nothing to repaint.
    speck = np.zeros((H0, W0), np.float32)
    speck[20, 30] = 1
    with pytest.raises(ValueError, match="all black"):
        inpaint.load_mask(speck, blur=4)


# ---------------------------------------------------------------------------------------------
# 9-channel UNets


def reference_unet_output(unet_dir, x, t, context) -> np.ndarray:
    unet = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    with torch.no_grad():
        out = unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.tensor(t), encoder_hidden_states=torch.from_numpy(context)).sample
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def tiny_sd1_inpaint(tmp_path_factory, clip_vocab_dir):
    return tiny_models.build_sd(tmp_path_factory.mktemp("tiny_sd1_inpaint"), clip_vocab_dir, "sd1", inpaint=True)


def unet_inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 16, 16, 9)).astype(np.float32)  # latents, mask, masked-image latents
    x[..., 4] = rng.random((2, 16, 16)) > 0.5
    return x, rng.standard_normal((2, 7, 32)).astype(np.float32)


def test_a_9_channel_unet_from_a_diffusers_folder_matches_diffusers(tiny_sd1_inpaint):
    model = load_component(tiny_sd1_inpaint, "unet", UNetModel, UNetConfig)
    assert model.config.in_channels == 9
    x, context = unet_inputs()
    ours = np.array(model(mx.array(x), mx.array(517.3), mx.array(context)))
    assert relative_error(ours, reference_unet_output(tiny_sd1_inpaint / "unet", x, 517.3, context)) <= 1e-5


@pytest.fixture(scope="module")
def tiny_inpaint(tmp_path_factory, clip_vocab_dir, tiny_sd1_inpaint):
    """family -> a tiny 9-channel diffusers folder of that family."""
    folders = {"sd1": tiny_sd1_inpaint}

    def get(family):
        if family not in folders:
            root = tmp_path_factory.mktemp(f"tiny_{family}_inpaint")
            folders[family] = (
                tiny_models.build_sdxl(root, clip_vocab_dir, inpaint=True) if family == "sdxl" else tiny_models.build_sd(root, clip_vocab_dir, family, inpaint=True)
            )
        return folders[family]

    return get


def write_ldm_file(folder, family, path):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2") if family == "sdxl" else None
    state = ldm_layout.pipeline_to_ldm(family, unet, vae, text_encoder, text_encoder_2)
    assert tuple(state["model.diffusion_model.input_blocks.0.0.weight"].shape)[1] == 9
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_a_9_channel_ldm_single_file_converts_as_diffusers_from_single_file(tiny_inpaint, tmp_path, family):
    import diffusers

    folder = tiny_inpaint(family)
    path = write_ldm_file(folder, family, tmp_path / f"tiny_{family}_inpainting.safetensors")
    src = SingleFileSource(path, configs=model_io.FolderSource(folder))
    assert (src.family, src.inpainting) == (family, True)
    # The same tensors diffusers' own single-file loader reads for its inpainting pipeline.
    cls = diffusers.StableDiffusionXLInpaintPipeline if family == "sdxl" else diffusers.StableDiffusionInpaintPipeline
    options = {} if family == "sdxl" else {"safety_checker": None}
    pipe = cls.from_single_file(str(path), config=str(folder), local_files_only=True, **options)
    assert pipe.unet.config.in_channels == 9
    weights, _ = src.weights("unet")
    theirs = dict(pipe.unet.named_parameters())
    assert sorted(weights) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(np.array(weights[key]), value.detach().numpy(), err_msg=key)
    model = load_component(SingleFileSource(path, configs=model_io.FolderSource(folder)), "unet", UNetModel, UNetConfig)
    assert model.conv_in.weight.shape[-1] == 9


def test_a_9_channel_unet_from_an_ldm_single_file_matches_diffusers(tiny_sd1_inpaint, tmp_path):
    path = write_ldm_file(tiny_sd1_inpaint, "sd1", tmp_path / "tiny_inpainting.safetensors")
    model = load_component(SingleFileSource(path, configs=model_io.FolderSource(tiny_sd1_inpaint)), "unet", UNetModel, UNetConfig)
    x, context = unet_inputs(1)
    ours = np.array(model(mx.array(x), mx.array(20.7), mx.array(context)))
    assert relative_error(ours, reference_unet_output(tiny_sd1_inpaint / "unet", x, 20.7, context)) <= 1e-5


# The 9-channel telling keys of each family, as the real checkpoints hold them.
CONV_IN_9 = {"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}
FAMILY_KEYS = {
    "sd1": {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)},
    "sd2": {"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
    "sdxl": {"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,)},
}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_inpainting_checkpoints_are_detected_as_diffusers_detects_them(tmp_path, family):
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS, infer_diffusers_model_type

    shapes = {**CONV_IN_9, **FAMILY_KEYS[family]}
    path = tmp_path / "inpainting.safetensors"
    save_numpy({k: np.zeros(s, np.float16) for k, s in shapes.items()}, str(path))
    model_type = infer_diffusers_model_type({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    src = SingleFileSource(path)
    assert (src.family, src.inpainting, src.configs.model_type) == (family, True, model_type)
    repo = DIFFUSERS_DEFAULT_PIPELINE_PATHS[model_type]["pretrained_model_name_or_path"]
    # diffusers still names the stabilityai SD 2 repo, removed from the Hub; its mirror stands in.
    assert src.configs.repo == model_io.REMOVED_REPOS.get(repo, repo)
    assert src.config("unet")["in_channels"] == 9
    pipeline = {"sd1": "StableDiffusionInpaintPipeline", "sd2": "StableDiffusionInpaintPipeline", "sdxl": "StableDiffusionXLInpaintPipeline"}
    assert src.model_index()["_class_name"] == pipeline[family]
    # SD 2-inpainting is a 512 px epsilon model (2-base's configs), unlike plain SD 2.x files (768 px v-prediction).
    if family == "sd2":
        assert src.config("scheduler")["prediction_type"] == "epsilon" and src.config("unet")["sample_size"] == 64
    base = {"sd1": "stable-diffusion-v1-5", "sd2": "stable-diffusion-2-1-base", "sdxl": "stable-diffusion-xl-base-1.0"}[family]
    for component in ("vae", "text_encoder"):
        assert src.config(component) == json.loads((CONFIGS_DIR / base / component / "config.json").read_bytes())


def test_the_removed_sd2_inpainting_repo_points_to_its_mirror():
    with pytest.raises(model_io.ModelLoadError, match="sd2-community/stable-diffusion-2-inpainting"):
        model_io.resolve("stabilityai/stable-diffusion-2-inpainting")


# diffusers/stable-diffusion-xl-1.0-inpainting-0.1's unet/config.json. The Hub file could not be read
# from here; these values are a verbatim copy of it found in a public repository's source (a JSON
# string beside the SDXL base config), and a second repository's copy agrees on the EMA keys.
SDXL_INPAINTING_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.21.0.dev0",
    "_name_or_path": "valhalla/sdxl-inpaint-ema",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "attention_type": "default",
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "decay": 0.9999,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 9,
    "inv_gamma": 1.0,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "min_decay": 0.0,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "optimization_step": 37000,
    "out_channels": 4,
    "power": 0.6666666666666666,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "update_after_step": 0,
    "use_ema_warmup": False,
    "use_linear_projection": True,
}


def test_the_real_sdxl_inpainting_unet_config_reads_with_its_ema_keys_ignored():
    ours = UNetConfig.from_dict(SDXL_INPAINTING_UNET)
    assert ours.in_channels == 9
    # diffusers builds the same model from it (the EMA keys are not UNet2DConditionModel arguments) ...
    with torch.device("meta"):
        theirs = UNet2DConditionModel.from_config(SDXL_INPAINTING_UNET)
    assert theirs.conv_in.in_channels == 9
    # ... and it is SDXL base's with 9 input channels: what an SDXL inpainting single file gets here.
    ema = ("decay", "optimization_step", "inv_gamma", "min_decay", "power", "update_after_step", "use_ema_warmup")
    assert all(k in SDXL_INPAINTING_UNET for k in ema)
    assert ours == UNetConfig.from_dict(checkpoint.InpaintingConfigs("sdxl").config("unet"))
    assert ours == UNetConfig.from_dict({k: v for k, v in SDXL_INPAINTING_UNET.items() if k not in ema})

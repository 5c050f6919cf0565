""""Only masked" inpainting end to end vs diffusers' ``padding_mask_crop`` on the same tiny weights and noise.

Ours: ``inpaint.crop_to_mask`` -> ``generate_latents_from_image(crop.image, mask=crop.mask)`` ->
``crop.paste(decode(...))``; diffusers: StableDiffusion(XL)InpaintPipeline(image=PIL, mask_image=PIL,
padding_mask_crop=P, height, width), which returns PIL pictures only. On pictures of odd sizes with
masks at the borders (the box grown to the generation's aspect is shifted back inside the picture),
9- and 4-channel UNets, SD1 and SDXL.

Three checks per run, each against diffusers:
1. the crop box is ``mask_processor.get_crop_region``'s, and the generated pictures of the crop
   (decoded, in [0, 1], before the paste; captured from the pipeline's postprocess) match to 1e-4
   relative, the inpainting parity tests' float32 bound;
2. the paste is diffusers' ``apply_overlay`` exactly: our pictures put back by diffusers' own
   numpy_to_pil + apply_overlay are byte-equal to ``crop.paste``'s;
3. the final uint8 pictures: equal outside the crop box (the original); inside, they differ only
   through the rounding of the generated pictures to uint8. Check 1 bounds the float difference by
   1e-4 x max|ref| <= 1e-4 (pictures in [0, 1]), 0.0255 of a level, so a value can round to the other
   side of a half level only: the uint8 crops differ by at most 1 level (checked). apply_overlay
   Lanczos-resizes the crop into the box in two separable passes, each rounding to uint8: a pass
   changes an output by at most its kernel's L1 norm (Lanczos-3: < 1.3) times the input change,
   rounded up: <= 2 after the first pass, <= 3 after the second; alpha compositing with the kept
   original only scales it by (1 - alpha) <= 1. So the final pictures differ by at most 3 levels.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image

from parity import nhwc, relative_error, run_latents, torch_step_noise
from stable_diffusion import StableDiffusion, StableDiffusionXL, images, inpaint

PROMPT = "A photo of an astronaut riding a horse on Mars."
RESIZE_LEVELS = 3  # see the module docstring, check 3


def original_and_mask(width, height, box, grey_box=None, seed=0):
    """A random RGB picture and a mask picture: white in ``box`` (x1, y1, x2, y2), grey 150 in ``grey_box``
    (binarised to white for the generation, kept partly in the paste, whose alpha is the mask itself)."""
    rng = np.random.default_rng(seed)
    picture = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    mask = np.zeros((height, width), np.uint8)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = 255
    if grey_box is not None:
        x1, y1, x2, y2 = grey_box
        mask[y1:y2, x1:x2] = 150
    return picture, Image.fromarray(mask, "L")


@pytest.fixture
def posterior_mean(monkeypatch):
    """diffusers' inpainting pipelines sample the VAE posterior; we encode its mean. Make diffusers do the same."""
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as sd_module
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint as xl_module
    from diffusers.pipelines.controlnet import pipeline_controlnet_inpaint as controlnet_module

    for module in (sd_module, xl_module, controlnet_module):
        retrieve = module.retrieve_latents
        monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None, sample_mode="sample", r=retrieve: r(out, generator, "argmax"))


def reference(folder, xl, sampler):
    import diffusers

    if xl:
        pipe = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(folder)
    else:
        pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.scheduler = getattr(diffusers, {"euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler"}[sampler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def capture_postprocess(pipe):
    """Record what the pipeline's postprocess gets (the decoded pictures in [-1, 1]) and returns (PIL, before the paste)."""
    seen = {}
    postprocess = pipe.image_processor.postprocess

    def recording(image, *args, **kwargs):
        seen["decoded"] = image.detach().clone()
        seen["pictures"] = postprocess(image, *args, **kwargs)
        return seen["pictures"]

    pipe.image_processor.postprocess = recording
    return seen


def run_both(folder, xl, picture, mask, padding, width, height, strength, sampler="euler", n=1, cfg=6.0):
    facade = StableDiffusionXL if xl else StableDiffusion
    sd = facade(str(folder), sampler=sampler)
    crop = inpaint.crop_to_mask(picture, mask, padding, width=width, height=height)
    assert crop.image.size == crop.mask.size == (width, height)
    noise = torch.randn((n, 4, height // 4, width // 4), generator=torch.Generator().manual_seed(7))
    latents = run_latents(
        sd.generate_latents_from_image(
            images.to_model_input(crop.image), PROMPT, mask=crop.mask, n_images=n, num_steps=6, strength=strength, cfg_weight=cfg,
            negative_text="blurry", noise=nhwc(noise), step_noise=torch_step_noise(seed=7, skip=1),  # diffusers draws the start noise first
        )
    )  # fmt: skip
    decoded = np.array(sd.decode(latents[-1]))
    ours = crop.paste(decoded)

    pipe = reference(folder, xl, sampler)
    seen = capture_postprocess(pipe)
    ref = pipe(
        PROMPT, image=picture, mask_image=mask, padding_mask_crop=padding, height=height, width=width, num_inference_steps=6, strength=strength,
        guidance_scale=cfg, negative_prompt="blurry", num_images_per_prompt=n, generator=torch.Generator().manual_seed(7),
    ).images  # fmt: skip
    return crop, decoded, ours, pipe, seen, ref


def assert_matches_diffusers(crop, decoded, ours, pipe, seen, ref, picture, mask, padding, width, height):
    # 1. the box and the generation
    box = pipe.mask_processor.get_crop_region(mask, width, height, pad=padding)
    assert tuple(crop.box) == tuple(box)
    reference_decoded = (seen["decoded"] / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    error = relative_error(decoded, reference_decoded)
    assert error <= 1e-4, error

    # 2. the paste is apply_overlay's, byte for byte, on the same pictures
    as_pil = pipe.image_processor.numpy_to_pil(decoded)
    pasted = [pipe.image_processor.apply_overlay(mask, picture, p, box) for p in as_pil]
    assert len(ours) == len(ref) == len(decoded)
    for a, b in zip(ours, pasted):
        assert a.size == picture.size and a.mode == "RGB"
        assert np.array_equal(np.asarray(a), np.asarray(b))

    # 3. the final pictures: the original outside the box, rounding-level differences inside
    x1, y1, x2, y2 = box
    for a, b, mine, theirs in zip(ours, ref, as_pil, seen["pictures"]):
        assert np.abs(np.asarray(mine, np.int16) - np.asarray(theirs, np.int16)).max() <= 1
        a, b = np.asarray(a, np.int16), np.asarray(b, np.int16)
        outside = np.ones(a.shape[:2], bool)
        outside[y1:y2, x1:x2] = False
        assert np.array_equal(a[outside], np.asarray(picture, np.int16)[outside])
        assert np.array_equal(a[outside], b[outside])
        assert np.abs(a - b).max() <= RESIZE_LEVELS


CASES = {
    # name: (picture width, height, white box, grey box, padding, generation width, height)
    "bottom-right-edge": (61, 45, (47, 30, 61, 45), (40, 36, 47, 41), 6, 40, 32),
    "top-left-corner-no-padding": (53, 39, (0, 0, 9, 13), None, 0, 32, 32),
    "wide-strip-at-top-big-padding": (57, 43, (3, 0, 55, 5), (10, 5, 20, 8), 32, 40, 32),  # the box is the whole picture
    "tall-strip-at-right": (45, 61, (40, 7, 45, 50), None, 4, 32, 40),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("model, strength", [("tiny_sd1_inpaint", 1.0), ("tiny_sd1", 0.6)])
def test_sd_only_masked_matches_diffusers_padding_mask_crop(request, posterior_mean, case, model, strength):
    width, height, box, grey, padding, gen_w, gen_h = CASES[case]
    picture, mask = original_and_mask(width, height, box, grey)
    run = run_both(request.getfixturevalue(model), False, picture, mask, padding, gen_w, gen_h, strength)
    assert_matches_diffusers(*run, picture, mask, padding, gen_w, gen_h)


@pytest.mark.parametrize("model, strength, sampler", [("tiny_sdxl_inpaint", 1.0, "euler"), ("tiny_sdxl", 0.6, "euler_a")])
def test_sdxl_only_masked_matches_diffusers_padding_mask_crop(request, posterior_mean, model, strength, sampler):
    width, height, box, grey, padding, gen_w, gen_h = CASES["bottom-right-edge"]
    picture, mask = original_and_mask(width, height, box, grey)
    run = run_both(request.getfixturevalue(model), True, picture, mask, padding, gen_w, gen_h, strength, sampler=sampler, n=2)
    assert_matches_diffusers(*run, picture, mask, padding, gen_w, gen_h)


@pytest.fixture(scope="module")
def sd1_controlnet(tmp_path_factory):
    """A tiny ControlNet for tiny_sd1 (two stride-2 hint convs for the tiny VAE's 4x), every parameter random."""
    import tiny_models

    folder = tmp_path_factory.mktemp("crop_controlnet") / "cn"
    tiny_models.build_controlnet(folder, tiny_models.SD1_UNET, seed=5, conditioning_embedding_out_channels=(16, 32, 32))
    return folder


@pytest.mark.parametrize("model", ["tiny_sd1_inpaint", "tiny_sd1"])
def test_only_masked_with_a_controlnet_crops_the_control_picture_as_diffusers(request, posterior_mean, sd1_controlnet, model):
    """StableDiffusionControlNetInpaintPipeline with padding_mask_crop crops the control picture with the
    mask's box and fills it to the generation's size, as the image (control_image_processor.preprocess
    with crops_coords, resize_mode="fill"): inpaint.crop_and_fill(control, crop.box, ...) is that."""
    import diffusers

    from stable_diffusion import Control, load_controlnet

    width, height, box, grey, padding, gen_w, gen_h = CASES["bottom-right-edge"]
    picture, mask = original_and_mask(width, height, box, grey)
    control = Image.fromarray(np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    folder = request.getfixturevalue(model)
    noise = torch.randn((1, 4, gen_h // 4, gen_w // 4), generator=torch.Generator().manual_seed(7))

    sd = StableDiffusion(str(folder), sampler="euler")
    crop = inpaint.crop_to_mask(picture, mask, padding, width=gen_w, height=gen_h)
    controls = [Control(load_controlnet(str(sd1_controlnet)), inpaint.crop_and_fill(control, crop.box, gen_w, gen_h), 0.8, 0.0, 1.0)]
    latents = run_latents(
        sd.generate_latents_from_image(
            images.to_model_input(crop.image), PROMPT, mask=crop.mask, num_steps=6, strength=0.6, cfg_weight=6.0, negative_text="blurry",
            noise=nhwc(noise), controls=controls,
        )
    )  # fmt: skip
    decoded = np.array(sd.decode(latents[-1]))
    ours = crop.paste(decoded)

    pipe = diffusers.StableDiffusionControlNetInpaintPipeline.from_pretrained(
        folder, controlnet=diffusers.ControlNetModel.from_pretrained(sd1_controlnet), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )  # fmt: skip
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    seen = capture_postprocess(pipe)
    ref = pipe(
        PROMPT, image=picture, mask_image=mask, control_image=control, padding_mask_crop=padding, height=gen_h, width=gen_w, num_inference_steps=6,
        strength=0.6, guidance_scale=6.0, negative_prompt="blurry", controlnet_conditioning_scale=0.8, generator=torch.Generator().manual_seed(7),
    ).images  # fmt: skip
    assert_matches_diffusers(crop, decoded, ours, pipe, seen, ref, picture, mask, padding, gen_w, gen_h)

"""Inpainting's pure parts: the mask as diffusers reads it, "only masked" crops, the 4-channel blend.

Follows diffusers 0.42.1's inpainting pipelines (``StableDiffusionInpaintPipeline``,
``StableDiffusionXLInpaintPipeline``) and their mask processor, ``VaeImageProcessor(do_normalize=False,
do_binarize=True, do_convert_grayscale=True)``: a picture mask is resized with Lanczos to the
image's size, made greyscale and binarised at 0.5 (white = repaint); an array mask is resized
nearest-neighbour (``torch.nn.functional.interpolate``'s default) and binarised. ``blur`` is
``VaeImageProcessor.blur`` (PIL's GaussianBlur) applied to the mask as given, as diffusers' docs do
before calling the pipeline. ``padding_mask_crop`` ("only masked") is ``get_crop_region``, the
crop-and-fill of ``preprocess(..., crops_coords, resize_mode="fill")`` and ``apply_overlay``.

PIL blurs, crops and pastes 8-bit pictures only: an array mask that is blurred or cropped is
taken as the 8-bit greyscale picture it would be saved as (``round(255 * mask)``).

The order a pipeline calls these in::

    mask = load_mask(mask, image_size=(W0, H0), blur=blur)  # validated once, ValueError otherwise
    crop = crop_region(mask, width, height, padding) if padding is not None else None
    pixels = prepare_mask(mask, height, width, crop=crop)   # (H, W) in {0, 1}
    image_latents <- VAE(image); masked <- VAE(masked_image(image, pixels))
    m = latent_mask(pixels, vae_scale_factor)               # (1, h, w, 1)
    9-channel UNet: concat([scale_model_input(x), m, masked latents]) on the channel axis
    4-channel UNet: x = blend_known(step(...), image_latents, noise, m, sampler, i) after each call
    (the two as Inpainting.unet_input / Inpainting.after_step, which the facades' loop calls)
    picture = apply_overlay(mask, original, decoded, crop)  # only with a crop, as diffusers
"""

from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image, ImageFilter, ImageOps

from .images import load_image, open_picture, size_to_multiple, to_rgb

MASK_KINDS = "a picture file, a PIL image or an (H, W) / (H, W, 1) float array in [0, 1]"


# ---------------------------------------------------------------------------------------------
# Reading and checking


def load_mask(mask, image_size=None, blur: float = 0):
    """The mask as diffusers' pipelines take ``mask_image``: a PIL picture or a float array, checked.

    ``mask``: a path, a PIL image or an (H, W) / (H, W, 1) floating array in [0, 1]. A file is read
    as diffusers' ``load_image`` reads it (EXIF orientation, RGB; 16-bit greyscale is scaled to 8
    bits, where a plain RGB conversion would clip it). ``image_size``: the input
    image's (width, height), which the mask must have. ``blur``: the Gaussian radius of
    ``VaeImageProcessor.blur`` (0: none). Raises one ValueError line for: an unreadable file, a
    picture with transparency (A1111 reads transparent pixels as the mask, other tools read the
    colour: refused rather than guessed), a wrong array shape or dtype, NaN or values outside
    [0, 1], a size other than ``image_size``, and a mask that is all black (nothing to repaint) or
    all white (everything repainted: that is img2img) once blurred and binarised.
    """
    if isinstance(mask, (str, Path)):
        mask = read_mask_picture(mask)
    elif isinstance(mask, Image.Image):
        _refuse_transparency(mask, "the mask picture")
    elif isinstance(mask, np.ndarray):
        mask = _checked_array(mask)
    else:
        raise ValueError(f"the mask must be {MASK_KINDS}, not {type(mask).__name__}")
    if image_size is not None:
        size = mask.size if isinstance(mask, Image.Image) else (mask.shape[1], mask.shape[0])
        if tuple(size) != tuple(image_size):
            raise ValueError(f"the mask is {size[0]}x{size[1]} but the image is {image_size[0]}x{image_size[1]}; give a mask of the image's size")
    if not isinstance(blur, (int, float)) or isinstance(blur, bool) or not 0 <= blur < float("inf"):
        raise ValueError(f"mask blur must be a number >= 0, got {blur!r}")
    if blur > 0:
        mask = _picture(mask).filter(ImageFilter.GaussianBlur(blur))
    _refuse_uniform(_binarized(_values(mask)))
    return mask


def read_mask_picture(path) -> Image.Image:
    """A mask file as load_mask reads it: images.load_image's reading, with the transparency checked before it is flattened."""
    image = open_picture(path, "mask")
    _refuse_transparency(image, f"mask {str(path)!r}")
    return to_rgb(image)


def _refuse_transparency(image: Image.Image, what: str) -> None:
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            raise ValueError(
                f"{what} has transparent pixels; save it as a black-and-white picture without transparency (white = repaint)"
            )


def _checked_array(a: np.ndarray) -> np.ndarray:
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"a mask array must be (H, W) or (H, W, 1), got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"a mask array must hold floats in [0, 1], got {a.dtype} (for 8-bit values divide by 255)")
    if min(a.shape) == 0:
        raise ValueError(f"the mask array is empty (shape {a.shape})")
    if not np.isfinite(a).all():
        raise ValueError("the mask array holds NaN or infinite values")
    if a.min() < 0 or a.max() > 1:
        raise ValueError(f"the mask array must be in [0, 1], got values in [{a.min():g}, {a.max():g}]")
    return a


def _refuse_uniform(binary: np.ndarray) -> None:
    if not binary.any():
        raise ValueError("the mask is all black: nothing to repaint (white marks the region to repaint)")
    if binary.all():
        raise ValueError("the mask is all white: everything would be repainted; leave the mask out for img2img, or invert it")


def _picture(mask) -> Image.Image:
    """An array mask as the 8-bit greyscale picture it would be saved as; a picture as is."""
    if isinstance(mask, Image.Image):
        return mask
    return Image.fromarray(np.rint(mask * 255).astype(np.uint8), "L")


def _values(mask) -> np.ndarray:
    """(H, W) float32 in [0, 1]: a picture as the mask processor reads it (greyscale / 255)."""
    if isinstance(mask, Image.Image):
        return np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return mask


def _binarized(values: np.ndarray) -> np.ndarray:
    """VaeImageProcessor.binarize: 1 where >= 0.5."""
    return (values >= 0.5).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Pixel-space mask


def prepare_mask(mask, height: int, width: int, blur: float = 0, crop=None) -> np.ndarray:
    """The binarised mask at the image's (multiple of 8) size: (height, width) float32 in {0, 1}.

    ``mask_processor.preprocess(mask, height, width)`` (and with ``crop``, its
    ``crops_coords=crop, resize_mode="fill"``). ``mask`` is anything ``load_mask`` takes (it is
    checked again, without a size); ``blur`` as there (pass it to one of the two, not both).
    """
    mask = load_mask(mask, blur=blur)
    if crop is not None:
        return _binarized(_values(crop_and_fill(_picture(mask), crop, width, height)))
    if isinstance(mask, Image.Image):
        return _binarized(_values(mask.resize((width, height), Image.Resampling.LANCZOS)))
    return _binarized(nearest_resize(mask, height, width))


def nearest_resize(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) -> (height, width) as ``torch.nn.functional.interpolate(mode="nearest")`` picks source pixels.

    PyTorch's CPU kernel: source index floor(i * scale) with scale = in / out in float32, the
    output index itself when the sizes are equal, i // 2 when the output is twice the input.
    """

    def index(n_in: int, n_out: int) -> np.ndarray:
        i = np.arange(n_out)
        if n_in == n_out:
            return i
        if n_out == 2 * n_in:
            return i >> 1
        scale = np.float32(n_in) / np.float32(n_out)
        return np.minimum(np.floor(i.astype(np.float32) * scale).astype(np.int64), n_in - 1)

    return a[index(a.shape[0], height)][:, index(a.shape[1], width)]


def masked_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with the region to repaint zeroed (grey in [-1, 1]): ``init_image * (mask < 0.5)``.

    ``image``: (H, W, 3) in [-1, 1]; ``mask``: prepare_mask's (H, W).
    """
    return (image * (mask < 0.5)[..., None]).astype(np.float32)


def latent_mask(mask: np.ndarray, vae_scale_factor: int = 8) -> np.ndarray:
    """prepare_mask's (H, W) on the latent grid, (1, H / f, W / f, 1) float32: ``prepare_mask_latents``' nearest interpolate."""
    h, w = mask.shape
    small = nearest_resize(mask, h // vae_scale_factor, w // vae_scale_factor)
    return small[None, :, :, None].astype(np.float32)


# ---------------------------------------------------------------------------------------------
# "Only masked": crop the mask's box, generate at full size, paste back


def crop_region(mask, width: int, height: int, padding: int) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2): the box of the mask's non-black pixels, grown by ``padding`` and to the aspect of width x height.

    diffusers' ``VaeImageProcessor.get_crop_region``. ``mask``: anything ``load_mask`` takes,
    blurred already when the mask is blurred (load_mask's).
    """
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"the inpainting crop padding must be a whole number of pixels >= 0, got {padding!r}")
    nonzero = np.asarray(_picture(load_mask(mask)).convert("L")) != 0  # load_mask leaves some pixel white
    h, w = nonzero.shape
    cols, rows = np.flatnonzero(nonzero.any(axis=0)), np.flatnonzero(nonzero.any(axis=1))
    x1, y1 = max(int(cols[0]) - padding, 0), max(int(rows[0]) - padding, 0)
    x2, y2 = min(int(cols[-1]) + 1 + padding, w), min(int(rows[-1]) + 1 + padding, h)

    # Grow the short side (centred, the odd pixel to the far end), shift back inside the picture, clip.
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grown(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), h)
    else:
        x1, x2 = _grown(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), w)
    return x1, y1, x2, y2


def _grown(lo: int, hi: int, diff: int, size: int) -> tuple[int, int]:
    lo -= diff // 2
    hi += diff - diff // 2
    if hi >= size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, size)


def crop_and_fill(picture: Image.Image, crop, width: int, height: int) -> Image.Image:
    """``picture.crop(crop)`` fitted into width x height keeping its aspect, the rest filled by stretching its edges.

    diffusers' ``preprocess(..., crops_coords=crop, resize_mode="fill")`` (``_resize_and_fill``), for
    the image and the mask alike; the result is RGB as there.
    """
    image = picture.crop(tuple(crop))
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    # The bands left empty get the first and last row (column) of the fitted picture, stretched
    # with PIL's default filter, as diffusers fills them.
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:
            out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)), box=(0, fill + src_h))
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)), box=(fill + src_w, 0))
    return out


def apply_overlay(mask, init_image: Image.Image, image: Image.Image, crop=None) -> Image.Image:
    """The generated picture over the original where the mask is white, the original kept where it is black.

    diffusers' ``VaeImageProcessor.apply_overlay``: with ``crop``, ``image`` (the generated full-size
    picture of the crop) is first resized into the crop box (``resize_mode="crop"``); then the
    original, with the inverted (unbinarised) mask as its alpha, is composited on top. ``mask``:
    anything ``load_mask`` takes, at the original's size, blurred already when the mask is blurred.
    """
    width, height = init_image.size
    kept = Image.new("RGBa", (width, height))
    kept.paste(init_image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(_picture(load_mask(mask)).convert("L")))
    kept = kept.convert("RGBA")
    if crop is not None:
        x, y, x2, y2 = crop
        base = Image.new("RGBA", (width, height))
        base.paste(_resize_and_crop(image, x2 - x, y2 - y), (x, y))
        image = base.convert("RGB")
    image = image.convert("RGBA")
    image.alpha_composite(kept)
    return image.convert("RGB")


class MaskCrop:
    """"Only masked" inpainting (diffusers' ``padding_mask_crop``, A1111's "Inpaint area: Only masked"):
    the mask's box grown by ``padding`` and to the generation's aspect, filled to ``width`` x ``height``.

    ``image`` and ``mask`` (PIL pictures of that size) go to ``generate_latents_from_image``; ``paste``
    puts the decoded pictures back into the original, the original kept where the mask is black.
    """

    def __init__(self, original: Image.Image, mask, padding: int, width: int, height: int):
        self.original, self.full_mask = original, mask
        self.box = crop_region(mask, width, height, padding)
        self.image = crop_and_fill(original, self.box, width, height)
        self.mask = crop_and_fill(_picture(mask), self.box, width, height).convert("L")

    def paste(self, pictures) -> list:
        """Decoded pictures ((N, height, width, 3) in [0, 1]) -> PIL pictures of the original's size."""
        pictures = np.asarray(pictures, dtype=np.float32)
        as_pil = [Image.fromarray(np.rint(np.clip(p, 0, 1) * 255).astype(np.uint8)) for p in pictures]
        return [apply_overlay(self.full_mask, self.original, p, self.box) for p in as_pil]


def crop_to_mask(image, mask, padding: int, width=None, height=None, blur: float = 0, multiple: int = 8) -> MaskCrop:
    """The ``MaskCrop`` of ``image`` (a picture file or PIL image: the original) for ``mask`` (anything
    ``load_mask`` takes, of the image's size; ``blur`` as there). ``width`` x ``height``: the generation's
    size, by default the image's rounded down to a multiple of ``multiple`` (the VAE factor)."""
    if isinstance(image, (str, Path)):
        image = load_image(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"only-masked inpainting takes the image as a picture file or PIL image, got {type(image).__name__}")
    image = to_rgb(image)
    mask = load_mask(mask, image.size, blur)
    default = size_to_multiple(image.size, multiple)
    width, height = width or default[0], height or default[1]
    if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % multiple for v in (width, height)):
        raise ValueError(f"the generation size {width!r}x{height!r} must be whole numbers > 0, multiples of {multiple}")
    return MaskCrop(image, mask, padding, width, height)


def _resize_and_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to cover width x height keeping the aspect, centred, the excess cut (diffusers' ``_resize_and_crop``)."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out


# ---------------------------------------------------------------------------------------------
# 4-channel models


def blend_known(latents, image_latents, noise, mask, sampler, i: int):
    """After UNet call ``i`` of a 4-channel model: the known region (mask 0) reset to the image.

    diffusers' inpainting loop for ``unet.config.in_channels == 4``: the image latents re-noised to
    the next timestep with the run's starting noise (``sampler.add_noise(image_latents, noise, i +
    1)``), the clean image latents after the last call; ``(1 - mask) * known + mask * latents``.
    ``mask``: latent_mask's (numpy or mx), broadcast over the batch and channels.
    """
    last = i == len(sampler.timesteps) - 1
    known = image_latents if last else sampler.add_noise(image_latents, noise, i + 1)
    # The arrays on the left keep an mx result for a numpy mask; the products are diffusers' own.
    return known * (1 - mask) + latents * mask


# ---------------------------------------------------------------------------------------------
# The denoising loop's part


def is_inpainting_unet(unet_config) -> bool:
    """A UNet that takes the mask and the masked image's latents beside the latents (9 input channels)."""
    return unet_config.in_channels == 9


class Inpainting:
    """One generation's inpainting, applied by the denoising loop around each UNet call.

    ``mask``: latent_mask's (1, h, w, 1). A 9-channel UNet gets ``masked_latents`` (1, h, w, C)
    beside its input; a 4-channel one (``masked_latents=None``) has the known region reset after
    every step from ``image_latents`` and the run's starting ``noise`` (blend_known).
    """

    def __init__(self, mask, masked_latents=None, image_latents=None, noise=None):
        self.mask = mx.array(mask, dtype=mx.float32)
        self.masked_latents, self.image_latents, self.noise = masked_latents, image_latents, noise

    def unet_input(self, x: mx.array) -> mx.array:
        """``torch.cat([latent_model_input, mask, masked_image_latents], dim=1)`` for a 9-channel UNet,
        the one mask and masked image repeated over the batch (and its guidance halves)."""
        if self.masked_latents is None:
            return x
        n, h, w, _ = x.shape
        mask = mx.broadcast_to(self.mask, (n, h, w, 1))
        masked = mx.broadcast_to(self.masked_latents, (n, h, w, self.masked_latents.shape[-1]))
        return mx.concatenate([x, mask.astype(x.dtype), masked.astype(x.dtype)], axis=-1)

    def after_step(self, x: mx.array, sampler, i: int) -> mx.array:
        """The latents after timestep index ``i``: a 4-channel model's known region reset (blend_known)."""
        if self.masked_latents is not None:
            return x
        return blend_known(x, self.image_latents, self.noise, self.mask, sampler, i)

"""AUTOMATIC1111's API shapes: request fields and their defaults, base64 pictures, the infotext and ``info``.

The reference is A1111 v1.9/1.10: ``modules/api/models.py`` (the request models are built from
``StableDiffusionProcessingTxt2Img/Img2Img.__init__``: every field optional, its default the
constructor's) and ``modules/api/api.py`` (``decode_base64_to_image``, ``encode_pil_to_base64``,
``Processed.js`` for ``info``). A field is read as pydantic's lax mode reads it (``"20"`` is 20,
``7`` is 7.0); an unknown field is ignored; a wrong type or value is an ``ApiError`` naming the field.
"""

import base64
import binascii
import io
import json
import math
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from .. import images


class ApiError(Exception):
    """A request the server refuses: an HTTP status and one line for A1111's ``{"error", "detail"}``."""

    def __init__(self, status: int, detail: str, error: str = "HTTPException"):
        super().__init__(detail)
        self.status, self.detail, self.error = status, detail, error


def _bad(name: str, expected: str, value) -> ApiError:
    shown = json.dumps(value)[:60] if not isinstance(value, (bytes, bytearray)) else "bytes"
    return ApiError(422, f"field {name!r}: expected {expected}, got {shown}", "ValidationError")


def as_int(name, value):
    if isinstance(value, bool):
        raise _bad(name, "a whole number", value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise _bad(name, "a whole number", value)


def as_float(name, value):
    if isinstance(value, bool):
        raise _bad(name, "a number", value)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _bad(name, "a number", value) from None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    raise _bad(name, "a finite number", value if isinstance(value, (int, float, str)) else str(value))


def as_bool(name, value):
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        return value.strip().lower() in ("true", "1", "yes", "on")
    raise _bad(name, "true or false", value)


def as_str(name, value):
    if isinstance(value, str):
        return value
    raise _bad(name, "a string", value)


def as_dict(name, value):
    if isinstance(value, dict):
        return value
    raise _bad(name, "an object", value)


def as_list(name, value):
    if isinstance(value, list):
        return value
    raise _bad(name, "a list", value)


# name -> (reader, default). A1111's defaults: StableDiffusionProcessing(Txt2Img).__init__ and the API's extra fields.
COMMON = {
    "prompt": (as_str, ""),
    "negative_prompt": (as_str, ""),
    "seed": (as_int, -1),
    "subseed": (as_int, -1),
    "subseed_strength": (as_float, 0.0),
    "steps": (as_int, 50),
    "cfg_scale": (as_float, 7.0),
    "width": (as_int, 512),
    "height": (as_int, 512),
    "sampler_name": (as_str, None),
    "sampler_index": (as_str, "Euler"),
    "scheduler": (as_str, None),
    "batch_size": (as_int, 1),
    "n_iter": (as_int, 1),
    "clip_skip": (as_int, None),
    "override_settings": (as_dict, {}),
    "override_settings_restore_afterwards": (as_bool, True),
    "send_images": (as_bool, True),
    "save_images": (as_bool, False),
    "enable_hr": (as_bool, False),
    "restore_faces": (as_bool, None),
    "tiling": (as_bool, None),
    "styles": (as_list, None),
    "script_name": (as_str, None),
    "alwayson_scripts": (as_dict, {}),
}
TXT2IMG = {**COMMON, "denoising_strength": (as_float, None)}
IMG2IMG = {
    **COMMON,
    "init_images": (as_list, None),
    "mask": (as_str, None),
    "denoising_strength": (as_float, 0.75),
    "mask_blur": (as_int, 4),
    "mask_blur_x": (as_int, 4),
    "mask_blur_y": (as_int, 4),
    "inpainting_mask_invert": (as_int, 0),
    "inpaint_full_res": (as_bool, True),
    "inpaint_full_res_padding": (as_int, 0),
    "inpainting_fill": (as_int, 0),
    "resize_mode": (as_int, 0),
    "include_init_images": (as_bool, False),
}


def read_fields(body, fields: dict) -> dict:
    """The request's known fields, each read by its type (null: the default); unknown fields are ignored."""
    if not isinstance(body, dict):
        raise ApiError(422, f"the request body must be a JSON object, got {type(body).__name__}", "ValidationError")
    request = {}
    for name, (reader, default) in fields.items():
        value = body.get(name)
        request[name] = default if value is None else reader(name, value)
    return request


def parse_json(raw: bytes):
    """The request body as JSON; an empty body is ``{}`` (every field is optional)."""
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ApiError(422, f"the request body is not valid JSON ({str(e)[:80]})", "JSONDecodeError") from None


def decode_image(data, name: str, max_pixels: int) -> Image.Image:
    """A base64 picture (optionally a ``data:image/...;base64,`` URL) -> a loaded PIL image, as A1111's
    decode_base64_to_image reads it; URLs are not fetched. Bigger than ``max_pixels`` is refused before decoding."""
    if not isinstance(data, str):
        raise _bad(name, "a base64 picture", data)
    if data.startswith(("http://", "https://")):
        raise ApiError(422, f"{name}: pictures by URL are not fetched; send the picture as base64", "ValidationError")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data.strip(), validate=False)
    except (binascii.Error, ValueError) as e:
        raise ApiError(422, f"{name}: not valid base64 ({e})", "ValidationError") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            if image.width * image.height > max_pixels:
                raise ApiError(422, f"{name}: the picture is {image.width}x{image.height}, more than the server's limit of {max_pixels} pixels", "ValidationError")
            image.load()
    except ApiError:
        raise
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ApiError(422, f"{name}: not a picture PIL can read ({str(e)[:80]})", "ValidationError") from None
    return image


def encode_png(picture: Image.Image, parameters: str | None) -> str:
    """A picture as base64 PNG with A1111's ``parameters`` text chunk (encode_pil_to_base64)."""
    from PIL.PngImagePlugin import PngInfo

    info = None
    if parameters is not None:
        info = PngInfo()
        info.add_text("parameters", parameters)
    with io.BytesIO() as out:
        picture.save(out, format="PNG", pnginfo=info)
        return base64.b64encode(out.getvalue()).decode("ascii")


def mask_picture(image: Image.Image) -> Image.Image:
    """A1111's create_binary_mask: a picture with a used alpha channel is masked by its alpha, any other by its grey."""
    if image.mode in ("RGBA", "LA", "PA") and image.getchannel("A").getextrema() != (255, 255):
        return image.getchannel("A").point(lambda x: 255 if x > 128 else 0)
    return image.convert("L")


@dataclass
class Output:
    """One job's pictures and what ``info`` says of them."""

    pictures: list  # PIL images
    infotexts: list
    prompts: list
    negative_prompts: list
    seeds: list
    subseeds: list


def info_json(request: dict, output: Output, *, width: int, height: int, sampler: str, model_name: str, model_hash, job_timestamp: str, clip_skip: int, denoising_strength, extra: dict, inpainting: bool) -> str:
    """``info``: the JSON string of A1111's Processed.js()."""
    first_seed = output.seeds[0] if output.seeds else request["seed"]
    return json.dumps(
        {
            "prompt": output.prompts[0] if output.prompts else request["prompt"],
            "all_prompts": output.prompts,
            "negative_prompt": output.negative_prompts[0] if output.negative_prompts else request["negative_prompt"],
            "all_negative_prompts": output.negative_prompts,
            "seed": first_seed,
            "all_seeds": output.seeds,
            "subseed": output.subseeds[0] if output.subseeds else -1,
            "all_subseeds": output.subseeds,
            "subseed_strength": 0,
            "width": width,
            "height": height,
            "sampler_name": sampler,
            "cfg_scale": request["cfg_scale"],
            "steps": request["steps"],
            "batch_size": request["batch_size"],
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": model_name,
            "sd_model_hash": model_hash,
            "sd_vae_name": None,
            "sd_vae_hash": None,
            "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": denoising_strength,
            "extra_generation_params": extra,
            "index_of_first_image": 0,
            "infotexts": output.infotexts,
            "styles": request["styles"] or [],
            "job_timestamp": job_timestamp,
            "clip_skip": clip_skip,
            "is_using_inpainting_conditioning": inpainting,
        }
    )


def png_info(image: Image.Image) -> dict:
    """/png-info: the picture's parameters text, its other text items, and the text parsed (A1111's parse_generation_parameters keys)."""
    text = image.info.get("parameters")
    if text is None:
        text = images.parameters_of(image) or ""
    items = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str) and k != "parameters"}
    parameters = images.parse_parameters(text) if text else {}
    return {"info": text, "items": items, "parameters": parameters}

"""Single-file Stable Diffusion checkpoints: the original LDM / A1111 / ComfyUI layout.

Follows diffusers' ``from_single_file`` (``diffusers/loaders/single_file_utils.py``): the family
from the tensor names and shapes, as ``infer_diffusers_model_type``; the key names of each
component converted to a diffusers folder's (ldm_keys.py), so the models' own ``sanitize()`` and the
strict loader do the rest; the configs and tokenizers of the family's reference repo, shipped
verbatim (hub_configs.py) unless a diffusers folder is given for them (diffusers' ``config=``);
for an inpainting checkpoint (9 input channels) derived from those (``InpaintingConfigs``).

The file is validated by the safetensors library, then read lazily (safetensors_io.py: ``mx.load``
reads a tensor only when it is first evaluated) and a component's arrays are handed out once, so
a 7 GB checkpoint is held in memory once. Safetensors only: this module never unpickles.
"""

from pathlib import Path
from typing import Optional

from . import safetensors_io
from .errors import ModelLoadError
from .file_hash import model_hash
from .hub_configs import FAMILY_FOLDERS, SDXL_TURBO_FOLDER, HubModel, config_name
from .ldm_keys import FAMILY_NAMES, UNET_PREFIX, ConfigError, convert
from .tokenizer import Tokenizer

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
PREDICTION_TYPES = ("epsilon", "v_prediction")

# sdxl-turbo's file, recognised by its size, then its A1111 hash, never by its name: it gets
# sdxl-turbo's own configs (512 px, Euler ancestral with trailing spacing); with SDXL base's
# "leading" Euler, the 1-4 steps a turbo model runs would stop far from t=0.
SDXL_TURBO_FILES = {6_938_081_905: "e869ac7d69"}  # sd_xl_turbo_1.0_fp16.safetensors (Hub LFS pointer)

# The tensor names that tell the families apart (diffusers' CHECKPOINT_KEY_NAMES).
_KEY_V2 = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
_KEY_XL_BASE = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
_KEY_XL_REFINER = "conditioner.embedders.0.model.text_projection"
_KEY_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
_KEY_UPSCALE = "model.diffusion_model.input_blocks.10.0.skip_connection.bias"
_KEY_PLAYGROUND = "edm_mean"
_KEYS_CONTROLNET = ("control_model.time_embed.0.weight", "controlnet_cond_embedding.conv_in.weight")

# Inpainting UNets take the latents, the mask and the masked image's latents side by side.
INPAINTING_CHANNELS = 9

# Per family: diffusers' model type for an inpainting checkpoint, the repo whose configs diffusers
# reads for it, the shipped base model whose configs stand in for that repo's here, and the
# repo's scheduler class when it is not the base's. No verbatim copy of the inpainting repos' files
# is shipped: their configs are the base's with the UNet's in_channels set to 9, as diffusers' own
# LDM fallback (create_unet_diffusers_config_from_ldm with num_in_channels) derives a UNet config,
# and the inpainting pipeline class. SD 2-inpainting is a 512 px epsilon model: its base is
# 2.1-base, not the 768 px v-prediction 2.1 of plain SD 2.x files. The stabilityai repo diffusers
# names for it was removed from the Hub; sd2-community's mirror stands in.
INPAINTING = {
    "sd1": ("inpainting", "stable-diffusion-v1-5/stable-diffusion-inpainting", "stable-diffusion-v1-5", "DDIMScheduler"),
    "sd2": ("inpainting_v2", "sd2-community/stable-diffusion-2-inpainting", "stable-diffusion-2-1-base", None),
    "sdxl": ("xl_inpaint", "diffusers/stable-diffusion-xl-1.0-inpainting-0.1", "stable-diffusion-xl-base-1.0", None),
}


def is_single_file(model: str) -> bool:
    """True for a path to an existing ``.safetensors`` file (a single-file checkpoint)."""
    path = Path(model).expanduser()
    return path.suffix.lower() == ".safetensors" and path.is_file()


def detect_family(shapes: dict) -> str:
    """"sd1", "sd2" or "sdxl" from tensor names and shapes, as diffusers' ``infer_diffusers_model_type``.

    Inpainting UNets (9 input channels) are of the same families (``is_inpainting``). Checkpoints
    we cannot run (SDXL refiner, InstructPix2Pix, upscaler, ControlNet, Playground) raise
    ModelLoadError saying what they are.
    """
    if not any(k.startswith(UNET_PREFIX) for k in shapes):
        raise ModelLoadError(_not_a_checkpoint(shapes))
    channels = _input_channels(shapes)
    if channels not in (4, INPAINTING_CHANNELS):
        what = "an InstructPix2Pix UNet" if channels == 8 else "a UNet"
        raise ModelLoadError(
            f"{what} ({channels} input channels) is not supported; only text-to-image (4 input channels) and inpainting (9) checkpoints are"
        )
    if _KEY_V2 in shapes and shapes[_KEY_V2][-1] == 1024:
        return "sd2"
    if _KEY_PLAYGROUND in shapes:
        raise ModelLoadError("a Playground v2.5 checkpoint (EDM) is not supported; only SD 1.x, SD 2.x and SDXL base")
    if _KEY_XL_BASE in shapes:
        return "sdxl"
    if _KEY_XL_REFINER in shapes:
        raise ModelLoadError("an SDXL refiner checkpoint is not supported; only SDXL base models (and fine-tunes of them) are")
    if _KEY_UPSCALE in shapes:
        raise ModelLoadError("a Stable Diffusion x4 upscaler checkpoint is not supported")
    if any(k in shapes for k in _KEYS_CONTROLNET):
        raise ModelLoadError("a ControlNet checkpoint is not supported")
    return "sd1"


def _input_channels(shapes: dict) -> int:
    conv_in = shapes.get(_KEY_CONV_IN)
    return conv_in[1] if conv_in is not None and len(conv_in) == 4 else 4


def is_inpainting(shapes: dict) -> bool:
    """A UNet taking latents, mask and masked-image latents (9 input channels), as diffusers' ``infer_diffusers_model_type``."""
    return _input_channels(shapes) == INPAINTING_CHANNELS


def _not_a_checkpoint(shapes: dict) -> str:
    keys = list(shapes)
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k or "lora_A" in k for k in keys):
        return "this is a LoRA file, not a model checkpoint; load it as a LoRA on top of a model"
    if any(k.startswith(("down_blocks.", "conv_in.", "encoder.down_blocks.", "text_model.")) for k in keys):
        return "this holds one component in the diffusers layout, not a whole LDM checkpoint; use a diffusers folder"
    sample = ", ".join(repr(k) for k in keys[:3])
    return f"no Stable Diffusion UNet (model.diffusion_model.*) in this file (keys: {sample}, ...)"


class InpaintingConfigs:
    """The configs of a family's inpainting repo (``INPAINTING``), derived from its base model's shipped ones."""

    def __init__(self, family: str):
        self.model_type, self.repo, base, self.scheduler_class = INPAINTING[family]
        self.base = HubModel(base)
        self.root, self.name = self.base.root, self.base.name

    def model_index(self) -> dict:
        index = self.base.model_index()
        index["_class_name"] = index["_class_name"].replace("Pipeline", "InpaintPipeline")
        if self.scheduler_class is not None:
            index["scheduler"] = ["diffusers", self.scheduler_class]
        return index

    def config(self, component: str) -> dict:
        config = self.base.config(component)
        if component == "unet":
            config["in_channels"] = INPAINTING_CHANNELS
        if component == "scheduler" and self.scheduler_class is not None:
            config["_class_name"] = self.scheduler_class
        return config

    def tokenizer(self, component: str) -> Tokenizer:
        return self.base.tokenizer(component)  # the inpainting repos ship their base model's tokenizers


# ---------------------------------------------------------------------------------------------
# The source object the facade loads from


class SingleFileSource:
    """One ``.safetensors`` checkpoint in the LDM layout, seen as the components of a diffusers folder.

    ``configs``: where the model_index, component configs and tokenizers come from, any source with
    ``model_index()``, ``config(component)`` and ``tokenizer(component)`` (model_io.open_model passes
    a diffusers folder's, as diffusers' ``from_single_file(config=...)``); by default the family's
    reference repo (hub_configs.HubModel). ``tokenizer_dirs``: folders for "tokenizer"/"tokenizer_2"
    instead of those.
    """

    def __init__(self, path, prediction_type: Optional[str] = None, configs=None, tokenizer_dirs: Optional[dict] = None):
        self.name = str(path)
        self.path = Path(path).expanduser()
        if self.path.suffix.lower() in PICKLE_SUFFIXES:
            raise ModelLoadError(
                f"{self.name}: {self.path.suffix} checkpoints are pickles, which this library never loads; "
                "use the .safetensors version of the model (or convert it to safetensors first)"
            )
        if self.path.suffix.lower() != ".safetensors":
            raise ModelLoadError(f"{self.name}: not a .safetensors file")
        if not self.path.is_file():
            raise ModelLoadError(f"{self.name}: no such file")
        if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
            raise ModelLoadError(f"prediction_type {prediction_type!r} is not one of {list(PREDICTION_TYPES)}")
        self.prediction_type = prediction_type
        self.tokenizer_dirs = {k: Path(v) for k, v in (tokenizer_dirs or {}).items()}

        arrays = self._read()
        shapes = {k: tuple(v.shape) for k, v in arrays.items()}
        # ComfyUI (and A1111, which reads them) mark v-prediction and zero-terminal-SNR models with
        # empty tensors; diffusers ignores them, but the model is wrong without them.
        self.markers = {k for k in ("v_pred", "ztsnr") if k in shapes}
        self.family = detect_family(shapes)  # also refuses, with given configs, what we cannot run
        self.inpainting = is_inpainting(shapes)
        if configs is not None:
            # Given configs may describe other sizes than the real ones detection reads: the
            # pipeline class and the text encoder's layout decide.
            pipeline = configs.model_index().get("_class_name")
            xl = isinstance(pipeline, str) and "XL" in pipeline
            self.family = "sdxl" if xl else ("sd2" if any(k.startswith("cond_stage_model.model.") for k in shapes) else "sd1")
        known = SDXL_TURBO_FILES.get(self.path.stat().st_size)
        self.is_sdxl_turbo = self.family == "sdxl" and known is not None and model_hash(self.path) == known
        if configs is None and self.inpainting:
            configs = InpaintingConfigs(self.family)
        self.configs = configs or HubModel(SDXL_TURBO_FOLDER if self.is_sdxl_turbo else FAMILY_FOLDERS[self.family])
        # Converted (still lazy) tensors; each component's are handed out once, then re-read.
        self._pending = self._convert(arrays)
        self._components = set(self._pending)

    def _read(self) -> dict:
        arrays, _ = safetensors_io.load(self.path)
        return arrays

    def _convert(self, arrays: dict) -> dict:
        configs = {c: self.config(c) for c in ("unet", "vae", "text_encoder", "text_encoder_2") if self._expects(c)}
        try:
            return convert(arrays, self.family, configs)
        except ConfigError as e:
            where = Path(self.configs.name) / e.component / config_name(e.component)
            raise ModelLoadError(f"{where}: {e}") from None
        except ModelLoadError as e:
            raise ModelLoadError(f"{self.name}: {e}") from None

    def _expects(self, component: str) -> bool:
        return component != "text_encoder_2" or self.family == "sdxl"

    def has(self, component: str) -> bool:
        if component in ("unet", "vae", "text_encoder", "text_encoder_2"):
            return component in self._components
        if component == "tokenizer_2":
            return self.family == "sdxl"
        return component in ("tokenizer", "scheduler")

    def model_index(self) -> dict:
        return self.configs.model_index()

    def config(self, component: str) -> dict:
        """The config.json (scheduler: scheduler_config.json) dict of a component."""
        if component not in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler") or not self._expects(component):
            raise ModelLoadError(f"{self.name}: a {FAMILY_NAMES[self.family]} checkpoint has no {component} config")
        config = self.configs.config(component)
        if component == "scheduler":
            if "v_pred" in self.markers:
                config["prediction_type"] = "v_prediction"
            if "ztsnr" in self.markers:
                config["rescale_betas_zero_snr"] = True
            if self.prediction_type is not None:
                config["prediction_type"] = self.prediction_type
        return config

    def weights(self, component: str, float16: bool = False) -> tuple[dict, str]:
        """A component's tensors under diffusers names, in their stored dtype, and the file name.

        ``float16`` is accepted for the facade's sake: a single file has one precision.
        """
        if component not in self._components:
            raise ModelLoadError(f"{self.name}: this {FAMILY_NAMES[self.family]} checkpoint holds no {component} weights")
        weights = self._pending.pop(component, None)
        if weights is None:  # asked for a second time (say, the VAE again in float32): read it again
            weights = self._convert(self._read())[component]
        return weights, self.name

    def tokenizer(self, component: str = "tokenizer") -> Tokenizer:
        if not self.has(component) or not component.startswith("tokenizer"):
            raise ModelLoadError(f"{self.name}: a {FAMILY_NAMES[self.family]} model has no {component}")
        if component in self.tokenizer_dirs:
            return Tokenizer.from_folder(self.tokenizer_dirs[component])
        return self.configs.tokenizer(component)

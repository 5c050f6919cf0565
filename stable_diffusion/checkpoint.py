"""Single-file Stable Diffusion checkpoints: the original LDM / A1111 / ComfyUI layout.

Follows diffusers' ``from_single_file`` (``diffusers/loaders/single_file_utils.py``):
``infer_diffusers_model_type`` for the family, ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint`` and ``convert_open_clip_checkpoint``
for the key names. Each component's tensors come out under the names a diffusers folder's
safetensors use, so the models' own ``sanitize()`` and the strict loader do the rest.

The file is read lazily (``mx.load`` reads a tensor only when it is first evaluated) and a
component's arrays are handed out once, so a 7 GB checkpoint is held in memory once. Configs are
the family's reference model's, shipped verbatim (hub_configs.py); tokenizer files come from the HF
cache of that repo. Safetensors only: this module never unpickles.
"""

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .errors import ModelLoadError
from .hub_configs import FAMILY_FOLDERS, SDXL_TURBO_FOLDER, HubModel
from .tokenizer import Tokenizer

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
PREDICTION_TYPES = ("epsilon", "v_prediction")

# sdxl-turbo's file, recognised by its size, then its A1111 hash, never by its name: it gets
# sdxl-turbo's own configs (512 px, Euler ancestral with trailing spacing); with SDXL base's
# "leading" Euler, the 1-4 steps a turbo model runs would stop far from t=0.
SDXL_TURBO_FILES = {6_938_081_905: "e869ac7d69"}  # sd_xl_turbo_1.0_fp16.safetensors (Hub LFS pointer)
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}

# Where each component lives in the file, per family (prefix, layout).
_LAYOUTS = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", "clip")},
    "sd2": {"text_encoder": ("cond_stage_model.model.", "open_clip")},
    "sdxl": {
        "text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
        "text_encoder_2": ("conditioner.embedders.1.model.", "open_clip"),
    },
}
_UNET_PREFIX = "model.diffusion_model."
_VAE_PREFIXES = ("first_stage_model.", "vae.")

# Tensors of a training checkpoint that are not weights of an inference model: the DDPM schedule
# buffers, EMA copies (diffusers takes the non-EMA UNet unless told otherwise), the VAE's training
# loss, SGM's denoiser sigmas and OpenCLIP's logit scale.
_NOT_WEIGHTS = {
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
    "global_step",
    "v_pred",  # ComfyUI's markers, read by SingleFileSource.config("scheduler")
    "ztsnr",
}
_NOT_WEIGHT_PREFIXES = ("model_ema.", "first_stage_model.loss.", "vae.loss.", "denoiser.")

# The tensor names that tell the families apart (diffusers' CHECKPOINT_KEY_NAMES).
_KEY_V2 = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
_KEY_XL_BASE = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
_KEY_XL_REFINER = "conditioner.embedders.0.model.text_projection"
_KEY_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
_KEY_UPSCALE = "model.diffusion_model.input_blocks.10.0.skip_connection.bias"
_KEY_PLAYGROUND = "edm_mean"
_KEYS_CONTROLNET = ("control_model.time_embed.0.weight", "controlnet_cond_embedding.conv_in.weight")


def is_single_file(model: str) -> bool:
    """True for a path to an existing ``.safetensors`` file (a single-file checkpoint)."""
    path = Path(model).expanduser()
    return path.suffix.lower() == ".safetensors" and path.is_file()


# ---------------------------------------------------------------------------------------------
# Family detection


def detect_family(shapes: dict) -> str:
    """"sd1", "sd2" or "sdxl" from tensor names and shapes, as diffusers' ``infer_diffusers_model_type``.

    Checkpoints we cannot run (SDXL refiner, inpainting, upscaler, ControlNet, Playground) raise
    ModelLoadError saying what they are.
    """
    if not any(k.startswith(_UNET_PREFIX) for k in shapes):
        raise ModelLoadError(_not_a_checkpoint(shapes))
    conv_in = shapes.get(_KEY_CONV_IN)
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        what = {9: "an inpainting UNet", 8: "an InstructPix2Pix UNet"}.get(conv_in[1], "a UNet")
        raise ModelLoadError(f"{what} ({conv_in[1]} input channels) is not supported yet; only text-to-image checkpoints (4 input channels) are")
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


def _not_a_checkpoint(shapes: dict) -> str:
    keys = list(shapes)
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_" in k or "lora_A" in k for k in keys):
        return "this is a LoRA file, not a model checkpoint; load it as a LoRA on top of a model"
    if any(k.startswith(("down_blocks.", "conv_in.", "encoder.down_blocks.", "text_model.")) for k in keys):
        return "this holds one component in the diffusers layout, not a whole LDM checkpoint; use a diffusers folder"
    sample = ", ".join(repr(k) for k in keys[:3])
    return f"no Stable Diffusion UNet (model.diffusion_model.*) in this file (keys: {sample}, ...)"


# ---------------------------------------------------------------------------------------------
# Key conversion, LDM -> diffusers/transformers. The functions only slice, transpose and reshape,
# so they work on lazy mx.arrays (and on anything else with those methods).

_UNET_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
}
_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}


def _resnet(rest: str, names: dict) -> Optional[str]:
    module, _, param = rest.rpartition(".")
    return f"{names[module]}.{param}" if module in names and param in ("weight", "bias") else None


def _unet_name(key: str, layers_per_block: int) -> Optional[str]:
    """The diffusers name of one ``model.diffusion_model.`` key (prefix removed); None if unknown."""
    module, _, param = key.rpartition(".")
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{param}"
    n = layers_per_block + 1  # LDM numbers resnets, attentions and the resampler of a level together
    m = re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", key)
    if m:
        i, j, rest = int(m[1]), int(m[2]), m[3]
        if i == 0:
            return None
        block, layer = divmod(i - 1, n)
        if j == 0 and rest in ("op.weight", "op.bias") and layer == layers_per_block:
            return f"down_blocks.{block}.downsamplers.0.conv.{rest[3:]}"
        if j == 0 and layer < layers_per_block and _resnet(rest, _UNET_RESNET):
            return f"down_blocks.{block}.resnets.{layer}.{_resnet(rest, _UNET_RESNET)}"
        if j == 1 and layer < layers_per_block:
            return f"down_blocks.{block}.attentions.{layer}.{rest}"
        return None
    m = re.fullmatch(r"middle_block\.(\d)\.(.+)", key)
    if m:
        j, rest = int(m[1]), m[2]
        if j in (0, 2) and _resnet(rest, _UNET_RESNET):
            return f"mid_block.resnets.{j // 2}.{_resnet(rest, _UNET_RESNET)}"
        return f"mid_block.attentions.0.{rest}" if j == 1 else None
    m = re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", key)
    if m:
        i, j, rest = int(m[1]), int(m[2]), m[3]
        block, layer = divmod(i, n)
        if j == 0 and _resnet(rest, _UNET_RESNET):
            return f"up_blocks.{block}.resnets.{layer}.{_resnet(rest, _UNET_RESNET)}"
        if j in (1, 2) and rest in ("conv.weight", "conv.bias") and layer == n - 1:
            return f"up_blocks.{block}.upsamplers.0.{rest}"
        if j == 1:
            return f"up_blocks.{block}.attentions.{layer}.{rest}"
    return None


_VAE_TOP = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.norm_out": "encoder.conv_norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.norm_out": "decoder.conv_norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
_VAE_RESNET = {n: n for n in ("norm1", "conv1", "norm2", "conv2")} | {"nin_shortcut": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _vae_name(key: str, num_blocks: int) -> Optional[str]:
    """The diffusers name of one VAE key (prefix removed); None if unknown."""
    module, _, param = key.rpartition(".")
    if module in _VAE_TOP and param in ("weight", "bias"):
        return f"{_VAE_TOP[module]}.{param}"
    m = re.fullmatch(r"encoder\.down\.(\d+)\.(block\.(\d+)\.(.+)|downsample\.conv\.(weight|bias))", key)
    if m:
        if m[3] is not None:
            return f"encoder.down_blocks.{m[1]}.resnets.{m[3]}.{_resnet(m[4], _VAE_RESNET)}" if _resnet(m[4], _VAE_RESNET) else None
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[5]}"
    # The decoder's levels are numbered from the bottom in LDM, from the top in diffusers.
    m = re.fullmatch(r"decoder\.up\.(\d+)\.(block\.(\d+)\.(.+)|upsample\.conv\.(weight|bias))", key)
    if m:
        block = num_blocks - 1 - int(m[1])
        if m[3] is not None:
            return f"decoder.up_blocks.{block}.resnets.{m[3]}.{_resnet(m[4], _VAE_RESNET)}" if _resnet(m[4], _VAE_RESNET) else None
        return f"decoder.up_blocks.{block}.upsamplers.0.conv.{m[5]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.(block_([12])\.(.+)|attn_1\.(\w+)\.(weight|bias))", key)
    if m:
        if m[3] is not None:
            return f"{m[1]}.mid_block.resnets.{int(m[3]) - 1}.{_resnet(m[4], _VAE_RESNET)}" if _resnet(m[4], _VAE_RESNET) else None
        if m[5] in _VAE_ATTENTION:
            return f"{m[1]}.mid_block.attentions.0.{_VAE_ATTENTION[m[5]]}.{m[6]}"
    return None


_OPEN_CLIP_TOP = {
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPEN_CLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}


def convert_unet(arrays: dict, config: dict) -> tuple[dict, list]:
    """``model.diffusion_model.*`` (prefix removed) -> diffusers UNet2DConditionModel names; also the unknown keys."""
    lpb = config.get("layers_per_block", 2)
    if isinstance(lpb, (list, tuple)):
        if len(set(lpb)) != 1:
            raise ModelLoadError("unet: per-block layers_per_block cannot be read from an LDM checkpoint")
        lpb = lpb[0]
    out, unknown = {}, []
    for key, value in arrays.items():
        name = _unet_name(key, lpb)
        if name is None:
            unknown.append(_UNET_PREFIX + key)
        else:
            out[name] = value
    return out, unknown


def convert_vae(arrays: dict, config: dict, prefix: str = "first_stage_model.") -> tuple[dict, list]:
    """``first_stage_model.*`` (prefix removed) -> diffusers AutoencoderKL names; also the unknown keys.

    The mid-block attention projections are stored as 1x1 convs (or conv1d, or linears); a
    diffusers folder stores them as linears.
    """
    num_blocks = len(config["block_out_channels"])
    out, unknown = {}, []
    for key, value in arrays.items():
        name = _vae_name(key, num_blocks)
        if name is None:
            unknown.append(prefix + key)
            continue
        if ".mid_block.attentions.0.to_" in name and name.endswith(".weight") and value.ndim > 2:
            value = value.reshape(value.shape[:2])
        out[name] = value
    return out, unknown


def convert_clip(arrays: dict, prefix: str) -> tuple[dict, list]:
    """HF CLIPTextModel keys stored under ``prefix`` (prefix removed) -> transformers names."""
    out = {}
    for key, value in arrays.items():
        if key.endswith("embeddings.position_ids"):
            continue  # a buffer (arange), often stored corrupted by merges; not a weight
        out[key if key.startswith("text_model.") else "text_model." + key] = value
    return out, []


def convert_open_clip(arrays: dict, config: dict, prefix: str) -> tuple[dict, list]:
    """OpenCLIP text tower (prefix removed) -> transformers CLIPTextModel(WithProjection) names.

    The fused attention ``in_proj`` is split into q/k/v; ``text_projection`` (x @ P) is transposed
    into a Linear weight, or dropped for SD 2's CLIPTextModel; resblocks past the config's
    ``num_hidden_layers`` (SD 2 uses 23 of OpenCLIP-H's 24) and ``logit_scale`` are not used.
    """
    with_projection = "CLIPTextModelWithProjection" in (config.get("architectures") or [])
    num_layers = config["num_hidden_layers"]
    out, unknown = {}, []
    for key, value in arrays.items():
        if key in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[key]] = value
        elif key == "text_projection":
            if with_projection:
                out["text_projection.weight"] = value.T
        elif key == "logit_scale":
            pass
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key):
            layer, rest = int(m[1]), m[2]
            if layer >= num_layers:
                continue
            base = f"text_model.encoder.layers.{layer}"
            module, _, param = rest.rpartition(".")
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                d = value.shape[0] // 3
                param = "weight" if rest.endswith("weight") else "bias"
                for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                    out[f"{base}.self_attn.{name}.{param}"] = value[i * d : (i + 1) * d]
            elif module in _OPEN_CLIP_LAYER and param in ("weight", "bias"):
                out[f"{base}.{_OPEN_CLIP_LAYER[module]}.{param}"] = value
            else:
                unknown.append(prefix + key)
        else:
            unknown.append(prefix + key)
    return out, unknown


def convert(arrays: dict, family: str, configs: dict) -> dict[str, dict]:
    """Split an LDM checkpoint's tensors by component and rename them to the diffusers names.

    ``configs`` maps component -> config dict. Returns {component: {name: tensor}} for the
    components the file holds. Raises ModelLoadError naming the first unknown keys.
    """
    groups: dict[str, dict] = {}
    unknown = []
    vae_prefix = next((p for p in _VAE_PREFIXES if any(k.startswith(p) and not k.startswith(p + "loss.") for k in arrays)), _VAE_PREFIXES[0])
    layouts = _LAYOUTS[family]
    for key, value in arrays.items():
        if key in _NOT_WEIGHTS or key.startswith(_NOT_WEIGHT_PREFIXES):
            continue
        if key.startswith(_UNET_PREFIX):
            groups.setdefault("unet", {})[key[len(_UNET_PREFIX) :]] = value
        elif key.startswith(vae_prefix):
            groups.setdefault("vae", {})[key[len(vae_prefix) :]] = value
        elif component := next((c for c, (p, _) in layouts.items() if key.startswith(p)), None):
            groups.setdefault(component, {})[key[len(layouts[component][0]) :]] = value
        else:
            unknown.append(key)

    converted = {}
    for component, group in groups.items():
        if component == "unet":
            converted[component], bad = convert_unet(group, configs["unet"])
        elif component == "vae":
            converted[component], bad = convert_vae(group, configs["vae"], vae_prefix)
        else:
            prefix, layout = layouts[component]
            if layout == "clip":
                converted[component], bad = convert_clip(group, prefix)
            else:
                converted[component], bad = convert_open_clip(group, configs[component], prefix)
        unknown += bad
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ModelLoadError(
            f"unknown keys {unknown[:5]}{more} in this {FAMILY_NAMES[family]} checkpoint; "
            "it does not follow the LDM layout of Stable Diffusion 1.x/2.x/XL"
        )
    return converted


# ---------------------------------------------------------------------------------------------
# The source object the facade loads from


class SingleFileSource:
    """One ``.safetensors`` checkpoint in the LDM layout, seen as the components of a diffusers folder.

    ``config_dir``: a diffusers folder whose configs, model_index and tokenizers are used instead
    of the shipped ones (diffusers' ``from_single_file(config=...)``). ``tokenizer_dirs``: folders
    for "tokenizer"/"tokenizer_2" instead of the reference repo's.
    """

    def __init__(
        self,
        path,
        prediction_type: Optional[str] = None,
        config_dir=None,
        tokenizer_dirs: Optional[dict] = None,
    ):
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
        self.config_dir = Path(config_dir) if config_dir is not None else None
        self.tokenizer_dirs = {k: Path(v) for k, v in (tokenizer_dirs or {}).items()}

        arrays = self._read()
        shapes = {k: tuple(v.shape) for k, v in arrays.items()}
        # ComfyUI (and A1111, which reads them) mark v-prediction and zero-terminal-SNR models with
        # empty tensors; diffusers ignores them, but the model is wrong without them.
        self.markers = {k for k in ("v_pred", "ztsnr") if k in shapes}
        if self.config_dir is None:
            self.family = detect_family(shapes)
        else:
            detect_family(shapes)  # still refuses what we cannot run
            xl = "XL" in self._model_index_of_config_dir().get("_class_name", "")
            self.family = "sdxl" if xl else ("sd2" if any(k.startswith("cond_stage_model.model.") for k in shapes) else "sd1")
        known = SDXL_TURBO_FILES.get(self.path.stat().st_size)
        self.is_sdxl_turbo = self.family == "sdxl" and known is not None and model_hash(self.path) == known
        self.reference = HubModel(SDXL_TURBO_FOLDER if self.is_sdxl_turbo else FAMILY_FOLDERS[self.family])
        # Converted (still lazy) tensors; each component's are handed out once, then re-read.
        self._pending = self._convert(arrays)
        self._components = set(self._pending)

    def _read(self) -> dict:
        try:
            return mx.load(str(self.path), format="safetensors")
        except Exception as e:
            raise ModelLoadError(f"{self.name}: not a readable safetensors file ({e})") from None

    def _convert(self, arrays: dict) -> dict:
        configs = {c: self.config(c) for c in ("unet", "vae", "text_encoder", "text_encoder_2") if self._expects(c)}
        try:
            return convert(arrays, self.family, configs)
        except ModelLoadError as e:
            raise ModelLoadError(f"{self.name}: {e}") from None

    def _expects(self, component: str) -> bool:
        return component != "text_encoder_2" or self.family == "sdxl"

    def _model_index_of_config_dir(self) -> dict:
        path = self.config_dir / "model_index.json"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{path}: cannot be read ({e})") from None

    def has(self, component: str) -> bool:
        if component in ("unet", "vae", "text_encoder", "text_encoder_2"):
            return component in self._components
        if component == "tokenizer_2":
            return self.family == "sdxl"
        return component in ("tokenizer", "scheduler")

    def model_index(self) -> dict:
        if self.config_dir is not None:
            return self._model_index_of_config_dir()
        return self.reference.model_index()

    def config(self, component: str) -> dict:
        """The config.json (scheduler: scheduler_config.json) dict of a component."""
        if component not in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler") or not self._expects(component):
            raise ModelLoadError(f"{self.name}: a {FAMILY_NAMES[self.family]} checkpoint has no {component} config")
        if self.config_dir is not None:
            name = "scheduler_config.json" if component == "scheduler" else "config.json"
            path = self.config_dir / component / name
            try:
                config = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ModelLoadError(f"{path}: cannot be read ({e})") from None
        else:
            config = self.reference.config(component)
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
        if self.config_dir is not None:
            return Tokenizer.from_folder(self.config_dir / component)
        return self.reference.tokenizer(component)


# ---------------------------------------------------------------------------------------------
# A1111's "Model hash"


def _hash_cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "stable_diffusion_mlx" / "sha256.json"


def file_sha256(path) -> str:
    """The sha256 of a file, cached by path, size and mtime (in the user cache, never next to the file)."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = _hash_cache_file()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    if isinstance(cache.get(key), str):
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    cache[key] = digest.hexdigest()
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=0))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only cache only costs a rehash next time
    return cache[key]


def model_hash(path) -> str:
    """A1111's "Model hash": the first 10 hex digits of the file's sha256."""
    return file_sha256(path)[:10]

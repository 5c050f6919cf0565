"""LDM / SGM / OpenCLIP tensor names -> the diffusers and transformers names of each component.

Follows diffusers' ``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_ldm_clip_checkpoint`` and ``convert_open_clip_checkpoint``
(``diffusers/loaders/single_file_utils.py``). The functions only slice, transpose and reshape, so
they work on lazy mx.arrays (and on anything else with those methods): a 7 GB checkpoint is never
read here.
"""

import re
from typing import Optional

from .errors import ModelLoadError

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
UNET_PREFIX = "model.diffusion_model."
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


class ConfigError(ModelLoadError):
    """A config value the key names depend on is unusable; ``component`` says whose config it is."""

    def __init__(self, component: str, message: str):
        super().__init__(message)
        self.component = component


def _whole_number(config: dict, key: str, component: str, default=None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(component, f"{key} must be a whole number >= 1, got {value!r}")
    return value


def convert_unet(arrays: dict, config: dict) -> tuple[dict, list]:
    """``model.diffusion_model.*`` (prefix removed) -> diffusers UNet2DConditionModel names; also the unknown keys."""
    lpb = config.get("layers_per_block", 2)
    if isinstance(lpb, (list, tuple)) and lpb:
        if any(n != lpb[0] for n in lpb):
            raise ConfigError("unet", "per-block layers_per_block cannot be read from an LDM checkpoint")
        lpb = lpb[0]
    lpb = _whole_number({"layers_per_block": lpb}, "layers_per_block", "unet")
    out, unknown = {}, []
    for key, value in arrays.items():
        name = _unet_name(key, lpb)
        if name is None:
            unknown.append(UNET_PREFIX + key)
        else:
            out[name] = value
    return out, unknown


def convert_vae(arrays: dict, config: dict, prefix: str = "first_stage_model.") -> tuple[dict, list]:
    """``first_stage_model.*`` (prefix removed) -> diffusers AutoencoderKL names; also the unknown keys.

    The mid-block attention projections are stored as 1x1 convs (or conv1d, or linears); a
    diffusers folder stores them as linears.
    """
    channels = config.get("block_out_channels")
    if not isinstance(channels, (list, tuple)) or not channels:
        raise ConfigError("vae", f"block_out_channels must be a non-empty list, got {channels!r}")
    num_blocks = len(channels)
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


def convert_open_clip(arrays: dict, config: dict, prefix: str, component: str = "text_encoder") -> tuple[dict, list]:
    """OpenCLIP text tower (prefix removed) -> transformers CLIPTextModel(WithProjection) names.

    The fused attention ``in_proj`` is split into q/k/v; ``text_projection`` (x @ P) is transposed
    into a Linear weight, or dropped for SD 2's CLIPTextModel; resblocks past the config's
    ``num_hidden_layers`` (SD 2 uses 23 of OpenCLIP-H's 24) and ``logit_scale`` are not used.
    """
    architectures = config.get("architectures")
    with_projection = isinstance(architectures, list) and "CLIPTextModelWithProjection" in architectures
    num_layers = _whole_number(config, "num_hidden_layers", component)
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
        if key.startswith(UNET_PREFIX):
            groups.setdefault("unet", {})[key[len(UNET_PREFIX) :]] = value
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
                converted[component], bad = convert_open_clip(group, configs[component], prefix, component)
        unknown += bad
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ModelLoadError(
            f"unknown keys {unknown[:5]}{more} in this {FAMILY_NAMES[family]} checkpoint; "
            "it does not follow the LDM layout of Stable Diffusion 1.x/2.x/XL"
        )
    return converted


"""Write diffusers/transformers state dicts out in the original LDM (A1111 / ComfyUI) single-file layout.

The inverse of stable_diffusion.ldm_keys, written from the LDM / SGM / OpenCLIP module names
(``input_blocks``, ``first_stage_model.encoder.down.0.block.0``, ``resblocks.0.attn.in_proj_weight``),
and checked against diffusers' own forward converters in the tests. Works on real or meta torch
tensors, so the full-size key lists can be built without memory.
"""

import torch

UNET_PREFIX = "model.diffusion_model."

# Buffers every LDM training checkpoint carries besides the weights (the DDPM schedule).
SCHEDULE_BUFFERS = (
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
)

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def _resnet(rest: str) -> str:
    module, param = rest.rsplit(".", 1)
    return f"{_RESNET[module]}.{param}"


def unet_to_ldm(state: dict, layers_per_block: int) -> dict:
    """diffusers UNet2DConditionModel state dict -> ``model.diffusion_model.*``."""
    top = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
    }
    n = layers_per_block + 1
    out = {}
    for key, value in state.items():
        module, param = key.rsplit(".", 1)
        parts = key.split(".")
        if module in top:
            name = f"{top[module]}.{param}"
        elif parts[0] == "down_blocks":
            block, kind, layer, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                name = f"input_blocks.{1 + block * n + layer}.0.{_resnet(rest)}"
            elif kind == "attentions":
                name = f"input_blocks.{1 + block * n + layer}.1.{rest}"
            else:  # downsamplers.0.conv.*
                name = f"input_blocks.{1 + block * n + layers_per_block}.0.op.{parts[-1]}"
        elif parts[0] == "mid_block":
            kind, layer, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            name = f"middle_block.{2 * layer}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            block, kind, layer, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                name = f"output_blocks.{block * n + layer}.0.{_resnet(rest)}"
            elif kind == "attentions":
                name = f"output_blocks.{block * n + layer}.1.{rest}"
            else:  # upsamplers.0.conv.*: after the attention when the level has one
                has_attention = any(k.startswith(f"up_blocks.{block}.attentions.") for k in state)
                name = f"output_blocks.{block * n + n - 1}.{2 if has_attention else 1}.conv.{parts[-1]}"
        else:
            raise KeyError(key)
        out[UNET_PREFIX + name] = value
    return out


def vae_to_ldm(state: dict, num_blocks: int, attention_as_conv: bool = True) -> dict:
    """diffusers AutoencoderKL state dict -> ``first_stage_model.*`` (attention as 1x1 convs, as LDM stores it)."""
    resnet = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        coder, param = parts[0], parts[-1]
        if parts[1] in ("conv_in", "conv_out") or key.startswith(("quant_conv", "post_quant_conv")):
            name = key
        elif parts[1] == "conv_norm_out":
            name = f"{coder}.norm_out.{param}"
        elif parts[1] in ("down_blocks", "up_blocks"):
            block = int(parts[2]) if coder == "encoder" else num_blocks - 1 - int(parts[2])
            level = "down" if coder == "encoder" else "up"
            if parts[3] == "resnets":
                name = f"{coder}.{level}.{block}.block.{parts[4]}.{resnet[parts[5]]}.{param}"
            else:
                name = f"{coder}.{level}.{block}.{'downsample' if level == 'down' else 'upsample'}.conv.{param}"
        elif parts[1] == "mid_block" and parts[2] == "resnets":
            name = f"{coder}.mid.block_{int(parts[3]) + 1}.{resnet[parts[4]]}.{param}"
        elif parts[1] == "mid_block":
            module = ".".join(parts[4:-1])
            name = f"{coder}.mid.attn_1.{attention[module]}.{param}"
            if attention_as_conv and module != "group_norm" and param == "weight":
                value = value.reshape(*value.shape, 1, 1)
        else:
            raise KeyError(key)
        out["first_stage_model." + name] = value
    return out


def clip_to_ldm(state: dict, prefix: str) -> dict:
    """transformers CLIPTextModel state dict -> ``cond_stage_model.transformer.*`` (HF CLIP inside LDM)."""
    out = {}
    for key, value in state.items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + key] = value
    # LDM checkpoints carry the position_ids buffer of the transformers version they were trained with.
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(77, device=value.device)[None]
    return out


def open_clip_to_ldm(state: dict, prefix: str, extra_layers: int = 0, projection_dim=None, seed: int = 0) -> dict:
    """transformers CLIPTextModel(WithProjection) state dict -> an OpenCLIP text tower under ``prefix``.

    q/k/v are fused into ``in_proj``; ``text_projection`` is stored as (width, dim) for x @ P.
    ``extra_layers`` appends random resblocks the diffusers model does not use (SD 2 stores all 24
    of OpenCLIP-H's, conditions on 23); without a projection in ``state`` a random one of
    ``projection_dim`` is written (SD 2 stores it, does not use it).
    """
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    layer_map = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    out = {
        "positional_embedding": state["embeddings.position_embedding.weight"],
        "token_embedding.weight": state["embeddings.token_embedding.weight"],
        "ln_final.weight": state["final_layer_norm.weight"],
        "ln_final.bias": state["final_layer_norm.bias"],
    }
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        base = f"encoder.layers.{i}."
        for ours, theirs in layer_map.items():
            for param in ("weight", "bias"):
                out[f"transformer.resblocks.{i}.{theirs}.{param}"] = state[f"{base}{ours}.{param}"]
        for param in ("weight", "bias"):
            qkv = [state[f"{base}self_attn.{p}_proj.{param}"] for p in "qkv"]
            out[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat(qkv, dim=0)
    device = out["positional_embedding"].device
    generator = torch.Generator().manual_seed(seed)
    for i in range(len(layers), len(layers) + extra_layers):
        for k in [k for k in out if k.startswith("transformer.resblocks.0.")]:
            template = out[k]
            fresh = torch.empty_like(template) if device.type == "meta" else torch.randn(template.shape, generator=generator) * 0.02
            out[k.replace("resblocks.0.", f"resblocks.{i}.")] = fresh
    if "text_projection.weight" in state:
        out["text_projection"] = state["text_projection.weight"].T.contiguous()
    else:
        width = out["positional_embedding"].shape[-1]
        shape = (width, projection_dim or width)
        out["text_projection"] = torch.empty(shape, device="meta") if device.type == "meta" else torch.randn(shape, generator=generator) * 0.02
    out["logit_scale"] = torch.empty((), device=device) if device.type == "meta" else torch.tensor(4.6052)
    return {prefix + k: v for k, v in out.items()}


def schedule_buffers(device="cpu") -> dict:
    if str(device) == "meta":
        return {k: torch.empty(1000, device="meta") for k in SCHEDULE_BUFFERS}
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    return {k: (betas if k == "betas" else alphas_cumprod).float() for k in SCHEDULE_BUFFERS}


def pipeline_to_ldm(family: str, unet, vae, text_encoder, text_encoder_2=None, unet_config=None, vae_config=None, openclip_extra_layers=None) -> dict:
    """Whole-checkpoint state dict in the LDM layout of ``family`` ("sd1", "sd2", "sdxl")."""
    unet_config = unet_config or unet.config
    vae_config = vae_config or vae.config
    lpb = unet_config["layers_per_block"]
    lpb = lpb[0] if isinstance(lpb, (list, tuple)) else lpb
    device = next(iter(unet.state_dict().values())).device
    out = {**schedule_buffers(device)}
    out |= unet_to_ldm(unet.state_dict(), lpb)
    out |= vae_to_ldm(vae.state_dict(), len(vae_config["block_out_channels"]))
    if family == "sd1":
        out |= clip_to_ldm(text_encoder.state_dict(), "cond_stage_model.transformer.")
    elif family == "sd2":
        extra = 1 if openclip_extra_layers is None else openclip_extra_layers
        out |= open_clip_to_ldm(text_encoder.state_dict(), "cond_stage_model.model.", extra_layers=extra)
    else:
        out |= clip_to_ldm(text_encoder.state_dict(), "conditioner.embedders.0.transformer.")
        out |= open_clip_to_ldm(text_encoder_2.state_dict(), "conditioner.embedders.1.model.", extra_layers=openclip_extra_layers or 0)
    return out

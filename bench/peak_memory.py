"""Where the peak memory of one image goes: text encoding, one denoising step, decoding; MLX and diffusers.

Loads a model folder written by ``bench/_models.py`` (``bench/coldstart.py --make-model``) in float16,
then measures each stage on its own: the peak counter is reset before it and read after it is
evaluated (``mx.get_peak_memory()`` / ``torch.cuda.max_memory_allocated()``), weights included.
One image, classifier-free guidance, 50-step Euler schedule (only one step is run).

    python bench/peak_memory.py --model /tmp/models/sdxl --family sdxl --size 1024
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photograph of an astronaut riding a horse"
GB = 1e9


def mlx_stages(model, family, size, eval_blocks=False):
    sys.path.insert(0, str(ROOT))
    import mlx.core as mx

    from stable_diffusion import vae
    from stable_diffusion.pipeline import StableDiffusion, StableDiffusionXL

    if eval_blocks:  # evaluate the decoder block by block (an experiment: does it lower the peak?)
        call = vae.UpDecoderBlock2D.__call__

        def evaluated(self, x):
            y = call(self, x)
            mx.eval(y)
            return y

        vae.UpDecoderBlock2D.__call__ = evaluated

    sd = (StableDiffusionXL if family == "sdxl" else StableDiffusion)(model, float16=True)
    sd.ensure_models_are_loaded()
    out = {"weights": mx.get_active_memory() / GB}
    gen = sd.generate_latents(PROMPT, n_images=1, num_steps=50, cfg_weight=7.5, latent_size=(size // 8, size // 8), seed=0)
    mx.reset_peak_memory()
    x = next(gen)  # text encoding + the first step
    mx.eval(x)
    out["text + first step"] = mx.get_peak_memory() / GB
    mx.reset_peak_memory()
    x = next(gen)
    mx.eval(x)
    out["one more step"] = mx.get_peak_memory() / GB
    del gen
    mx.clear_cache()
    mx.reset_peak_memory()
    mx.eval(sd.decode(x))
    out["decode"] = mx.get_peak_memory() / GB
    out["vae dtype"] = str(sd.vae_dtype)
    return out


def diffusers_stages(model, family, size):
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(model, torch_dtype=torch.float16, **extra).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    out = {"weights": torch.cuda.memory_allocated() / GB}
    peaks = []

    def on_step(p, i, t, kwargs):
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() / GB)
        torch.cuda.reset_peak_memory_stats()
        if i == 1:
            p._interrupt = True
        return kwargs

    torch.cuda.reset_peak_memory_stats()
    g = torch.Generator("cuda").manual_seed(0)
    latents = pipe(PROMPT, num_inference_steps=50, guidance_scale=7.5, height=size, width=size, generator=g,
                   output_type="latent", callback_on_step_end=on_step).images
    out["text + first step"], out["one more step"] = peaks[0], peaks[1]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        # Only the SDXL pipelines read force_upcast (SD 1/2 configs default it to True but decode in float16).
        if family == "sdxl" and pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast:
            pipe.upcast_vae()
            latents = latents.to(next(iter(pipe.vae.post_quant_conv.parameters())).dtype)
        pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)
        torch.cuda.synchronize()
    out["decode"] = torch.cuda.max_memory_allocated() / GB
    out["vae dtype"] = str(pipe.vae.dtype)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--family", default="sd21", choices=["sd15", "sd21", "sdxl"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--impl", default="mlx,diffusers")
    p.add_argument("--json", default=None)
    p.add_argument("--eval-blocks", action="store_true", help="MLX: evaluate the VAE decoder block by block")
    args = p.parse_args()
    results = {}
    for impl in args.impl.split(","):
        if impl == "mlx":
            results[impl] = mlx_stages(args.model, args.family, args.size, args.eval_blocks)
        else:
            results[impl] = diffusers_stages(args.model, args.family, args.size)
        print(impl, json.dumps(results[impl]), flush=True)
        if impl == "mlx":
            import mlx.core as mx

            mx.clear_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": sys.argv, "results": results}, indent=1))
    print(f"\npeak memory (GB, weights included), {args.family} {args.size} px, 1 image, CFG, float16")
    print("| stage | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for stage in ("weights", "text + first step", "one more step", "decode", "vae dtype"):
        print(f"| {stage} | " + " | ".join(f"{r[stage]:.2f}" if isinstance(r[stage], float) else r[stage] for r in results.values()) + " |")


if __name__ == "__main__":
    main()

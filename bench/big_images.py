"""Large images in bounded memory: time per step and peak memory, our MLX pipeline against diffusers, same options.

SD 1.5 at 1024² and 2048², SDXL base at 2048² (``--runs``), random weights with the real configs
(``bench/_models.py``, written once by ``--make-model``), 1 image, classifier-free guidance 7.5,
float16 on a GPU (float32 on CPU). Both run what makes large sizes fit:

- ours: attention in query slices wherever the scores are materialised (``unet.ATTENTION_SCORES_LIMIT``;
  on CUDA, fp16 self-attention runs in cuDNN's fused kernel and is not sliced) and the VAE decoded in
  tiles (``decode(tiled=True)``);
- diffusers: ``pipe.enable_attention_slicing()`` (its "auto": half the heads at a time) and
  ``pipe.vae.enable_tiling()``, the SDXL VAE upcast to float32 as its pipeline does.

Each (run, implementation) is one fresh process. Reported: seconds per denoising step (median of
steps 2..N; the first, with kernel compilation, apart), the decode's seconds, and the peak memory of
the denoising and of the decode (active buffers: ``mx.get_peak_memory()`` against
``torch.cuda.max_memory_allocated()``, reset after loading; the weights apart).

    # GPU machine (carry .mlx-cuda and bench/_tokenizer):
    source .mlx-cuda/setup.sh && python3 bench/big_images.py --make-model /tmp/models --json $OUT/big_images.json
    # CPU smoke test (toy widths, small images, 2 steps, a tiny slicing bound so every path runs):
    python bench/big_images.py --make-model /tmp/bi --tiny
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import _models  # noqa: E402
from coldstart import card_name, spawn  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
CFG = 7.5
RUNS = "sd15:1024,sd15:2048,sdxl:2048"
# Toy sizes: sd15 at 640 px passes its VAE's 512-pixel tile, so tiling runs too.
TINY_RUNS = "sd15:256,sd15:640,sdxl:256"
TINY_SCORES_LIMIT = 2**20  # 1 MiB: every attention of the toy models slices


def child_mlx(args):
    sys.path.insert(0, str(ROOT))
    import mlx.core as mx

    from stable_diffusion import unet
    from stable_diffusion.pipeline import StableDiffusion, StableDiffusionXL

    if args.scores_limit:
        unet.ATTENTION_SCORES_LIMIT = args.scores_limit
    float16 = mx.default_device() == mx.gpu
    sd = (StableDiffusionXL if args.family == "sdxl" else StableDiffusion)(args.model, float16=float16)
    sd.ensure_models_are_loaded()
    weights = mx.get_active_memory()
    mx.reset_peak_memory()
    times, start, x = [], time.time(), None
    gen = sd.generate_latents(PROMPT, num_steps=args.steps, cfg_weight=CFG, latent_size=(args.size // 8, args.size // 8), seed=0)
    for x in gen:
        mx.eval(x)
        times.append(time.time() - start)
        start = time.time()
    denoise_peak = mx.get_peak_memory()
    mx.reset_peak_memory()
    t = time.time()
    image = sd.decode(x, tiled=True)
    mx.eval(image)
    decode_s = time.time() - t
    device = f"{mx.default_device()} ({'float16' if float16 else 'float32'})"
    return _result(device, weights, times, denoise_peak, decode_s, mx.get_peak_memory(), float(image.mean()))


def child_diffusers(args):
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if args.family == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(args.model, torch_dtype=dtype, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_attention_slicing()
    pipe.vae.enable_tiling()
    sync()
    peak = torch.cuda.max_memory_allocated if cuda else (lambda: None)
    weights = torch.cuda.memory_allocated() if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, state = [], {"start": time.time()}

    def on_step(p, i, timestep, kwargs):
        sync()
        times.append(time.time() - state["start"])
        state["start"] = time.time()
        return kwargs

    latents = pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=CFG, height=args.size, width=args.size,
                   generator=torch.Generator(dev).manual_seed(0), output_type="latent", callback_on_step_end=on_step).images
    denoise_peak = peak()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast  # as StableDiffusionXLPipeline decodes
    with torch.no_grad():
        if upcast:
            vae.to(dtype=torch.float32)
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        image = (image / 2 + 0.5).clamp(0, 1)
    sync()
    decode_s = time.time() - t
    device = torch.cuda.get_device_name() if cuda else "cpu (float32)"
    return _result(device, weights, times, denoise_peak, decode_s, peak(), float(image.float().mean()))


def _result(device, weights, times, denoise_peak, decode_s, decode_peak, image_mean):
    return {
        "device": device,
        "first_step_s": times[0],
        "step_s": statistics.median(times[1:]) if len(times) > 1 else None,
        "steps": len(times),
        "denoise_peak_bytes": denoise_peak,
        "decode_s": decode_s,
        "decode_peak_bytes": decode_peak,
        "weights_bytes": weights,
        "image_mean": image_mean,
    }


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--runs", default=None, help=f"comma-separated family:size (default {RUNS}; --tiny: {TINY_RUNS})")
    p.add_argument("--make-model", default=None, help="folder for the random models: one subfolder per family, each written once")
    p.add_argument("--tokenizer", default=str(ROOT / "bench" / "_tokenizer"), help="the folder of `bench/generate.py --write-tokenizer`")
    p.add_argument("--tiny", action="store_true", help="toy-width models, small images, 2 steps (CPU smoke test)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per run (default 10; --tiny: 2)")
    p.add_argument("--impl", default="mlx,diffusers", help="implementations to run")
    p.add_argument("--timeout", type=float, default=300, help="seconds one child process (or one model write) may take")
    p.add_argument("--json", default=None, help="write all numbers here (rewritten after every process)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--family", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--scores-limit", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.child and not args.make_model:
        p.error("give --make-model DIR (the random models are written there once)")
    args.steps = args.steps or (2 if args.tiny else 10)
    runs = []
    for item in (args.runs or (TINY_RUNS if args.tiny else RUNS)).split(","):
        family, _, size = item.partition(":")
        if family not in _models.FAMILIES or not size.isdigit() or int(size) % 8:
            p.error(f"--runs item {item!r}: expected FAMILY:SIZE with FAMILY in {', '.join(_models.FAMILIES)} and SIZE a multiple of 8")
        runs.append((family, int(size)))
    args.run_list = runs
    return args


def main():
    args = parse_args()
    if args.child == "write":
        _models.make_model(Path(args.model), Path(args.tokenizer), args.family, args.tiny)
        print("RESULT written {}", flush=True)
        return
    if args.child:
        result = (child_mlx if args.child == "mlx" else child_diffusers)(args)
        print("RESULT run " + json.dumps(result), flush=True)
        os._exit(0)  # printed: skip the interpreter's teardown

    card = card_name()
    print(f"card: {card}; command: python {' '.join(sys.argv)}", flush=True)
    report = {"card": card, "argv": sys.argv, "steps": args.steps, "cfg": CFG, "runs": {}, "errors": {}}
    common = ["--steps", str(args.steps)] + (["--tiny"] if args.tiny else [])
    for family, size in args.run_list:
        model = Path(args.make_model) / (family + ("-tiny" if args.tiny else ""))
        if not (model / "model_index.json").exists():
            cmd = [sys.executable, __file__, "--child", "write", "--family", family, "--model", str(model), "--tokenizer", args.tokenizer]
            _, failure, seconds = spawn(cmd + common, os.environ, args.timeout)
            if failure:
                print(f"{family}: writing the random model failed ({failure})", flush=True)
                report["errors"][f"{family} write"] = failure
                continue
            print(f"{family}: wrote the random model to {model} in {seconds:.0f} s", flush=True)
        for impl in args.impl.split(","):
            key = f"{family} {size} {impl}"
            cmd = [sys.executable, __file__, "--child", impl, "--family", family, "--model", str(model), "--size", str(size)]
            if args.tiny and impl == "mlx":
                cmd += ["--scores-limit", str(TINY_SCORES_LIMIT)]
            parts, failure, _ = spawn(cmd + common, os.environ, args.timeout)
            if "run" in parts:
                report["runs"][key] = parts["run"]
                print(f"{key}: {json.dumps(parts['run'])}", flush=True)
            if failure:
                print(f"{key} failed ({failure})", flush=True)
                report["errors"][key] = failure
            if args.json:
                Path(args.json).write_text(json.dumps(report, indent=1))
    print_table(report)


def print_table(report):
    gib = lambda b: f"{b / 2**30:.2f}" if b is not None else "-"  # noqa: E731
    print(f"\n{'run':<26}{'s/step':>8}{'1st step':>10}{'denoise GiB':>13}{'decode s':>10}{'decode GiB':>12}")
    for key, r in report["runs"].items():
        step = f"{r['step_s']:.3f}" if r["step_s"] is not None else "-"
        print(f"{key:<26}{step:>8}{r['first_step_s']:>10.2f}{gib(r['denoise_peak_bytes']):>13}{r['decode_s']:>10.2f}{gib(r['decode_peak_bytes']):>12}")


if __name__ == "__main__":
    main()
